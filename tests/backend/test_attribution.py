"""Attributing a failed gigantic-page attempt to the report that held the page,
with hand-made windows, ranges and events (backend/qemu/attribution.py)."""

from __future__ import annotations

import pytest

from vhost_balloon.backend.qemu.attribution import (
    BackendReport,
    Window,
    align,
    attribute,
    covered_fraction,
    held_fraction,
    report_windows,
    reporting_passes,
    summarize_gigantic,
)
from vhost_balloon.backend.qemu.console import GiganticAttempt, GiganticRun, IsolationEvent

MiB = 1 << 20
GiB = 1 << 30
TARGET = (GiB // 4096, 2 * GiB // 4096)  # pfns of GPA 1-2 GiB


def _pfn(gpa: int) -> int:
    return gpa // 4096


# A report at guest time 10.0-10.1 s holding 4 MiB at GPA 1 GiB + 8 MiB.
HELD = Window(0, 10.0, 10.1, record=3, ranges=((GiB + 8 * MiB, 4 * MiB),))


def test_a_failure_inside_the_window_on_a_held_page_is_attributed() -> None:
    found = attribute(10.05, _pfn(GiB + 9 * MiB), [HELD])
    assert found.attributed and found.report == 3 and found.window == 0 and found.in_window


def test_a_failure_outside_every_window_is_not_attributed() -> None:
    found = attribute(10.5, _pfn(GiB + 9 * MiB), [HELD])
    assert not found.attributed and not found.in_window and found.window is None


def test_a_failure_on_a_page_outside_the_reported_ranges_is_not_attributed() -> None:
    found = attribute(10.05, _pfn(GiB + 12 * MiB), [HELD])  # just past the 4 MiB
    assert not found.attributed and found.in_window and found.window == 0


def test_the_slack_covers_isolation_just_before_and_putback_just_after() -> None:
    page = _pfn(GiB + 8 * MiB)
    assert attribute(9.998, page, [HELD], slack_s=0.005).attributed
    assert attribute(10.104, page, [HELD], slack_s=0.005).attributed
    assert not attribute(10.106, page, [HELD], slack_s=0.005).attributed


def test_without_backend_ranges_only_the_window_is_known() -> None:
    window = Window(0, 10.0, 10.1)  # QEMU's built-in device: no trace
    found = attribute(10.05, _pfn(GiB + 9 * MiB), [window])
    assert found.in_window and found.report is None and found.window == 0


def test_the_report_holding_the_page_wins_over_another_in_flight() -> None:
    other = Window(1, 10.0, 10.2, record=4, ranges=((GiB + 64 * MiB, 4 * MiB),))
    found = attribute(10.05, _pfn(GiB + 9 * MiB), [other, HELD])
    assert found.report == 3


def test_align_finds_the_offset_and_the_clock_rate() -> None:
    guest = [1.0, 3.0, 3.01, 5.0, 7.5]
    backend = [100.0] + [50.0 + 1.001 * g for g in guest] + [200.0]
    alignment = align(guest, backend)
    assert alignment is not None and alignment.offset == 1
    assert alignment.rate == pytest.approx(1.001) and alignment.residual_s < 1e-9
    assert alignment.plausible


def test_align_with_few_reports_fits_the_clock_offset_only() -> None:
    alignment = align([2.0], [1.0, 40.0])
    assert alignment is not None and alignment.offset == 0 and alignment.rate == 1.0
    assert align([], [1.0]) is None
    assert align([1.0, 2.0], [1.0]) is None


def test_an_alignment_with_large_residuals_is_not_plausible() -> None:
    alignment = align([0.0, 1.0, 2.0, 3.0], [0.0, 1.5, 1.6, 3.0])
    assert alignment is not None and not alignment.plausible


def test_report_windows_carry_the_aligned_records_ranges() -> None:
    alignment = align([5.0, 7.0, 9.0], [0.5, 5.0, 7.0, 9.0])
    assert alignment is not None
    records = [[(0, 4 * MiB)], [(GiB, 4 * MiB)], [(GiB + 4 * MiB, 2 * MiB)], [(2 * GiB, MiB)]]
    windows = report_windows([9.0, 5.0, 7.0], [1000.0, 2000.0, 3000.0], records, alignment)
    assert [(w.index, w.start, w.record) for w in windows] == [
        (0, 5.0, 1),
        (1, 7.0, 2),
        (2, 9.0, 3),
    ]
    assert windows[0].end == pytest.approx(5.002)
    assert windows[1].ranges == ((GiB + 4 * MiB, 2 * MiB),)


def test_passes_are_reports_less_than_a_second_apart() -> None:
    windows = [
        Window(0, 1.0, 1.1),
        Window(1, 1.2, 1.3),
        Window(2, 1.5, 1.6),
        Window(3, 4.0, 4.1),
        Window(4, 6.2, 6.3),
    ]
    passes = reporting_passes(windows)
    assert [p.windows for p in passes] == [(0, 1, 2), (3,), (4,)]
    assert passes[0].start == 1.0 and passes[0].end == 1.6


def test_covered_fraction_merges_overlaps_and_clips() -> None:
    assert covered_fraction([(0.0, 2.0), (1.0, 3.0), (8.0, 12.0)], 0.0, 10.0) == pytest.approx(0.5)
    assert covered_fraction([], 0.0, 10.0) == 0.0


def test_held_fraction_counts_only_reports_overlapping_the_target() -> None:
    windows = [
        Window(0, 1.0, 2.0, 0, ((GiB, 4 * MiB),)),  # in the target
        Window(1, 3.0, 5.0, 1, ((0, 4 * MiB),)),  # below it
        Window(2, 6.0, 7.0, 2, ((2 * GiB - 4 * MiB, 4 * MiB),)),  # its last 4 MiB
    ]
    assert held_fraction(windows, *TARGET, 0.0, 10.0) == pytest.approx(0.2)
    assert held_fraction([Window(0, 1.0, 2.0)], *TARGET, 0.0, 10.0) is None


def _run() -> GiganticRun:
    """Four attempts: 1 succeeds, 2 fails on a page report 1 held, 3 fails on a
    page no report held, 4 never reaches the isolation test."""
    start, end = TARGET
    attempts = [
        GiganticAttempt(1, 20.0, 20.03, True, "success"),
        GiganticAttempt(2, 21.0, 21.03, False, "fail"),
        GiganticAttempt(3, 22.0, 22.03, False, "fail"),
        GiganticAttempt(4, 23.0, 23.03, False, "none"),
    ]
    events = [
        IsolationEvent(20.02, start, end, end, True, 1),
        IsolationEvent(21.02, start, end, _pfn(GiB + 9 * MiB), False, 2),
        IsolationEvent(22.02, start, end, _pfn(GiB + 100 * MiB), False, 3),
    ]
    return GiganticRun(
        trace="on",
        settle_s=20,
        duration_s=4,
        attempts=4,
        failures=3,
        isolation_failures=2,
        events_count=3,
        t_start_mono=20.0,
        t_end_mono=24.0,
        attempt_list=attempts,
        events=events,
    )


# Guest reports: one at boot (5.0 s), two in the loop (21.0 and 21.2 s).
STARTS = [5.0, 21.0, 21.2]
DURATIONS_US = [10_000.0, 100_000.0, 50_000.0]
BACKEND = [
    BackendReport(1005.001, ((0, 4 * MiB),)),
    BackendReport(1021.001, ((GiB + 8 * MiB, 4 * MiB),)),
    BackendReport(1021.201, ((GiB + 200 * MiB, 4 * MiB),)),
]


def test_summary_with_the_backend_trace_attributes_by_ranges() -> None:
    g = summarize_gigantic(_run(), STARTS, DURATIONS_US, BACKEND)
    assert g["attribution"] == "report-ranges"
    assert (g["attempts"], g["failures"], g["failure_rate"]) == (4, 3, 0.75)
    assert (g["isolation_failures"], g["not_tried"]) == (2, 1)
    assert (g["attributed"], g["unattributed"], g["in_window"]) == (1, 1, 1)
    assert g["passes"] == 1 and g["passes_with_failures"] == 1
    assert g["target_pfns"] == list(TARGET)
    assert g["reports_in_loop"] == 2 and g["target_reports"] == 2
    assert g["duration_s"] == 4.0
    # Both loop reports overlap the target: 21.0-21.1 and 21.2-21.25 of 20-24.
    assert g["held_fraction"] == pytest.approx(0.15 / 4, abs=1e-4)
    assert g["in_flight_fraction"] == pytest.approx(0.15 / 4, abs=1e-4)
    by_attempt = {d["attempt"]: d for d in g["failures_detail"]}
    assert by_attempt[2] == {
        "attempt": 2,
        "t_mono": 21.02,
        "test": "fail",
        "fin_pfn": _pfn(GiB + 9 * MiB),
        "in_window": True,
        "window": 1,
        "report": 1,
        "pass": 0,
    }
    assert by_attempt[3]["report"] is None and by_attempt[3]["in_window"] is False
    assert by_attempt[4]["test"] == "none" and by_attempt[4]["fin_pfn"] is None


def test_summary_without_a_backend_attributes_by_window_only() -> None:
    g = summarize_gigantic(_run(), STARTS, DURATIONS_US, None)
    assert g["attribution"] == "window-only"
    assert g["attributed"] == 0 and g["unattributed"] == 2 and g["in_window"] == 1
    assert g["held_fraction"] is None and g["target_reports"] is None
    assert g["in_flight_fraction"] == pytest.approx(0.15 / 4, abs=1e-4)


def test_summary_without_a_balloon_has_no_reports() -> None:
    g = summarize_gigantic(_run(), [], [], None)
    assert g["attribution"] == "none"
    assert g["passes"] == 0 and g["in_flight_fraction"] == 0.0 and g["in_window"] == 0


def test_summary_without_tracing_keeps_the_loops_counts() -> None:
    run = GiganticRun(attempts=10, failures=2)
    g = summarize_gigantic(run, [], [], None)
    assert (g["attempts"], g["failures"], g["failure_rate"]) == (10, 2, 0.2)
    assert g["isolation_failures"] is None and g["attributed"] is None
    assert g["failures_detail"] == []


def test_one_late_backend_time_in_many_is_an_outlier_not_a_misalignment() -> None:
    guest = [float(2 * (i // 3) + 0.1 * (i % 3)) for i in range(24)]  # 8 passes of 3
    backend = [50.0 + g + 0.001 for g in guest]
    backend[8] += 0.1  # a backend descheduled for 100 ms
    alignment = align(guest, backend)
    assert alignment is not None and alignment.offset == 0
    assert alignment.outliers == 1 and alignment.pairs == 24 and alignment.plausible
    assert alignment.residual_s < 0.01


def test_a_shifted_sequence_is_not_plausible() -> None:
    guest = [float(2 * (i // 3) + 0.003 * (i % 3)) for i in range(24)]
    backend = [50.0 + g for g in guest]
    alignment = align(guest[1:], backend[:-1])  # guest report i is really backend i + 1
    assert alignment is not None and not alignment.plausible
