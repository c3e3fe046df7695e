"""Which free page report made a gigantic-page attempt fail (pure functions).

The real guest's gigantic workload (qemu-configs/guest-init.sh,
`vb.workload=gigantic`) prints, on the guest's CLOCK_MONOTONIC (ftrace's
`mono` clock, one ring buffer for all of them):

- one window per free page report: `virtballoon_free_page_report` entry and
  return (function_graph), i.e. from the kick to the used buffer;
- one `page_isolation:test_pages_isolated` event per attempt that reached
  the isolation test, with the first busy pfn (`fin_pfn`) when it failed.

The backend's trace has one record per report, with the reported ranges
(guest-physical address, length) and host timestamps. The driver has one
report in flight at a time, so the two sequences are the same reports in the
same order: `align` finds where the guest's run sits in the backend's (by
the time each report reached the backend's ring walk: its pop time less
the kick delay and BQL wait injected before the pop), and
`report_windows` pairs each guest window with its record's ranges.

A failed isolation test at guest time t with first busy pfn p is then
attributed to the report whose window holds t (with `SLACK_S` either side:
the kernel pulls the pages off the free lists just before it calls
`virtballoon_free_page_report` and puts them back just after it returns)
and whose ranges hold p. Without a backend trace (QEMU's built-in device)
only the window is known: `in_window` says whether a report was in flight,
the report stays unknown.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vhost_balloon.backend.qemu.console import GiganticAttempt, GiganticRun, IsolationEvent
from vhost_balloon.backend.qemu.retries import op_durations_ms, try_again

PAGE_SIZE = 4096
# Pages are isolated while the reporting worker walks a free list, just
# before the report function is entered, and put back under the zone lock
# just after it returns: microseconds natively, up to a few ms under TCG.
SLACK_S = 0.005
# Reports closer than this belong to one reporting pass (the worker reports
# back to back within a pass and waits 2 s between passes).
PASS_GAP_S = 1.0
# An alignment is believable when the backend's times lie within this of the
# line fitted through (guest start, backend time): the backend sees a report
# well under 50 ms after the guest's trace entry...
MAX_RESIDUAL_S = 0.05
# ...except for rare outliers (a backend descheduled on a loaded host), at
# most this share of the pairs; a wrong offset puts every pass boundary off by
# about the 2 s between passes.
MAX_OUTLIER_SHARE = 0.1
RATE_BOUNDS = (0.9, 1.1)


@dataclass(frozen=True, slots=True)
class Alignment:
    """Guest report i is backend record i + offset; host seconds =
    intercept + rate * guest seconds (least squares); `outliers` pairs lie
    more than MAX_RESIDUAL_S off that line, the others at most residual_s."""

    offset: int
    rate: float
    residual_s: float
    outliers: int = 0
    pairs: int = 0

    @property
    def plausible(self) -> bool:
        low, high = RATE_BOUNDS
        return (
            self.residual_s <= MAX_RESIDUAL_S
            and self.outliers <= MAX_OUTLIER_SHARE * self.pairs
            and low < self.rate < high
        )


def align(
    guest_starts: Sequence[float],
    backend_times: Sequence[float],
    max_residual_s: float = MAX_RESIDUAL_S,
) -> Alignment | None:
    """Where the guest's run of reports sits in the backend's (both in start
    order), and how fast the guest's clock runs against the host's.

    For each offset, a least-squares line through (guest start, backend
    time); the offset with the fewest pairs off the line by more than
    max_residual_s wins, then the one with the smallest largest residual
    among the others, ties to the earliest; its slope is the rate. With
    fewer than 3 guest reports the rate is taken as 1 (only the clock offset
    is fitted). None when the guest has no report or more than the
    backend."""
    count = len(guest_starts)
    if count == 0 or count > len(backend_times):
        return None
    best: tuple[int, float, int, float] | None = None  # outliers, residual, offset, slope
    xs = list(guest_starts)
    mean_x = sum(xs) / count
    spread = sum((x - mean_x) ** 2 for x in xs)
    for offset in range(len(backend_times) - count + 1):
        ys = list(backend_times[offset : offset + count])
        mean_y = sum(ys) / count
        if count >= 3 and spread > 0:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        else:
            slope = 1.0
        residuals = [abs(y - (mean_y + slope * (x - mean_x))) for x, y in zip(xs, ys, strict=True)]
        outliers = sum(1 for r in residuals if r > max_residual_s)
        inlier = max((r for r in residuals if r <= max_residual_s), default=0.0)
        key = (outliers, inlier, offset, slope)
        if best is None or key[:2] < best[:2]:
            best = key
    assert best is not None
    outliers, residual, offset, slope = best
    return Alignment(offset, slope, residual, outliers, count)


@dataclass(frozen=True, slots=True)
class Window:
    """One report as the guest saw it (guest CLOCK_MONOTONIC seconds)."""

    index: int  # the guest's report number, in start order
    start: float
    end: float
    record: int | None = None  # index of the backend's trace record, if known
    ranges: tuple[tuple[int, int], ...] | None = None  # (gpa, length), if known

    def holds_time(self, t: float, slack_s: float = SLACK_S) -> bool:
        return self.start - slack_s <= t <= self.end + slack_s

    def holds_pfn(self, pfn: int) -> bool:
        address = pfn * PAGE_SIZE
        return any(gpa <= address < gpa + length for gpa, length in self.ranges or ())

    def overlaps_pfns(self, start_pfn: int, end_pfn: int) -> bool:
        low, high = start_pfn * PAGE_SIZE, end_pfn * PAGE_SIZE
        return any(gpa < high and low < gpa + length for gpa, length in self.ranges or ())


def report_windows(
    starts: Sequence[float],
    durations_us: Sequence[float],
    records: Sequence[Sequence[tuple[int, int]]] | None = None,
    alignment: Alignment | None = None,
) -> list[Window]:
    """The guest's report windows in start order; with the backend's records
    (their ranges, in trace order) and an alignment, each window carries its
    record's index and ranges."""
    pairs = sorted(zip(starts, durations_us, strict=True))
    windows = []
    for index, (start, duration_us) in enumerate(pairs):
        record: int | None = None
        ranges: tuple[tuple[int, int], ...] | None = None
        if records is not None and alignment is not None:
            candidate = index + alignment.offset
            if 0 <= candidate < len(records):
                record = candidate
                ranges = tuple((int(gpa), int(length)) for gpa, length in records[candidate])
        windows.append(Window(index, start, start + duration_us / 1e6, record, ranges))
    return windows


@dataclass(frozen=True, slots=True)
class Pass:
    """Reports no more than PASS_GAP_S apart: one run of the reporting worker."""

    index: int
    start: float
    end: float
    windows: tuple[int, ...]


def reporting_passes(windows: Sequence[Window], gap_s: float = PASS_GAP_S) -> list[Pass]:
    """Group windows (in start order) into passes: a gap of more than gap_s
    between one report's end and the next one's start starts a new pass."""
    passes: list[Pass] = []
    group: list[Window] = []
    for window in sorted(windows, key=lambda w: w.start):
        if group and window.start - max(w.end for w in group) > gap_s:
            passes.append(_pass(len(passes), group))
            group = []
        group.append(window)
    if group:
        passes.append(_pass(len(passes), group))
    return passes


def _pass(index: int, group: list[Window]) -> Pass:
    return Pass(index, group[0].start, max(w.end for w in group), tuple(w.index for w in group))


def passes_between(passes: Sequence[Pass], start: float, end: float) -> list[Pass]:
    """The passes that overlap [start, end], renumbered from 0."""
    inside = [p for p in passes if p.start <= end and p.end >= start]
    return [Pass(i, p.start, p.end, p.windows) for i, p in enumerate(inside)]


def pass_at(passes: Sequence[Pass], t: float, slack_s: float = SLACK_S) -> int | None:
    """The index of the pass running at t (with slack either side), or None."""
    for item in passes:
        if item.start - slack_s <= t <= item.end + slack_s:
            return item.index
    return None


@dataclass(frozen=True, slots=True)
class Attribution:
    window: int | None  # the guest report held at t that holds the pfn (else in flight at t)
    report: int | None  # that report's backend record index, when its ranges hold the pfn
    in_window: bool  # a report was in flight at t (with slack)

    @property
    def attributed(self) -> bool:
        return self.report is not None


def attribute(
    t: float, pfn: int, windows: Sequence[Window], slack_s: float = SLACK_S
) -> Attribution:
    """Which report held page `pfn` at guest time t: the window must hold t
    (with slack) and its backend ranges must hold the page."""
    in_flight = [w for w in windows if w.holds_time(t, slack_s)]
    for window in in_flight:
        if window.ranges is not None and window.holds_pfn(pfn):
            return Attribution(window.index, window.record, True)
    if in_flight:
        return Attribution(in_flight[0].index, None, True)
    return Attribution(None, None, False)


def covered_fraction(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """The fraction of [start, end] covered by the union of intervals."""
    if end <= start:
        return 0.0
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
    covered = 0.0
    current_start: float | None = None
    current_end = start
    for a, b in clipped:
        if current_start is None or a > current_end:
            if current_start is not None:
                covered += current_end - current_start
            current_start, current_end = a, b
        else:
            current_end = max(current_end, b)
    if current_start is not None:
        covered += current_end - current_start
    return covered / (end - start)


def held_fraction(
    windows: Sequence[Window], start_pfn: int, end_pfn: int, start: float, end: float
) -> float | None:
    """The fraction of [start, end] during which a report whose ranges overlap
    [start_pfn, end_pfn) was in flight; None when no window has ranges."""
    if not any(w.ranges is not None for w in windows):
        return None
    held = [(w.start, w.end) for w in windows if w.overlaps_pfns(start_pfn, end_pfn)]
    return covered_fraction(held, start, end)


def most_common_range(ranges: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The (start_pfn, end_pfn) most isolation tests were about."""
    if not ranges:
        return None
    return Counter(ranges).most_common(1)[0][0]


@dataclass(frozen=True, slots=True)
class BackendReport:
    """What attribution needs of one backend trace record."""

    t_popped_s: float  # when it reached the ring walk (pop less injected waits): host mono s
    ranges: tuple[tuple[int, int], ...]  # (gpa, length)


def zone_ranges_mib(
    block_mib: int | None, zone_blocks: dict[str, list[int]]
) -> dict[str, list[list[int]]] | None:
    """Each zone's online memory as [start, end) MiB ranges of guest physical
    memory, contiguous blocks merged (None when the guest did not say)."""
    if block_mib is None:
        return None
    ranges: dict[str, list[list[int]]] = {}
    for zone, blocks in zone_blocks.items():
        merged: list[list[int]] = []
        for block in sorted(blocks):
            start = block * block_mib
            if merged and merged[-1][1] == start:
                merged[-1][1] = start + block_mib
            else:
                merged.append([start, start + block_mib])
        ranges[zone] = merged
    return ranges


def summarize_gigantic(
    run: GiganticRun,
    report_starts: Sequence[float],
    report_durations_us: Sequence[float],
    backend: Sequence[BackendReport] | None,
    slack_s: float = SLACK_S,
) -> dict[str, Any]:
    """The launch summary's "gigantic" object (docs/qemu.md lists its keys).

    `backend` is the backend's trace in trace order (None without a backend:
    QEMU's built-in device or no balloon device); report i of the guest is
    matched to record i + offset (see `align`). Without the guest's trace of
    its attempts (`traced`), only the loop's own counts are known."""
    attempts, failures = _attempt_counts(run)
    traced = bool(run.attempt_list)
    matched = match_windows(report_starts, report_durations_us, backend)
    windows, usable = matched.windows, matched.usable
    start, end = _loop_span(run)
    loop_passes = passes_between(reporting_passes(windows), start, end) if traced else []
    target = most_common_range([(e.start_pfn, e.end_pfn) for e in run.events])
    details = failure_details(run, windows, loop_passes, slack_s)
    tally = _FailureTally.of(details)
    duration = end - start if traced else None
    in_loop = [w for w in windows if w.end >= start and w.start <= end]
    return {
        "attempts": attempts,
        "failures": failures,
        "failure_rate": round(failures / attempts, 4) if attempts else None,
        "isolation_tests": len(run.events) if traced else None,
        "isolation_failures": tally.isolation_failures if traced else None,
        "not_tried": tally.not_tried if traced else None,
        "attributed": tally.attributed if traced else None,
        "unattributed": tally.isolation_failures - tally.attributed if traced else None,
        "in_window": tally.in_window if traced else None,
        "attribution": matched.method if traced else "none",
        "passes": len(loop_passes) if traced else None,
        "passes_with_failures": len(tally.failed_passes) if traced else None,
        "duration_s": round(duration, 3) if duration is not None else run.duration_s,
        "settle_s": run.settle_s,
        "target_pfns": list(target) if target is not None else None,
        "held_fraction": _rounded(held_fraction(windows, *target, start, end))
        if traced and target is not None
        else None,
        "in_flight_fraction": _rounded(
            covered_fraction([(w.start, w.end) for w in windows], start, end)
        )
        if traced
        else None,
        "reports_in_loop": len(in_loop) if traced else None,
        "target_reports": sum(1 for w in in_loop if w.overlaps_pfns(*target))
        if traced and target is not None and usable is not None
        else None,
        "alignment": None if matched.alignment is None else _alignment_fields(matched.alignment),
        "zones_mib": zone_ranges_mib(run.block_mib, run.zone_blocks),
        "movable_gigantic_pages": run.movable_gigantic_pages,
        "op": run.op,
        "offline_blocks": None
        if run.offline_usable is None
        else {"usable": run.offline_usable, "refused": run.offline_refused or []},
        "op_ms": op_durations_ms(run.attempt_list),
        "try_again": try_again(run.op, run.attempt_list),
        "slack_s": slack_s,
        "trace": run.trace,
        "failures_detail": details,
    }


def _attempt_counts(run: GiganticRun) -> tuple[int, int]:
    """Attempts and failures: the loop's own counts, else its traced attempts."""
    attempts = run.attempts if run.attempts is not None else len(run.attempt_list)
    failures = (
        run.failures if run.failures is not None else sum(1 for a in run.attempt_list if not a.ok)
    )
    return attempts, failures


@dataclass(frozen=True, slots=True)
class MatchedWindows:
    """The guest's report windows, with the backend's ranges when the two
    sequences align plausibly (`usable`)."""

    windows: list[Window]
    alignment: Alignment | None  # None without a backend or when nothing aligns
    usable: Alignment | None  # the alignment, when plausible

    @property
    def method(self) -> str:
        """How failures can be attributed: by the reports' ranges, by their
        windows only, or not at all (no report)."""
        if self.usable is not None:
            return "report-ranges"
        return "window-only" if self.windows else "none"


def match_windows(
    report_starts: Sequence[float],
    report_durations_us: Sequence[float],
    backend: Sequence[BackendReport] | None,
) -> MatchedWindows:
    """Report windows on the guest's clock, with the backend's ranges when the
    two sequences align."""
    alignment: Alignment | None = None
    usable: Alignment | None = None
    if backend is not None:
        alignment = align(sorted(report_starts), [r.t_popped_s for r in backend])
        usable = alignment if alignment is not None and alignment.plausible else None
    windows = report_windows(
        report_starts,
        report_durations_us,
        [r.ranges for r in backend] if backend is not None else None,
        usable,
    )
    return MatchedWindows(windows, alignment, usable)


def failure_details(
    run: GiganticRun,
    windows: Sequence[Window],
    passes: Sequence[Pass],
    slack_s: float = SLACK_S,
) -> list[dict[str, Any]]:
    """One entry per failed attempt: its isolation test, the report that
    held the first busy page (if any) and the reporting pass running then.
    An offline does not fail on a busy page: offline_pages() tests again
    until the range is isolated, so an offline that had to retry is the
    entry, attributed by its first failed test."""
    by_attempt: dict[int, list[IsolationEvent]] = {}
    for event in run.events:
        by_attempt.setdefault(event.attempt, []).append(event)
    details: list[dict[str, Any]] = []
    for attempt in run.attempt_list:
        if attempt.ok and not (run.op == "offline" and attempt.retries):
            continue
        detail = _failure_detail(attempt, by_attempt.get(attempt.index, []), windows, slack_s)
        detail["pass"] = pass_at(passes, detail["t_mono"], slack_s)
        details.append(detail)
    return details


@dataclass(frozen=True, slots=True)
class _FailureTally:
    isolation_failures: int  # the isolation test failed
    not_tried: int  # the attempt never reached the test
    attributed: int  # failed on a page a report held
    in_window: int  # failed while a report was in flight
    failed_passes: frozenset[int]  # passes during which a test failed

    @classmethod
    def of(cls, details: Sequence[dict[str, Any]]) -> _FailureTally:
        failed = [d for d in details if d["test"] == "fail"]
        return cls(
            isolation_failures=len(failed),
            not_tried=sum(1 for d in details if d["test"] == "none"),
            attributed=sum(1 for d in failed if d["report"] is not None),
            in_window=sum(1 for d in failed if d["in_window"]),
            failed_passes=frozenset(d["pass"] for d in failed if d["pass"] is not None),
        )


def _alignment_fields(alignment: Alignment) -> dict[str, Any]:
    return {
        "offset": alignment.offset,
        "rate": round(alignment.rate, 6),
        "residual_s": round(alignment.residual_s, 6),
        "outliers": alignment.outliers,
        "pairs": alignment.pairs,
        "plausible": alignment.plausible,
    }


def _loop_span(run: GiganticRun) -> tuple[float, float]:
    if run.t_start_mono is not None and run.t_end_mono is not None and run.t_end_mono > 0:
        return run.t_start_mono, run.t_end_mono
    if not run.attempt_list:
        return 0.0, 0.0
    first, last = run.attempt_list[0], run.attempt_list[-1]
    return first.t_mono, last.t_end_mono if last.t_end_mono is not None else last.t_mono


def _failure_detail(
    attempt: GiganticAttempt,
    events: list[IsolationEvent],
    windows: Sequence[Window],
    slack_s: float,
) -> dict[str, Any]:
    failed = [e for e in events if not e.ok]
    if not failed:
        return {
            "attempt": attempt.index,
            "t_mono": attempt.t_mono,
            "test": "success" if events else "none",
            "fin_pfn": None,
            "in_window": None,
            "window": None,
            "report": None,
        }
    event = failed[-1]
    found = attribute(event.t_mono, event.fin_pfn, windows, slack_s)
    return {
        "attempt": attempt.index,
        "t_mono": event.t_mono,
        "test": "fail",
        "fin_pfn": event.fin_pfn,
        "in_window": found.in_window,
        "window": found.window,
        "report": found.report,
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
