"""The vmem workload's summary: each unplug the host asked for, how long it
took, the isolation tests virtio-mem's alloc_contig_range() made meanwhile,
and the report that held the page of each failed one.

Host and guest times meet through the loop's start line: the host stamps
it on arrival, and it carries the guest's uptime (CLOCK_BOOTTIME, the
monotonic clock of a guest that never suspends, to 10 ms), so an unplug
[t, t + seconds] on the host's clock is [t - offset, ...] on ftrace's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vhost_balloon.backend.qemu.attribution import (
    SLACK_S,
    BackendReport,
    attribute,
    match_windows,
)
from vhost_balloon.backend.qemu.console import GiganticRun, IsolationEvent
from vhost_balloon.backend.qemu.retries import p50_p90_max
from vhost_balloon.backend.qemu.vmem_steps import RETRY_TIMER_MIN_S

CONSOLE_SLACK_S = 0.05  # the loop line's trip through the serial console, and uptime's 10 ms


def summarize_vmem(
    run: GiganticRun | None,
    steps: dict[str, Any] | None,
    report_starts: Sequence[float],
    report_durations_us: Sequence[float],
    backend: Sequence[BackendReport] | None,
    *,
    slack_s: float = SLACK_S,
) -> dict[str, Any]:
    """The launch summary's "vmem" object (docs/qemu.md lists its keys)."""
    requests = list((steps or {}).get("requests", []))
    summary: dict[str, Any] = {k: v for k, v in (steps or {}).items() if k != "requests"}
    if run is None or run.t_loop_start is None or run.t_loop_start_guest is None:
        return summary | {"requests": requests, "unplugs": None}
    offset = run.t_loop_start - run.t_loop_start_guest
    windows = match_windows(report_starts, report_durations_us, backend).windows
    unplugs = []
    for request in requests:
        if request["kind"] != "unplug":
            continue
        start = request["t_request"] - offset - CONSOLE_SLACK_S
        seconds = request["seconds"]
        end = (request["t_request"] + seconds if seconds is not None else float("inf")) - offset
        events = [e for e in run.events if start <= e.t_mono <= end + CONSOLE_SLACK_S]
        unplugs.append(_unplug(request, events, windows, slack_s))
    done = [u["seconds"] for u in unplugs if u["seconds"] is not None]
    failed = [d for u in unplugs for d in u["failed_tests"]]
    retried = [u for u in unplugs if u["failed_tests"]]
    return summary | {
        "requests": requests,
        "unplugs": len(unplugs),
        "unplug_seconds": p50_p90_max(done),
        "unfinished": sum(1 for u in unplugs if u["seconds"] is None),
        "waited_for_retry_timer": sum(
            1 for u in unplugs if u["seconds"] is None or u["seconds"] >= RETRY_TIMER_MIN_S
        ),
        "isolation_tests": sum(u["isolation_tests"] for u in unplugs),
        "isolation_failures": len(failed),
        "attributed": sum(1 for d in failed if d["report"] is not None),
        "unattributed": sum(1 for d in failed if d["report"] is None),
        "try_again": {
            "requests_retried": len(retried),
            "never_succeeded": sum(1 for u in retried if u["seconds"] is None),
            "time_to_success_ms": p50_p90_max(
                [u["seconds"] * 1000 for u in retried if u["seconds"] is not None]
            ),
            "time_to_success_samples_ms": sorted(
                u["seconds"] * 1000 for u in retried if u["seconds"] is not None
            ),
        },
        "unplug_detail": unplugs,
    }


def _unplug(
    request: dict[str, Any], events: list[IsolationEvent], windows: Any, slack_s: float
) -> dict[str, Any]:
    failed = []
    for event in events:
        if event.ok:
            continue
        found = attribute(event.t_mono, event.fin_pfn, windows, slack_s)
        failed.append({"t_mono": event.t_mono, "fin_pfn": event.fin_pfn, "report": found.report})
    return {
        "t_request": request["t_request"],
        "seconds": request["seconds"],
        "isolation_tests": len(events),
        "failed_tests": failed,
    }
