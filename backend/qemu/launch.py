"""`vhost-balloon launch`: the backend (in this process) beside a real QEMU
running the project's test guest (or the user's own kernel and initrd).

QEMU is started through qemu-configs/run-guest.sh (which builds the
initramfs, picks the accelerator and writes the command line), in its own
process group. The guest console is streamed with host timestamps (monotonic
seconds since launch started) and its `VB ` lines parsed; QEMU's shared
guest RAM (RssShmem + HugetlbPages of the QEMU process) is sampled so each
round's memory given back can be measured. The backend stops when QEMU
exits; Ctrl-C or SIGTERM stops QEMU first (SIGTERM, then SIGKILL of its
process group after STOP_GRACE_S).

Workloads: `fill` (fill/free rounds) and `gigantic` (a 1 GiB hugetlb page
allocated and freed in a loop; its failures are attributed to the reports
that held the pages, backend/qemu/attribution.py). Balloon devices: the backend
(default), QEMU's built-in device (`baseline`), or none (`no_balloon`, a
control for the gigantic workload).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.qemu.attribution import BackendReport, summarize_gigantic
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.provisioning import (
    LaunchError,
    check_device,
    configs_dir,
    ensure_provisioned,
    qemu_version,
)
from vhost_balloon.backend.server import Server, ServerSettings, listen_unix
from vhost_balloon.protocol.virtio import FEATURE_NAMES, balloon_queues

STOP_GRACE_S = 10.0
SAMPLE_INTERVAL_S = 0.2
GIVE_BACK_WINDOW_S = 10.0
MiB = 1 << 20
PERCENTILES = (50, 90, 99)
_PID_NOTE = re.compile(r"^run-guest: qemu pid (\d+)")
WORKLOADS = ("fill", "gigantic")
# Per workload: guest RAM and kernel command line when the user gives none.
# The gigantic workload needs a 1 GiB-aligned range that is all RAM (2560M
# leaves GPA 1-2 GiB), the kernel image out of it (nokaslr), and no zeroing
# of the whole 1 GiB on every allocation (init_on_alloc=0: 2.5-4 s per
# attempt under TCG otherwise). See docs/qemu.md.
DEFAULT_MEM = {"fill": "512M", "gigantic": "2560M"}
DEFAULT_APPEND = {"fill": "", "gigantic": "nokaslr init_on_alloc=0"}
GIGANTIC_ROWS = 5  # failures shown by format_summary


@dataclass(frozen=True, slots=True)
class LaunchOptions:
    """None for settle_s, mem and append means the workload's default
    (settle: the guest's, 0 for fill and 20 for gigantic; DEFAULT_MEM,
    DEFAULT_APPEND); an append given replaces the workload's default."""

    workload: str = "fill"
    rounds: int = 2
    size_mib: int = 300
    pause_s: int = 5
    settle_s: int | None = None
    duration_s: int = 30
    mem: str | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    baseline: bool = False
    no_balloon: bool = False
    console_log: Path | None = None
    timeout_s: int = 900
    accel: str = "auto"
    mem_path: Path | None = None
    share: str = "on"
    qemu: str | None = None
    socket_path: Path | None = None
    qemu_args: tuple[str, ...] = ()
    console_to_stderr: bool = False

    @property
    def guest_mem(self) -> str:
        return self.mem if self.mem is not None else DEFAULT_MEM[self.workload]

    @property
    def kernel_append(self) -> str:
        return self.append if self.append is not None else DEFAULT_APPEND[self.workload]

    @property
    def mode(self) -> str:
        if self.no_balloon:
            return "none"
        return "builtin" if self.baseline else "vhost-user"


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99 and max (all 0.0 when there are no samples)."""
    ordered = sorted(samples)
    result: dict[str, float] = {}
    for p in PERCENTILES:
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        result[f"p{p}"] = float(ordered[rank - 1]) if ordered else 0.0
    result["max"] = float(ordered[-1]) if ordered else 0.0
    return result


@dataclass(slots=True)
class MemorySampler:
    """QEMU's shared RAM in the host: RssShmem + HugetlbPages, in KiB."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    pid: int | None = None

    def read(self) -> int | None:
        if self.pid is None:
            return None
        try:
            text = Path(f"/proc/{self.pid}/status").read_text(encoding="ascii")
        except OSError:
            return None
        total = 0
        for line in text.splitlines():
            if line.startswith(("RssShmem:", "HugetlbPages:")):
                total += int(line.split()[1])
        return total

    async def run(self, clock: Callable[[], float]) -> None:
        while True:
            value = self.read()
            if value is not None:
                self.samples.append((clock(), value))
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    def between(self, start: float, end: float) -> list[int]:
        return [kib for t, kib in self.samples if start <= t <= end]

    def last_before(self, t: float) -> int | None:
        before = [kib for when, kib in self.samples if when <= t]
        return before[-1] if before else None


class Launch:
    """One run: backend (unless baseline) + run-guest.sh + console + sampler."""

    def __init__(
        self,
        options: LaunchOptions,
        settings: ServerSettings | None,
        note: Callable[[str], None],
        console: TextIO,
    ) -> None:
        self.options = options
        self.settings = settings
        self.note = note
        self.console_out = console
        self.t0 = time.monotonic()
        self.guest = GuestConsole()
        self.sampler = MemorySampler()
        self.server: Server | None = None
        self.records: list[ReportRecord] = []  # every report, in completion order
        self.qemu_errors: list[str] = []
        self.accel: str | None = None
        self.accel_reason: str | None = None
        self.qemu_version: str | None = None
        self.guest_kernel: str | None = None
        self.returncode: int | None = None
        self.interrupted = False
        self.run_guest_failure: str | None = None
        self._console_log: TextIO | None = None

    def clock(self) -> float:
        return time.monotonic() - self.t0

    # ---------------------------------------------------------------- run
    async def run(self) -> dict[str, Any]:
        env = ensure_provisioned(self.note)
        qemu = self.options.qemu or env.get("QEMU", "")
        self.qemu_version = qemu_version(qemu)
        if self.options.mode == "vhost-user":
            check_device(qemu, self.qemu_version)
        self.guest_kernel = (
            self.options.kernel.name if self.options.kernel else env.get("GUEST_KERNEL_VERSION")
        )
        socket_path = self._socket_path(env)
        listener = None
        try:
            if self.options.console_log is not None:
                self._console_log = self.options.console_log.open("w", encoding="utf-8")
            if self.settings is not None and socket_path is not None:
                self.server = Server(self.settings, record_hooks=[self.records.append])
                listener = listen_unix(socket_path)
            if self.server is not None and listener is not None:
                await self.server.start_services()
                self.server.start(listener)
                self.note(f"backend listening on {socket_path}")
            await self._run_qemu(self._command(socket_path))
        finally:
            if self.server is not None:
                await self.server.close()
            if listener is not None and socket_path is not None:
                listener.close()
                with contextlib.suppress(OSError):
                    socket_path.unlink()  # only a socket this run created
            if self._console_log is not None:
                self._console_log.close()
        return self.summary()

    def _socket_path(self, env: dict[str, str]) -> Path | None:
        if self.options.mode != "vhost-user":
            return None
        if self.options.socket_path is not None:
            path = self.options.socket_path
        else:
            run_dir = Path(env.get("VB_RUN_DIR", "/tmp"))
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / f"launch-{os.getpid()}.sock"
        if not path.parent.is_dir():
            raise LaunchError(f"the socket's directory {path.parent} does not exist")
        return path

    def _command(self, socket_path: Path | None) -> list[str]:
        o = self.options
        command = [
            "bash",
            str(configs_dir() / "run-guest.sh"),
            "--workload",
            o.workload,
            "--rounds",
            str(o.rounds),
            "--size",
            str(o.size_mib),
            "--pause",
            str(o.pause_s),
            "--duration",
            str(o.duration_s),
            "--mem",
            o.guest_mem,
            "--accel",
            o.accel,
            "--timeout",
            str(o.timeout_s),
            "--share",
            o.share,
            # The guest driver creates one queue per offered feature that has one.
            "--num-vqs",
            str(balloon_queues((self.settings or ServerSettings()).balloon.features).count),
        ]
        if o.settle_s is not None:
            command += ["--settle", str(o.settle_s)]
        if o.kernel_append:
            command += ["--append", o.kernel_append]
        for flag, value in (
            ("--kernel", o.kernel),
            ("--initrd", o.initrd),
            ("--mem-path", o.mem_path),
            ("--qemu", o.qemu),
        ):
            if value is not None:
                command += [flag, str(value)]
        if o.no_balloon:
            command.append("--no-balloon")
        elif socket_path is None:
            command.append("--builtin")
        else:
            command.append(str(socket_path))
        return command + list(o.qemu_args)

    async def _run_qemu(self, command: list[str]) -> None:
        loop = asyncio.get_running_loop()
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # our signals decide when QEMU stops
        )
        stop = asyncio.Event()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
                installed.append(signum)
        assert process.stdout is not None and process.stderr is not None
        tasks = [
            loop.create_task(self._read_console(process.stdout)),
            loop.create_task(self._read_notes(process.stderr)),
            loop.create_task(self.sampler.run(self.clock)),
        ]
        stopper = loop.create_task(self._stop_on(stop, process))
        guard = loop.create_task(self._guard(process))
        try:
            self.returncode = await process.wait()
            await asyncio.gather(tasks[0], tasks[1])
        finally:
            for task in (*tasks, stopper, guard):
                task.cancel()
            await asyncio.gather(*tasks, stopper, guard, return_exceptions=True)
            if process.returncode is None:
                _kill_group(process.pid, signal.SIGKILL)
                await process.wait()
            for signum in installed:
                loop.remove_signal_handler(signum)

    async def _stop_on(self, stop: asyncio.Event, process: asyncio.subprocess.Process) -> None:
        await stop.wait()
        self.interrupted = True
        self.note("stopping QEMU (SIGTERM)")
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)  # run-guest.sh passes it on to QEMU
        await asyncio.sleep(STOP_GRACE_S)
        self.note(f"QEMU still running after {STOP_GRACE_S:.0f} s: SIGKILL")
        _kill_group(process.pid, signal.SIGKILL)

    async def _guard(self, process: asyncio.subprocess.Process) -> None:
        """run-guest.sh enforces --timeout; this is the backstop if it cannot."""
        await asyncio.sleep(self.options.timeout_s + 30)
        self.note("run-guest.sh outlived its timeout: killing its process group")
        _kill_group(process.pid, signal.SIGKILL)

    async def _read_console(self, stream: asyncio.StreamReader) -> None:
        while line_bytes := await _readline(stream):
            line = line_bytes.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            now = self.clock()
            stamped = f"[{now:9.3f}] {line}\n"
            self.console_out.write(stamped)
            self.console_out.flush()
            if self._console_log is not None:
                self._console_log.write(stamped)
                self._console_log.flush()
            self.guest.feed(line, now)

    async def _read_notes(self, stream: asyncio.StreamReader) -> None:
        while line_bytes := await _readline(stream):
            line = line_bytes.decode(errors="replace").rstrip("\r\n")
            if not line.strip():
                continue
            now = self.clock()
            self.note(f"[{now:9.3f}] {line}")
            if self._console_log is not None:
                self._console_log.write(f"[{now:9.3f}] (host) {line}\n")
            if match := _PID_NOTE.match(line):
                self.sampler.pid = int(match.group(1))
            elif line.startswith("run-guest: accelerator: "):
                self._parse_accel(line.removeprefix("run-guest: accelerator: "))
            elif line.startswith("run-guest: FAILED: "):
                self.run_guest_failure = line.removeprefix("run-guest: FAILED: ")
            elif not line.startswith(("run-guest: ", "build-initramfs: ")):
                self.qemu_errors.append(line)

    def _parse_accel(self, text: str) -> None:
        name, _, rest = text.partition(" ")
        self.accel = name.rstrip(",")
        rest = rest.strip()
        if rest.startswith("because "):
            rest = rest.removeprefix("because ")
        self.accel_reason = rest or None

    # ------------------------------------------------------------ summary
    def memfd_freed(self) -> list[dict[str, Any]]:
        """Per round: QEMU's shared RAM when the guest freed, its lowest point
        within GIVE_BACK_WINDOW_S after (before the next fill), the difference."""
        rounds = []
        ordered = sorted(self.guest.rounds.values(), key=lambda r: r.number)
        for index, state in enumerate(ordered):
            if state.t_freed is None:
                continue
            end = state.t_freed + GIVE_BACK_WINDOW_S
            later = ordered[index + 1].t_fill_start if index + 1 < len(ordered) else None
            for limit in (later, self.guest.t_end_of_rounds):
                if limit is not None:
                    end = min(end, limit)
                    break
            start = state.t_filled if state.t_filled is not None else state.t_freed
            at_free = self.sampler.between(start, state.t_freed) or [
                v for v in [self.sampler.last_before(state.t_freed)] if v is not None
            ]
            after = self.sampler.between(state.t_freed, end)
            if not at_free or not after:
                rounds.append({"round": state.number, "freed_mib": state.size_mib})
                continue
            before_kib = max(at_free)
            low_kib = min(after)
            t_low = next(t for t, v in self.sampler.samples if v == low_kib and t >= state.t_freed)
            entry: dict[str, Any] = {
                "round": state.number,
                "freed_mib": state.size_mib,
                "shared_kib_at_free": before_kib,
                "shared_kib_low": low_kib,
                "given_back_bytes": (before_kib - low_kib) * 1024,
                "seconds_to_low": round(t_low - state.t_freed, 3),
                "window_s": round(end - state.t_freed, 3),
            }
            rounds.append(entry)
        return rounds

    def summary(self) -> dict[str, Any]:
        guest = self.guest
        ordered = sorted(guest.reports, key=lambda r: r.t_start_mono)
        guest_us = [r.duration_us for r in ordered]
        summary: dict[str, Any] = {
            "mode": self.options.mode,
            "workload": self.options.workload,
        }
        if self.server is not None:
            records = self.records
            totals = self.server.totals()
            settings = self.server.settings
            summary |= {
                "reports": len(records),
                "entries": sum(r.entries for r in records),
                "reported_bytes": sum(r.bytes for r in records),
                "freed_bytes": sum(r.freed_bytes for r in records),
                "hold_us": percentiles([r.kick_to_notify_ns / 1000 for r in records]),
                "discard": settings.balloon.discard.value,
                "injected": self.server.runtime.settings.describe(),
                "backend": {
                    "sessions": self.server.sessions_served,
                    "skipped_entries": totals.skipped_outside + totals.skipped_unaligned,
                    "discard_errors": totals.discard_errors,
                    "queue_errors": totals.queue_errors,
                    "hold_us_samples": [round(r.kick_to_notify_ns / 1000, 3) for r in records],
                },
            }
        summary |= {
            "guest_reports": len(guest_us),
            "guest_hold_us": {**percentiles(guest_us), "samples": guest_us},
            "guest_report_starts": [r.t_start_mono for r in ordered],
            "features": None
            if guest.features is None
            else {
                "mask": guest.features,
                "bits": guest.feature_bits,
                "names": [FEATURE_NAMES.get(b, f"bit{b}") for b in guest.feature_bits],
            },
            "page_reporting_order": guest.page_reporting_order,
            "integrity_ok": guest.integrity_ok,
            "memfd_freed": self.memfd_freed(),
        }
        if self.options.workload == "gigantic":
            summary["gigantic"] = self.gigantic_summary()
        summary |= {
            "qemu_version": self.qemu_version,
            "guest_kernel": self.guest_kernel,
            "accel": self.accel,
            "accel_reason": self.accel_reason,
            "qemu_exit": self.returncode,
            "guest_done": guest.done,
            "qemu_errors": self.qemu_errors,
            "interrupted": self.interrupted,
            "duration_s": round(self.clock(), 3),
        }
        return summary

    def gigantic_summary(self) -> dict[str, Any] | None:
        """The gigantic workload's counts and attributions (None when the
        guest printed nothing about it, e.g. your own initrd)."""
        run = self.guest.gigantic
        if run is None:
            return None
        backend = None
        if self.server is not None:
            backend = [
                BackendReport(
                    _ring_time_ns(r) / 1e9, tuple((gpa, length) for gpa, length in r.ranges)
                )
                for r in self.records
            ]
        return summarize_gigantic(
            run,
            [r.t_start_mono for r in self.guest.reports],
            [r.duration_us for r in self.guest.reports],
            backend,
        )

    def failure(self) -> str | None:
        """The one-sentence reason this run failed, or None."""
        if self.interrupted:
            return None
        if self.run_guest_failure is not None:
            return self.run_guest_failure
        first_error = self.qemu_errors[0] if self.qemu_errors else None
        if self.returncode == 124:
            return f"the guest did not power off within {self.options.timeout_s} s (QEMU killed)"
        if self.returncode not in (0, None):
            said = f": {first_error}" if first_error else ""
            return f"QEMU exited with status {self.returncode}{said}"
        if self.server is not None and self.server.totals().queue_errors:
            said = f" (QEMU said: {first_error})" if first_error else ""
            return (
                "the backend could not use the guest's rings: is guest RAM shared "
                f"(share=on, fd-backed)?{said}"
            )
        if self.server is not None and not self.records and first_error:
            return f"no report reached the backend; QEMU said: {first_error}"
        if self.guest.errors:
            return f"the guest workload failed: {self.guest.errors[0]}"
        if self.guest.balloon_absent and self.options.mode != "none":
            return "the guest found no balloon device"
        if (
            self.options.workload == "gigantic"
            and self.options.initrd is None
            and self.guest.done
            and (self.guest.gigantic is None or self.guest.gigantic.attempts is None)
        ):
            return "the guest finished without reporting any gigantic-page attempt"
        return None


def _ring_time_ns(record: ReportRecord) -> int:
    """When the chain reached the backend's ring walk: its pop time minus
    what was injected before the pop (the kick delay, the BQL wait at pop),
    so that random kick delays do not scatter the alignment."""
    kick = record.injected_ns.get("kick", 0)
    return record.t_popped_ns - kick - record.bql_wait_ns.get("pop", 0)


def _kill_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def format_summary(summary: dict[str, Any]) -> str:
    """A readable table of a launch summary."""

    def pct(values: dict[str, float] | None) -> str:
        if not values:
            return "-"
        return " ".join(f"{k} {values[k]:.0f}" for k in ("p50", "p90", "p99", "max"))

    rows: list[tuple[str, str]] = [("mode", summary["mode"])]
    if "workload" in summary:
        rows.append(("workload", summary["workload"]))
    if "reports" in summary:
        rows += [
            ("discard strategy", str(summary["discard"])),
            ("reports (backend)", f"{summary['reports']} ({summary['entries']} entries)"),
            ("reported", f"{summary['reported_bytes'] / MiB:.0f} MiB"),
            ("freed, backend's view", f"{summary['freed_bytes'] / MiB:.0f} MiB"),
            ("kick-to-notify (us)", pct(summary["hold_us"])),
        ]
    rows += [
        ("reports (guest ftrace)", str(summary["guest_reports"])),
        ("guest report (us)", pct(summary["guest_hold_us"])),
    ]
    for item in summary["memfd_freed"]:
        if "given_back_bytes" in item:
            rows.append(
                (
                    f"round {item['round']} given back",
                    f"{item['given_back_bytes'] / MiB:.0f} MiB of {item['freed_mib']} MiB freed "
                    f"(lowest after {item['seconds_to_low']:.1f} s)",
                )
            )
    if summary.get("gigantic"):
        rows += _gigantic_rows(summary["gigantic"])
    features = summary["features"]
    rows += [
        ("features", "-" if features is None else ",".join(features["names"])),
        ("page_reporting_order", str(summary["page_reporting_order"])),
        ("integrity", {True: "ok", False: "FAILED", None: "-"}[summary["integrity_ok"]]),
        ("QEMU", str(summary["qemu_version"])),
        ("guest kernel", str(summary["guest_kernel"])),
        ("accelerator", f"{summary['accel']} ({summary['accel_reason'] or 'asked for'})"),
        ("duration", f"{summary['duration_s']:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _gigantic_rows(g: dict[str, Any]) -> list[tuple[str, str]]:
    def fraction(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    rate = "-" if g["failure_rate"] is None else f"{100 * g['failure_rate']:.1f} %"
    rows = [
        (
            "1 GiB attempts",
            f"{g['attempts']} in {g['duration_s'] or 0:.1f} s (after a {g['settle_s']} s settle)",
        ),
        ("1 GiB failures", f"{g['failures']} ({rate})"),
    ]
    if g["isolation_failures"] is not None:
        rows += [
            (
                "  isolation test failed",
                f"{g['isolation_failures']} ({g['attributed']} attributed to a report, "
                f"{g['in_window']} while a report was in flight)",
            ),
            ("  never reached the test", str(g["not_tried"])),
            ("reporting passes", f"{g['passes']} ({g['passes_with_failures']} with failures)"),
            ("target range held", fraction(g["held_fraction"])),
            ("a report in flight", fraction(g["in_flight_fraction"])),
        ]
    for item in g["failures_detail"][:GIGANTIC_ROWS]:
        pfn = "-" if item["fin_pfn"] is None else f"{item['fin_pfn']:#x}"
        report = "-" if item["report"] is None else str(item["report"])
        rows.append(
            (
                f"  failure at {item['t_mono']:.3f}",
                f"test {item['test']}, first busy pfn {pfn}, report {report}, "
                f"pass {'-' if item['pass'] is None else item['pass']}",
            )
        )
    more = len(g["failures_detail"]) - GIGANTIC_ROWS
    if more > 0:
        rows.append(("  ...", f"{more} more failures (--json for all)"))
    return rows


async def _readline(stream: asyncio.StreamReader) -> bytes:
    """The next line; an over-long one (no newline within the stream's limit)
    comes back in pieces instead of ending the reader."""
    try:
        return await stream.readline()
    except asyncio.LimitOverrunError as overrun:
        return await stream.read(overrun.consumed) + b"\n"
    except ValueError:  # readline's wrapper of LimitOverrunError
        return await stream.read(65536) + b"\n"
