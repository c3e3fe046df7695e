"""The JSON summary of a mocked-guest run, and its table.

Percentiles are nearest-rank (protocol/samples.py), as in the backend's
launch summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vhost_balloon.guest.driver import RunResult
from vhost_balloon.protocol.samples import format_percentiles, percentiles
from vhost_balloon.protocol.units import two_columns
from vhost_balloon.protocol.virtio import feature_names


@dataclass(frozen=True, slots=True)
class RunContext:
    """What the summary needs besides the reports (the run's settings)."""

    capacity: int
    order: int
    memory_bytes: int
    regions: int
    indirect: bool
    event_idx: bool
    features: int
    queue_size: int
    discard: str | None = None
    config_change_msgs: int = 0
    kicks: int = 0
    calls: int = 0
    # BalloonDriver.describe() when the classic balloon ran (None: not wanted).
    balloon: dict[str, Any] | None = None


def build_summary(result: RunResult, context: RunContext) -> dict[str, Any]:
    """The JSON-ready summary object (see the module docs of guest.cli)."""
    reports = result.reports
    hold_us = [r.hold_ns / 1000 for r in reports]
    summary: dict[str, Any] = {
        "reports": len(reports),
        "entries": sum(r.entries for r in reports),
        "reported_bytes": sum(r.reported_bytes for r in reports),
        "freed_bytes": sum(r.freed_bytes for r in reports),
        "zeroed_bytes": sum(r.zeroed_bytes for r in reports),
        "hold_us": percentiles(hold_us),
        "discard": context.discard,
        "capacity": context.capacity,
        "order": context.order,
        "entry_bytes": 4096 << context.order,
        "memory_bytes": context.memory_bytes,
        "regions": context.regions,
        "queue_size": context.queue_size,
        "indirect": context.indirect,
        "event_idx": context.event_idx,
        "features": {"mask": context.features, "names": feature_names(context.features)},
        "integrity_ok": result.integrity_ok,
        "integrity_errors": result.integrity_errors,
        "config_change_msgs": context.config_change_msgs,
        "kicks": context.kicks,
        "calls": context.calls,
        "duration_s": round(result.duration_s, 6),
    }
    if context.balloon is not None:
        # Only with the balloon, so a reporting-only summary keeps its keys.
        summary["balloon"] = dict(context.balloon)
    return summary


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def format_table(summary: dict[str, Any]) -> str:
    """A readable two-column table of the summary."""
    hold = summary["hold_us"]
    rows = [
        ("reports", str(summary["reports"])),
        ("entries", f"{summary['entries']} x {_mib(summary['entry_bytes'])}"),
        ("reported", _mib(summary["reported_bytes"])),
        ("freed (memfd blocks)", _mib(summary["freed_bytes"])),
        ("read back as zero", _mib(summary["zeroed_bytes"])),
        ("hold window (us)", format_percentiles(hold, digits=1, separator="  ")),
        ("discard", summary["discard"] or "unknown"),
        ("capacity / order", f"{summary['capacity']} / {summary['order']}"),
        ("memory", f"{_mib(summary['memory_bytes'])} in {summary['regions']} region(s)"),
        ("queue size", str(summary["queue_size"])),
        ("indirect / event_idx", f"{summary['indirect']} / {summary['event_idx']}"),
        ("features", "|".join(summary["features"]["names"]) or "none"),
        ("kicks / calls", f"{summary['kicks']} / {summary['calls']}"),
        ("config change msgs", str(summary["config_change_msgs"])),
        (
            "integrity",
            "ok" if summary["integrity_ok"] else f"{summary['integrity_errors']} page(s) corrupted",
        ),
        ("duration", f"{summary['duration_s']:.3f} s"),
    ]
    balloon = summary.get("balloon")
    if balloon is not None:
        target = balloon["target_pages"]
        rows += [
            (
                "ballooned",
                f"{_mib(balloon['ballooned_bytes'])} ({balloon['ballooned_pages']} pages, "
                f"target {'unset' if target is None else target})",
            ),
            (
                "inflated / deflated",
                f"{balloon['inflated_pages']} / {balloon['deflated_pages']} pages in "
                f"{balloon['inflate_chains']} / {balloon['deflate_chains']} chains",
            ),
            (
                "balloon features",
                ", ".join(
                    name
                    for name, key in (
                        ("MUST_TELL_HOST", "must_tell_host"),
                        ("DEFLATE_ON_OOM", "deflate_on_oom"),
                        ("STATS_VQ", "stats_vq"),
                    )
                    if balloon[key]
                )
                or "none",
            ),
        ]
    return two_columns(rows)
