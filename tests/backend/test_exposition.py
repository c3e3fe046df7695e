"""/metrics as prometheus_client writes it, read back with prometheus_client's
own parser: real histograms with 10 us .. 10 s buckets, a bounded label set,
the server's counters and gauges, the process metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.backend.test_metrics import US, report
from vhost_balloon.backend.balloon.stats import DeviceStats
from vhost_balloon.backend.latency.injection import Point
from vhost_balloon.backend.observe.exposition import (
    BUCKETS_S,
    COUNTERS,
    Counter,
    Exposition,
    Gauge,
    Snapshot,
    device_counters,
)

VALUES = {key: number for number, (key, _) in enumerate(COUNTERS, 1)}


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def type(self, name: str) -> str:
        return self.families[name].type

    def samples(self, name: str) -> list[Sample]:
        return [s for f in self.families.values() for s in f.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples(name) if s.labels == labels]
        assert len(found) == 1, (name, labels, found)
        return found[0]


def scrape(exposition: Exposition) -> Scrape:
    return Scrape(exposition.render())


def exposition(
    counters: Mapping[str, int] = VALUES, gauges: list[Gauge] | None = None
) -> Exposition:
    return Exposition(lambda: Snapshot(device_counters(counters), gauges or []))


def test_buckets_run_from_10us_to_10s() -> None:
    assert BUCKETS_S[0] == 10e-6 and BUCKETS_S[-1] == 10.0
    assert list(BUCKETS_S) == sorted(set(BUCKETS_S)) and len(BUCKETS_S) == 19


def test_reports_fill_real_histograms() -> None:
    metrics = exposition()
    for value in range(1, 1001):  # 1 us .. 1 ms of hold
        metrics.observe(report(hold_us=value), 2 * US, {"entry": 1500 * US})
    found = scrape(metrics)
    for name in ("report_hold", "discard", "bql_wait", "injected_delay"):
        assert found.type(f"vhost_balloon_{name}_seconds") == "histogram"
    hold = "vhost_balloon_report_hold_seconds"
    assert found.value(hold + "_count") == 1000
    assert found.value(hold + "_sum") == pytest.approx(sum(range(1, 1001)) * 1e-6)
    assert found.value(hold + "_bucket", le="1e-05") == 10  # 1..10 us
    assert found.value(hold + "_bucket", le="0.0001") == 100
    assert found.value(hold + "_bucket", le="0.0005") == 500
    assert found.value(hold + "_bucket", le="0.001") == 1000
    assert found.value(hold + "_bucket", le="+Inf") == 1000
    assert found.value("vhost_balloon_bql_wait_seconds_bucket", le="2e-05") == 1000
    injected = "vhost_balloon_injected_delay_seconds"
    assert found.value(injected + "_bucket", point="entry", le="0.001") == 0
    assert found.value(injected + "_bucket", point="entry", le="0.002") == 1000


def test_values_past_ten_seconds_are_counted_in_inf_with_their_sum() -> None:
    metrics = exposition()
    metrics.observe(report(hold_us=30e6), 0, {})
    found = scrape(metrics)
    hold = "vhost_balloon_report_hold_seconds"
    assert found.value(hold + "_bucket", le="10.0") == 0
    assert found.value(hold + "_bucket", le="+Inf") == 1
    assert found.value(hold + "_sum") == pytest.approx(30.0)


def test_missing_timestamps_are_not_latencies() -> None:
    metrics = exposition()
    record = report()
    record.t_discard_start_ns = 0  # never discarded
    metrics.observe(record, 0, {})
    found = scrape(metrics)
    assert found.value("vhost_balloon_discard_seconds_count") == 0
    assert found.value("vhost_balloon_report_hold_seconds_count") == 1


def test_the_label_set_is_bounded() -> None:
    # Many sessions come and go: no histogram grows a series per session;
    # injected delays have one per injection point, five at most.
    metrics = exposition()
    for number in range(500):
        metrics.observe(report(session=f"s{number}"), 0, {p.value: 1 * US for p in Point})
    found = scrape(metrics)
    labels = {
        tuple(sorted(k for k in s.labels if k != "le"))
        for f in found.families.values()
        if f.name.startswith("vhost_balloon_")
        for s in f.samples
    }
    assert labels == {(), ("point",)}
    points = {
        s.labels["point"] for s in found.samples("vhost_balloon_injected_delay_seconds_count")
    }
    assert points == {p.value for p in Point}


def test_counters_and_gauges_are_read_at_each_scrape() -> None:
    live: list[tuple[dict[str, str], float]] = [({"session": "s1"}, 768 << 20)]
    gauges = [
        Gauge("sessions", "Front-ends connected now.", [({}, 1)]),
        Gauge("target_bytes", "Target.", live),
        Gauge("ballooned_bytes", "Actual.", []),  # no session now: the family alone
    ]
    counters = dict(VALUES)
    metrics = exposition(counters, gauges)
    found = scrape(metrics)
    for key, value in VALUES.items():
        assert found.type(f"vhost_balloon_{key}") == "counter"
        assert found.value(f"vhost_balloon_{key}_total") == value
    assert found.type("vhost_balloon_target_bytes") == "gauge"
    assert found.value("vhost_balloon_target_bytes", session="s1") == 768 << 20
    assert found.value("vhost_balloon_sessions") == 1
    assert found.samples("vhost_balloon_ballooned_bytes") == []
    counters["reports"] = 99
    live.clear()  # the session left: its gauge sample goes with it
    found = scrape(metrics)
    assert found.value("vhost_balloon_reports_total") == 99
    assert found.samples("vhost_balloon_target_bytes") == []


def test_label_values_are_escaped() -> None:
    odd = 'a"b\\c\nd'
    metrics = exposition(gauges=[Gauge("target_bytes", "T.", [({"session": odd}, 1)])])
    assert scrape(metrics).value("vhost_balloon_target_bytes", session=odd) == 1


def test_counters_come_from_device_stats_and_a_missing_one_is_named() -> None:
    stats = DeviceStats(reports=2, skipped_outside=1, skipped_unaligned=2)
    counters = {c.name: c.value for c in device_counters(stats.as_dict())}
    assert counters["skipped_entries"] == 3 and counters["reports"] == 2
    with pytest.raises(KeyError, match="queue_errors"):
        device_counters({k: v for k, v in VALUES.items() if k != "queue_errors"})
    extra = Exposition(lambda: Snapshot([Counter("trace_records_dropped", "D.", 5)], []))
    assert scrape(extra).value("vhost_balloon_trace_records_dropped_total") == 5


def test_process_metrics_come_for_free() -> None:
    found = scrape(exposition())
    assert found.value("process_resident_memory_bytes") > 0
    assert found.value("process_open_fds") > 0
    assert "python_info" in found.families
    assert not math.isnan(found.value("process_cpu_seconds_total"))
