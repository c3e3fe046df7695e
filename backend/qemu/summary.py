"""A launch's summary (the JSON object docs/qemu.md describes), in parts:
what the backend saw, what the guest said, the gigantic workload's
attribution; and the one sentence saying why a run failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.qemu.attribution import BackendReport, summarize_gigantic
from vhost_balloon.backend.qemu.command import TIMED_LOOPS, LaunchOptions
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.notes import RunGuestNotes
from vhost_balloon.backend.qemu.sampler import MemorySampler, memory_given_back
from vhost_balloon.backend.qemu.vmem_summary import summarize_vmem
from vhost_balloon.backend.server import Server
from vhost_balloon.protocol.samples import percentiles
from vhost_balloon.protocol.virtio import feature_name

TIMEOUT_STATUS = 124  # run-guest.sh's status when the guest did not power off in time


def backend_summary(server: Server, records: Sequence[ReportRecord]) -> dict[str, Any]:
    """The backend's reports (every record, in completion order) and counters."""
    holds_us = [ns / 1000 for ns in (r.kick_to_notify_ns for r in records) if ns is not None]
    totals = server.totals()
    return {
        "reports": len(records),
        "entries": sum(r.entries for r in records),
        "reported_bytes": sum(r.bytes for r in records),
        "freed_bytes": sum(r.freed_bytes for r in records),
        "hold_us": percentiles(holds_us),
        "discard": server.settings.balloon.discard.value,
        "injected": server.latency.settings.describe(),
        "backend": {
            "sessions": server.sessions_served,
            "skipped_entries": totals.skipped_outside + totals.skipped_unaligned,
            "discard_errors": totals.discard_errors,
            "queue_errors": totals.queue_errors,
            "hold_us_samples": [round(us, 3) for us in holds_us],
        },
    }


def guest_summary(guest: GuestConsole, sampler: MemorySampler) -> dict[str, Any]:
    """What the guest said (its reports as ftrace timed them, its features,
    its integrity check) and what each round gave back to the host."""
    ordered = sorted(guest.reports, key=lambda r: r.t_start_mono)
    guest_us = [r.duration_us for r in ordered]
    return {
        "guest_reports": len(guest_us),
        "guest_hold_us": {**percentiles(guest_us), "samples": guest_us},
        "guest_report_starts": [r.t_start_mono for r in ordered],
        "features": None
        if guest.features is None
        else {
            "mask": guest.features,
            "bits": guest.feature_bits,
            "names": [feature_name(bit) for bit in guest.feature_bits],
        },
        "page_reporting_order": guest.page_reporting_order,
        "integrity_ok": guest.integrity_ok,
        "memfd_freed": memory_given_back(guest, sampler),
    }


def fill_summary(guest: GuestConsole) -> dict[str, Any] | None:
    """The fill workload's allocate-and-touch time per round, the price of
    reporting: round 1 touches memory the host never gave the guest, each
    later round memory the last round freed, which reporting (if any) has
    handed back to the host by then. None without ftrace's timings."""
    timed = sorted(
        (r.number, r.size_mib, r.fill_us / 1e3) for r in guest.rounds.values() if r.fill_us
    )
    if not timed:
        return None
    later_ms = [ms for number, _, ms in timed if number > 1]
    later = percentiles(later_ms) if later_ms else None
    mib = timed[0][1]
    return {
        "size_mib": mib,
        "round_ms": [{"round": number, "ms": round(ms, 3)} for number, _, ms in timed],
        "first_ms": round(timed[0][2], 3) if timed[0][0] == 1 else None,
        "later_ms": later,
        "later_mib_per_s": round(mib / later["p50"] * 1e3, 1) if later and later["p50"] else None,
    }


def pattern_summary(guest: GuestConsole) -> dict[str, Any] | None:
    """The pattern workload's totals, its rounds and its bad files (None
    when the guest printed nothing about it)."""
    run = guest.pattern
    if run is None:
        return None
    return {
        **(run.totals or {}),
        "complete": run.totals is not None,
        "round_list": run.rounds,
        "bad_files": run.bad_files,
    }


def gigantic_summary(
    guest: GuestConsole, records: Sequence[ReportRecord] | None
) -> dict[str, Any] | None:
    """The gigantic workload's counts and attributions (None when the guest
    printed nothing about it, e.g. your own initrd); `records` is None
    without a backend."""
    run = guest.gigantic
    if run is None:
        return None
    return summarize_gigantic(
        run,
        [r.t_start_mono for r in guest.reports],
        [r.duration_us for r in guest.reports],
        None if records is None else backend_reports(records),
    )


def vmem_summary(
    guest: GuestConsole, steps: dict[str, Any] | None, records: Sequence[ReportRecord] | None
) -> dict[str, Any]:
    """The vmem workload's unplugs and their isolation tests, attributed."""
    return summarize_vmem(
        guest.gigantic,
        steps,
        [r.t_start_mono for r in guest.reports],
        [r.duration_us for r in guest.reports],
        None if records is None else backend_reports(records),
    )


def backend_reports(records: Sequence[ReportRecord]) -> list[BackendReport]:
    """What attribution needs of each record, in trace order."""
    return [
        BackendReport(ring_time_ns(r) / 1e9, tuple((gpa, length) for gpa, length in r.ranges))
        for r in records
    ]


def ring_time_ns(record: ReportRecord) -> int:
    """When the chain reached the backend's ring walk: its pop time minus
    what was injected before the pop (the kick delay, the BQL wait at pop),
    so that random kick delays do not scatter the alignment."""
    kick = record.injected_ns.get("kick", 0)
    return record.t_popped_ns - kick - record.bql_wait_ns.get("pop", 0)


def launch_failure(
    options: LaunchOptions,
    *,
    interrupted: bool,
    returncode: int | None,
    notes: RunGuestNotes,
    guest: GuestConsole,
    server: Server | None,
    records: Sequence[ReportRecord],
) -> str | None:
    """The one-sentence reason a run failed, or None (also when the user
    stopped it)."""
    if interrupted:
        return None
    if notes.failure is not None:
        return notes.failure
    first_error = notes.first_error
    if returncode == TIMEOUT_STATUS:
        return f"the guest did not power off within {options.timeout_s} s (QEMU killed)"
    if returncode not in (0, None):
        said = f": {first_error}" if first_error else ""
        return f"QEMU exited with status {returncode}{said}"
    if server is not None and server.totals().queue_errors:
        said = f" (QEMU said: {first_error})" if first_error else ""
        return (
            "the backend could not use the guest's rings: is guest RAM shared "
            f"(share=on, fd-backed)?{said}"
        )
    if server is not None and not records and first_error:
        return f"no report reached the backend; QEMU said: {first_error}"
    if guest.errors:
        return f"the guest workload failed: {guest.errors[0]}"
    if guest.balloon_absent and options.mode != "none":
        return "the guest found no balloon device"
    if (
        options.workload in TIMED_LOOPS
        and options.initrd is None
        and guest.done
        and (guest.gigantic is None or guest.gigantic.attempts is None)
    ):
        what = {"gigantic": "gigantic-page attempt", "offline": "offline"}.get(
            options.workload, "end of its loop"
        )
        return f"the guest finished without reporting any {what}"
    if options.workload == "pattern" and options.initrd is None and guest.done:
        totals = guest.pattern.totals if guest.pattern is not None else None
        if totals is None:
            return "the guest finished without its pattern totals"
        if totals["corrupted_pages"]:
            return (
                f"the guest found {totals['corrupted_pages']} corrupted pages in its patterns "
                f"(of {totals['checked_mib']} MiB checked)"
            )
    if options.initrd is None and guest.workload is not None and not guest.done:
        # Our guest started its workload and never said it was done: QEMU was
        # ended from outside (a user's QMP quit or power button, a kill).
        return "QEMU exited before the guest finished its workload"
    return None
