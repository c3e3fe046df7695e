"""Latency percentiles per session and over all of them, for `ctl stats`,
the demo's summary and the experiment rows (/metrics is exposition.py's).

Histograms are HDR histograms in microseconds (1 us .. 60 s, 3 significant
digits: every value is kept to within 0.1%). Each also keeps the exact sum
and maximum in nanoseconds, because HDR's mean walks the whole counts array.

Queue threads record (several at once into the totals) while the control
socket reads: each Histograms has a lock of its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
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
TOTAL_SESSION = "all"  # reserved: the name the totals are shown under


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
    """Each live session's Histograms, and the totals over every session ever
    served (an ended session's values stay in the totals; its own histograms
    are dropped)."""

    def __init__(self) -> None:
        self.total = Histograms()
        self._live: dict[str, Histograms] = {}

    def session(self, name: str) -> Histograms:
        """The live session's histograms, created on first use."""
        histograms = self._live.get(name)
        if histograms is None:
            if name == TOTAL_SESSION:
                raise ValueError(f"session name {name!r} is reserved for the totals")
            histograms = self._live[name] = Histograms(self.total)
        return histograms

    def end_session(self, name: str) -> None:
        """Drop the session's histograms (their data stays in the totals)."""
        self._live.pop(name, None)

    def live_sessions(self) -> int:
        return len(self._live)
