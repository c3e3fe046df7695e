"""A builtin-device launch summary with every key format_launch_summary
reads, for tests of the table's workload rows."""

from __future__ import annotations

from typing import Any


def builtin_summary(workload: str, **loops: Any) -> dict[str, Any]:
    """The summary of a run of `workload`, with `loops` (its "gigantic",
    "offline" or "vmem" object) added."""
    return {
        "mode": "builtin",
        "workload": workload,
        "guest_reports": 1,
        "guest_hold_us": {"p50": 5e4, "p90": 5e4, "p99": 5e4, "max": 5e4},
        "memfd_freed": [],
        "features": None,
        "page_reporting_order": 9,
        "integrity_ok": True,
        "qemu_version": "11.1.3",
        "guest_kernel": "6.12",
        "accel": "tcg",
        "accel_reason": None,
        "duration_s": 50.0,
        **loops,
    }
