"""What /metrics shows, made by prometheus_client: one registry per server.

- Histograms, with buckets from 10 us to 10 s (1-2-5 steps), so Prometheus
  can aggregate them across sessions, backends and hosts:
  `vhost_balloon_report_hold_seconds` (kick to notification), discard time,
  the modelled big lock's wait, and the delay injected at each point (label
  `point`, one of the five injection points).
- The label set is bounded: histograms carry no session label (sessions come
  and go without end on a long-running server; `ctl stats` has each live
  session's percentiles, and the systemd template runs one backend per VM,
  which Prometheus tells apart by instance). Only gauges of what a live
  session is now (its balloon target and size, the guest's stats) carry
  `session`, and they leave with it.
- Counters and gauges are read from the server when scraped (a collector),
  not kept twice.
- The process metrics prometheus_client gives (CPU, RSS, fds, GC).

Histograms are observed on the queue threads (prometheus_client locks each);
a scrape runs the collector on the server's event loop (metrics_http.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vhost_balloon.backend.balloon.records import ReportRecord

PREFIX = "vhost_balloon_"
# 10 us .. 10 s in 1-2-5 steps; longer values land in +Inf (the sum keeps them).
BUCKETS_S = (
    *(round(mantissa * 10.0**exponent, 6) for exponent in range(-5, 1) for mantissa in (1, 2, 5)),
    10.0,
)
HOLD_HELP = "Kick to notification (or to publish when none was sent) of each report."
DISCARD_HELP = "Time spent discarding one report's entries."
BQL_HELP = "Time a report waited for the modelled big lock (0 when none is modelled)."
INJECTED_HELP = "Delay injected into a report at an injection point."
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


@dataclass(frozen=True, slots=True)
class Gauge:
    """A gauge with one sample per label set (e.g. per live session)."""

    name: str  # without the vhost_balloon_ prefix
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]]


@dataclass(frozen=True, slots=True)
class Counter:
    name: str  # without the prefix and without _total
    help: str
    value: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The server's counters and gauges at one scrape."""

    counters: Sequence[Counter]
    gauges: Sequence[Gauge]


def device_counters(values: Mapping[str, int]) -> list[Counter]:
    """COUNTERS from DeviceStats.counters(); skipped_entries may be given as
    skipped_outside + skipped_unaligned. KeyError names a missing one."""
    found = dict(values)
    if "skipped_entries" not in found and "skipped_outside" in found:
        found["skipped_entries"] = found["skipped_outside"] + found.get("skipped_unaligned", 0)
    missing = [key for key, _ in COUNTERS if key not in found]
    if missing:
        raise KeyError(f"counters missing: {', '.join(missing)}")
    return [Counter(key, help_text, int(found[key])) for key, help_text in COUNTERS]


class _Scraped(Collector):
    """The server's counters and gauges, read at each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        now = self._snapshot()
        for counter in now.counters:
            yield CounterMetricFamily(PREFIX + counter.name, counter.help, value=counter.value)
        for gauge in now.gauges:
            labels = sorted({key for sample_labels, _ in gauge.samples for key in sample_labels})
            family = GaugeMetricFamily(PREFIX + gauge.name, gauge.help, labels=labels)
            for sample_labels, value in gauge.samples:
                family.add_metric([sample_labels.get(key, "") for key in labels], value)
            yield family


class Exposition:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        if GC_COLLECTOR is not None:  # None where the interpreter has no gc stats
            GCCollector(registry=self.registry)

        def histogram(name: str, help_text: str, labels: Sequence[str] = ()) -> Histogram:
            return Histogram(
                PREFIX + name, help_text, labels, buckets=BUCKETS_S, registry=self.registry
            )

        self._hold = histogram("report_hold_seconds", HOLD_HELP)
        self._discard = histogram("discard_seconds", DISCARD_HELP)
        self._bql_wait = histogram("bql_wait_seconds", BQL_HELP)
        self._injected = histogram("injected_delay_seconds", INJECTED_HELP, ("point",))
        self.registry.register(_Scraped(snapshot))

    def observe(
        self, record: ReportRecord, bql_wait_ns: int, injected_ns: Mapping[str, int]
    ) -> None:
        """One report (on its queue's thread, after its notification)."""
        hold_ns = record.kick_to_notify_ns
        if hold_ns is not None and hold_ns >= 0:
            self._hold.observe(hold_ns / 1e9)
        if record.t_discard_start_ns and record.t_discard_done_ns:
            self._discard.observe((record.t_discard_done_ns - record.t_discard_start_ns) / 1e9)
        self._bql_wait.observe(bql_wait_ns / 1e9)
        for point, delay_ns in injected_ns.items():  # the injection points: five at most
            self._injected.labels(point=point).observe(delay_ns / 1e9)

    def render(self) -> str:
        """The text exposition format, as prometheus_client writes it."""
        return generate_latest(self.registry).decode()
