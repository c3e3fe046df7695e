"""Latency histograms per session, rendered in the Prometheus text format.

Histograms are HDR histograms in microseconds (1 us .. 60 s, 3 significant
digits: every value is kept to within 0.1%). Each also keeps the exact sum
and maximum in nanoseconds, because a summary's `_sum` from HDR's mean would
be an approximation and HDR's mean walks the whole counts array.

The histograms are used on the event loop thread only; nothing is locked.
The HTTP endpoint (metrics_http.py) serves from a thread of its own and asks
that loop for the text.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from hdrh.histogram import HdrHistogram

from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.protocol.samples import PERCENTILE_KEYS, PERCENTILES

LOG = logging.getLogger("vhost_balloon.metrics")

LOWEST_US = 1
HIGHEST_US = 60_000_000  # 60 s; longer values are counted as 60 s (exact max kept)
SIGNIFICANT_DIGITS = 3
QUANTILES = tuple(p / 100 for p in PERCENTILES)  # 0.5, 0.9, 0.99
FIXED = ("hold", "discard", "bql_wait")
INJECTED_PREFIX = "injected:"  # + the injection point, e.g. "injected:publish"
TOTAL_SESSION = "all"  # the session label of the totals over every session
ENDED_KEPT = 64  # ended sessions whose summaries stay exported

COUNTERS = (
    ("reports", "Reports handled (used entries published)."),
    ("entries", "Entries in the reports."),
    ("reported_bytes", "Bytes the guest reported free."),
    ("freed_bytes", "Bytes the host really freed (allocated blocks before - after)."),
    ("skipped_entries", "Entries not discarded: outside guest memory or unaligned."),
    ("discard_errors", "Discard syscalls that failed."),
    ("queue_errors", "Virtqueues broken by a malformed ring."),
    ("inflated_pages", "4 KiB pages the guests ballooned (inflate chains)."),
    ("inflate_freed_bytes", "Bytes the host really freed for inflated pages."),
    ("deflated_pages", "4 KiB pages the guests took back (deflate chains)."),
)
SUMMARIES = (
    ("hold", "hold_seconds", "Kick to notification (or publish when none was sent) per report."),
    ("discard", "discard_seconds", "Time spent discarding one report's entries."),
    ("bql_wait", "bql_wait_seconds", "Time a report waited for the modelled big lock."),
)
INJECTED_HELP = "Delay injected per report at each injection point."


@dataclass(frozen=True, slots=True)
class Summary:
    """A histogram's numbers at one moment; what the endpoint shows."""

    count: int
    sum_ns: int
    max_ns: int
    quantiles_us: tuple[float, ...]  # in QUANTILES order; 0.0 when count == 0

    def percentiles(self) -> dict[str, float]:
        """The keys of protocol.samples.percentiles(), and "count"."""
        return {
            **dict(zip(PERCENTILE_KEYS, self.quantiles_us, strict=True)),
            "max": self.max_ns / 1000,
            "count": float(self.count),
        }


_EMPTY = Summary(0, 0, 0, (0.0,) * len(QUANTILES))


@dataclass(frozen=True, slots=True)
class Gauge:
    """A gauge with one sample per label set (e.g. per live session)."""

    name: str  # without the vhost_balloon_ prefix
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]]


class _Series:
    def __init__(self) -> None:
        # Made on the first value: its counts are 120 KiB that malloc keeps
        # (fragmented) after a session ends, so a session that never reports
        # (a malformed connection, a front-end that only probes) must not make
        # one; 1,200 of them grew a serve process by 4.4 MiB.
        self._hdr: HdrHistogram | None = None
        self.count = 0
        self.sum_ns = 0
        self.max_ns = 0
        self._cached = _EMPTY

    def add(self, value_ns: int) -> None:
        if value_ns < 0:  # a missing timestamp, not a latency
            return
        if self._hdr is None:
            self._hdr = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self._hdr.record_value(min((value_ns + 500) // 1000, HIGHEST_US))
        self.count += 1
        self.sum_ns += value_ns
        self.max_ns = max(self.max_ns, value_ns)

    def summary(self) -> Summary:
        # Cached by count: an idle or ended session costs nothing per scrape.
        if self._cached.count != self.count:
            assert self._hdr is not None  # made by the first add
            found = self._hdr.get_percentile_to_value_dict([q * 100 for q in QUANTILES])
            # HDR answers the top of a value's bucket, which can pass the real max.
            top = self.max_ns / 1000
            values = tuple(min(float(found[q * 100]), top) for q in QUANTILES)
            self._cached = Summary(self.count, self.sum_ns, self.max_ns, values)
        return self._cached


class Histograms:
    """HDR histograms in microseconds of one session (or of all of them):
    hold (kick -> notify), discard (t_discard_done - t_discard_start),
    bql_wait, and the delay injected at each injection point.

    Queue threads record (several at once into the totals) while /metrics
    reads from its own thread: each Histograms has a lock of its own.
    """

    def __init__(self, parent: Histograms | None = None) -> None:
        self._parent = parent  # the totals, fed with every record too
        self._series: dict[str, _Series] = {name: _Series() for name in FIXED}
        self._lock = threading.Lock()

    def record(
        self,
        record: ReportRecord,
        bql_wait_ns: int = 0,
        injected_ns: Mapping[str, int] | None = None,
    ) -> None:
        """Add one report. bql_wait_ns is recorded for every report (0 when no
        lock is modelled), so its count matches the report count."""
        hold_ns = record.kick_to_notify_ns
        with self._lock:
            if hold_ns is not None:
                self._series["hold"].add(hold_ns)
            if record.t_discard_start_ns and record.t_discard_done_ns:
                self._series["discard"].add(record.t_discard_done_ns - record.t_discard_start_ns)
            self._series["bql_wait"].add(bql_wait_ns)
            for point, delay_ns in (injected_ns or {}).items():
                name = INJECTED_PREFIX + point
                series = self._series.get(name)
                if series is None:
                    series = self._series[name] = _Series()
                series.add(delay_ns)
        if self._parent is not None:
            self._parent.record(record, bql_wait_ns, injected_ns)

    def names(self) -> list[str]:
        """Names: "hold", "discard", "bql_wait", then "injected:POINT" per point seen."""
        with self._lock:
            return list(self._series)

    def percentiles(self, name: str) -> dict[str, float]:
        """{"p50", "p90", "p99", "max", "count"}, in microseconds; all 0.0 when
        nothing was recorded (JSON-safe: never NaN). KeyError for an unknown name."""
        with self._lock:
            return self._series[name].summary().percentiles()

    def summaries(self) -> dict[str, Summary]:
        with self._lock:
            return {name: series.summary() for name, series in self._series.items()}


class Metrics:
    """Per-session Histograms, their totals, and the server's counters rendered
    in the Prometheus text exposition format 0.0.4.

    The totals (session="all") include every session ever served. An ended
    session's series stay exported, frozen, for the last ENDED_KEPT (64)
    ended sessions, so a scrape after a short session still sees it while
    the exposition does not grow without bound on a long-running server.
    """

    def __init__(self) -> None:
        self.total = Histograms()
        self._live: dict[str, Histograms] = {}
        self._ended: OrderedDict[str, dict[str, Summary]] = OrderedDict()

    def session(self, name: str) -> Histograms:
        """The live session's histograms, created on first use. A name reused
        after its session ended starts afresh (its ended series are dropped)."""
        histograms = self._live.get(name)
        if histograms is None:
            if name == TOTAL_SESSION:
                raise ValueError(f"session name {name!r} is reserved for the totals")
            self._ended.pop(name, None)
            histograms = self._live[name] = Histograms(self.total)
        return histograms

    def end_session(self, name: str) -> None:
        """Freeze the session's summaries (its data stays in the totals)."""
        histograms = self._live.pop(name, None)
        if histograms is None:
            return
        self._ended[name] = histograms.summaries()  # the HDR arrays are freed
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def render(
        self,
        counters: Mapping[str, int],
        sessions_live: int,
        extra_counters: Sequence[tuple[str, str, int]] = (),
        gauges: Sequence[Gauge] = (),
    ) -> str:
        """The exposition text. counters must hold every key of COUNTERS;
        skipped_entries may instead be given as skipped_outside + skipped_unaligned
        (as DeviceStats.as_dict() has them). extra_counters: (name, help, value)
        of counters that are not the device's (the trace's), printed as
        vhost_balloon_NAME_total."""
        values = dict(counters)
        if "skipped_entries" not in values and "skipped_outside" in values:
            values["skipped_entries"] = values["skipped_outside"] + values.get(
                "skipped_unaligned", 0
            )
        missing = [key for key, _ in COUNTERS if key not in values]
        if missing:
            raise KeyError(f"counters missing: {', '.join(missing)}")
        out: list[str] = []
        for key, help_text in COUNTERS:
            name = f"vhost_balloon_{key}_total"
            out += _header(name, "counter", help_text)
            out.append(f"{name} {int(values[key])}")
        for key, help_text, value in extra_counters:
            name = f"vhost_balloon_{key}_total"
            out += _header(name, "counter", help_text)
            out.append(f"{name} {int(value)}")
        out += _header("vhost_balloon_sessions", "gauge", "Front-ends connected now.")
        out.append(f"vhost_balloon_sessions {int(sessions_live)}")
        for gauge in gauges:
            name = f"vhost_balloon_{gauge.name}"
            out += _header(name, "gauge", gauge.help)
            out += [f"{name}{{{_labels(labels)}}} {value}" for labels, value in gauge.samples]

        sessions = list(self._sessions())
        for key, suffix, help_text in SUMMARIES:
            name = f"vhost_balloon_{suffix}"
            out += _header(name, "summary", help_text + ' session="all" is every session.')
            for session, summaries in sessions:
                out += _summary(name, {"session": session}, summaries[key])
        injected = [
            (s, n, summary)
            for s, summaries in sessions
            for n, summary in summaries.items()
            if n.startswith(INJECTED_PREFIX)
        ]
        if injected:
            name = "vhost_balloon_injected_seconds"
            out += _header(name, "summary", INJECTED_HELP)
            for session, key, summary in injected:
                point = key.removeprefix(INJECTED_PREFIX)
                out += _summary(name, {"session": session, "point": point}, summary)
        return "\n".join(out) + "\n"

    def _sessions(self) -> Iterator[tuple[str, dict[str, Summary]]]:
        yield TOTAL_SESSION, self.total.summaries()
        for name, histograms in self._live.items():
            yield name, histograms.summaries()
        yield from self._ended.items()


def _header(name: str, kind: str, help_text: str) -> list[str]:
    escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {escaped}", f"# TYPE {name} {kind}"]


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f'{key}="{escape_label(value)}"' for key, value in labels.items())


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _summary(name: str, labels: Mapping[str, str], summary: Summary) -> list[str]:
    base = _labels(labels)
    lines = []
    for quantile, value_us in zip(QUANTILES, summary.quantiles_us, strict=True):
        # An empty summary's quantiles are NaN by Prometheus convention.
        value = value_us / 1e6 if summary.count else math.nan
        lines.append(f'{name}{{{base},quantile="{quantile}"}} {_number(value)}')
    lines.append(f"{name}_sum{{{base}}} {_number(summary.sum_ns / 1e9)}")
    lines.append(f"{name}_count{{{base}}} {summary.count}")
    return lines


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
