"""A launch summary as a readable table (what `vhost-balloon launch` prints
without --json)."""

from __future__ import annotations

from typing import Any

from vhost_balloon.protocol.samples import format_percentiles
from vhost_balloon.protocol.units import two_columns

MiB = 1 << 20
GIGANTIC_ROWS = 5  # failures shown; --json has them all


def format_launch_summary(summary: dict[str, Any]) -> str:
    """A readable table of a launch summary."""

    def pct(values: dict[str, float] | None) -> str:
        return format_percentiles(values) if values else "-"

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
    fill = summary.get("fill")
    if fill:
        rows.append(
            (
                f"fill {fill['size_mib']} MiB (ms)",
                f"round 1 {fill['first_ms']}, later rounds {_ms(fill['later_ms'])}",
            )
        )
    if summary.get("gigantic"):
        rows += _gigantic_rows(summary["gigantic"])
    if summary.get("offline"):
        rows += _offline_rows(summary["offline"])
    if summary.get("vmem"):
        rows += _vmem_rows(summary["vmem"])
    pattern = summary.get("pattern")
    if pattern and pattern["complete"]:
        rows.append(
            (
                "patterns checked",
                f"{pattern['checked_mib']} MiB in {pattern['rounds']} rounds of "
                f"{pattern['files']} MiB: {pattern['corrupted_pages']} corrupted pages",
            )
        )
    features = summary["features"]
    rows += [
        ("features", "-" if features is None else ",".join(features["names"])),
        ("page_reporting_order", str(summary["page_reporting_order"])),
        ("integrity", {True: "ok", False: "FAILED", None: "-"}[summary["integrity_ok"]]),
        ("QEMU", str(summary["qemu_version"])),
        ("guest kernel", str(summary["guest_kernel"])),
        ("accelerator", f"{summary['accel']} ({summary['accel_reason'] or 'asked for'})"),
    ]
    qmp = summary.get("qmp") or {}
    if qmp:
        state = qmp.get("error") or f"{qmp.get('status')} at start"
        stopped = f", stopped with {qmp['stopped_with']}" if qmp.get("stopped_with") else ""
        rows.append(("QMP", f"{qmp.get('socket')} ({state}{stopped})"))
    rows.append(("duration", f"{summary['duration_s']:.1f} s"))
    return two_columns(rows)


def _ms(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "-"
    return f"p50 {stats['p50']:.1f}, p90 {stats['p90']:.1f}, max {stats['max']:.1f}"


def _zones(g: dict[str, Any]) -> list[tuple[str, str]]:
    zones = g.get("zones_mib")
    if not zones:
        return []
    text = "; ".join(
        f"{zone} {', '.join(f'{a}-{b}' for a, b in ranges)} MiB" for zone, ranges in zones.items()
    )
    return [("zones", text)]


def _try_again_rows(g: dict[str, Any]) -> list[tuple[str, str]]:
    again = g.get("try_again")
    if not again:
        return []
    retries = again["retries"]
    tries = "-" if retries is None else f"p50 {retries['p50']}, max {retries['max']}"
    return [
        (
            "try again -> works",
            f"{again['requests_retried']} retried ({again['never_succeeded']} never worked); "
            f"retries {tries}",
        ),
        ("  time to success (ms)", _ms(again["time_to_success_ms"])),
    ]


def _vmem_rows(v: dict[str, Any]) -> list[tuple[str, str]]:
    if v.get("error"):
        return [("virtio-mem", str(v["error"]))]
    if v.get("unplugs") is None:
        return [("virtio-mem", "the guest's loop never started")]
    seconds = v["unplug_seconds"]
    took = "-" if seconds is None else f"p50 {seconds['p50']:.2f}, max {seconds['max']:.2f} s"
    return [
        (
            "virtio-mem unplugs",
            f"{v['unplugs']} of {v['plug_bytes'] >> 20} MiB ({v['unfinished']} unfinished): {took}",
        ),
        ("  waited for the retry timer", f"{v['waited_for_retry_timer']} (>= 50 s, or unfinished)"),
        (
            "  isolation tests failed",
            f"{v['isolation_failures']} of {v['isolation_tests']} "
            f"({v['attributed']} attributed to a report)",
        ),
    ]


def _offline_rows(g: dict[str, Any]) -> list[tuple[str, str]]:
    blocks = g.get("offline_blocks") or {}
    refused = ",".join(str(b) for b in blocks.get("refused", [])) or "none"
    rows = [
        *_zones(g),
        (
            "offlines",
            f"{g['attempts']} in {g['duration_s'] or 0:.1f} s of blocks "
            f"{','.join(str(b) for b in blocks.get('usable', []))} (refused: {refused})",
        ),
        ("  failed", str(g["failures"])),
        ("  offline (ms)", _ms(g.get("op_ms"))),
    ]
    if g["isolation_failures"] is not None:
        rows.append(
            (
                "  had to retry",
                f"{g['isolation_failures']} ({g['attributed']} attributed to a report, "
                f"{g['in_window']} while a report was in flight)",
            )
        )
    return rows + _try_again_rows(g)


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
        *_zones(g),
        *_try_again_rows(g),
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
