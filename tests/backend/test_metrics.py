"""Latency histograms, the Prometheus text they render, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from hdrh.histogram import HdrHistogram
from prometheus_client.parser import text_string_to_metric_families

from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.observe import metrics as metrics_core
from vhost_balloon.backend.observe import metrics_http as metrics_module
from vhost_balloon.backend.observe.exposition import Exposition, Snapshot, device_counters
from vhost_balloon.backend.observe.metrics import Histograms, Metrics
from vhost_balloon.backend.observe.metrics_http import parse_listen_address, serve_metrics

US = 1000  # ns
BASE = 10**12  # a plausible monotonic_ns; 0 would mean "missing"

COUNTERS = {
    "reports": 5,
    "entries": 40,
    "reported_bytes": 1 << 30,
    "freed_bytes": 1 << 29,
    "skipped_entries": 3,
    "discard_errors": 1,
    "queue_errors": 0,
    "inflated_pages": 4096,
    "inflate_freed_bytes": 1 << 24,
    "deflated_pages": 1024,
}


def report(
    hold_us: float = 100,
    discard_us: float = 10,
    *,
    notified: bool = True,
    session: str = "s1",
) -> ReportRecord:
    kick = BASE
    end = kick + int(hold_us * US)
    return ReportRecord(
        session=session,
        queue=2,
        seq=1,
        head=0,
        entries=1,
        bytes=4096,
        ranges=[(0, 4096)],
        discard="punch",
        t_kick_ns=kick,
        t_popped_ns=kick + 1,
        t_discard_start_ns=kick + 2,
        t_discard_done_ns=kick + 2 + int(discard_us * US),
        t_published_ns=end,
        t_notified_ns=end if notified else 0,
    )


# --- histograms ----------------------------------------------------------------


def test_percentiles_of_known_values() -> None:
    histograms = Histograms()
    for value in range(1, 1001):  # 1..1000 us: below 2048 HDR keeps every value exactly
        histograms.record(report(hold_us=value, discard_us=2 * value), bql_wait_ns=7 * US)
    assert histograms.percentiles("hold") == {
        "p50": 500.0,
        "p90": 900.0,
        "p99": 990.0,
        "max": 1000.0,
        "count": 1000.0,
    }
    discard = histograms.percentiles("discard")
    assert (discard["p50"], discard["max"], discard["count"]) == (1000.0, 2000.0, 1000.0)
    assert histograms.percentiles("bql_wait") == {
        "p50": 7.0,
        "p90": 7.0,
        "p99": 7.0,
        "max": 7.0,
        "count": 1000.0,
    }


def test_large_values_stay_within_three_digits_and_never_pass_max() -> None:
    histograms = Histograms()
    histograms.record(report(hold_us=1_234_567))
    hold = histograms.percentiles("hold")
    assert hold["max"] == 1_234_567.0
    assert hold["p50"] == pytest.approx(1_234_567, rel=1e-3)
    assert hold["p99"] <= hold["max"]


def test_values_past_sixty_seconds_are_counted_with_their_exact_max() -> None:
    histograms = Histograms()
    histograms.record(report(hold_us=120e6))
    hold = histograms.percentiles("hold")
    assert hold["count"] == 1.0
    assert hold["max"] == 120e6
    assert hold["p50"] == pytest.approx(60e6, rel=1e-3)


def test_hold_ends_at_publish_when_no_notification_was_sent() -> None:
    histograms = Histograms()
    histograms.record(report(hold_us=250, notified=False))
    assert histograms.percentiles("hold")["max"] == 250.0


def test_missing_timestamps_are_not_latencies() -> None:
    histograms = Histograms()
    record = report()
    record.t_published_ns = record.t_notified_ns = 0
    record.t_discard_start_ns = record.t_discard_done_ns = 0
    histograms.record(record, bql_wait_ns=-5)
    for name in ("hold", "discard", "bql_wait"):
        assert histograms.percentiles(name)["count"] == 0.0


def test_empty_percentiles_are_zeros_not_nan() -> None:
    values = Histograms().percentiles("hold")
    assert values == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "count": 0.0}


def test_injected_delays_per_point() -> None:
    histograms = Histograms()
    histograms.record(report(), injected_ns={"publish": 5000 * US, "kick": 0})
    histograms.record(report(), injected_ns={"publish": 3000 * US})
    assert histograms.names() == [
        "hold",
        "discard",
        "bql_wait",
        "injected:publish",
        "injected:kick",
    ]
    publish = histograms.percentiles("injected:publish")
    assert (publish["count"], publish["max"]) == (2.0, 5000.0)
    assert publish["p50"] == pytest.approx(3000, rel=1e-3)
    assert histograms.percentiles("injected:kick")["count"] == 1.0
    with pytest.raises(KeyError):
        histograms.percentiles("injected:notify")


def test_percentiles_follow_new_records() -> None:
    histograms = Histograms()
    histograms.record(report(hold_us=10))
    assert histograms.percentiles("hold")["max"] == 10.0
    histograms.record(report(hold_us=20))
    assert histograms.percentiles("hold")["max"] == 20.0


# --- sessions and totals ---------------------------------------------------------


def test_totals_keep_ended_sessions() -> None:
    metrics = Metrics()
    metrics.session("s1").record(report(hold_us=100))
    metrics.session("s2").record(report(hold_us=300))
    metrics.end_session("s1")
    metrics.end_session("unknown")  # harmless
    assert metrics.total.percentiles("hold")["count"] == 2.0
    assert metrics.total.percentiles("hold")["max"] == 300.0
    assert metrics.live_sessions() == 1
    assert metrics.session("s1").percentiles("hold")["count"] == 0.0  # afresh


def test_a_session_that_never_reports_makes_no_hdr_histogram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each HDR histogram's counts are 136 KiB that malloc keeps after the
    # session ends: made for every malformed connection, they grew a serve
    # process by about 1 KiB per connection (benchmarks/session_churn.py
    # --malformed).
    made: list[object] = []
    real = HdrHistogram

    def counting(*args: object) -> object:
        made.append(args)
        return real(*args)

    monkeypatch.setattr(metrics_core, "HdrHistogram", counting)
    metrics = Metrics()
    for number in range(5):
        metrics.session(f"s{number}")
        metrics.end_session(f"s{number}")
    assert made == []
    metrics.session("s9").record(report())
    assert len(made) == 6  # hold, discard, bql_wait: the session's and the totals'
    assert metrics.session("s9").percentiles("hold")["count"] == 1.0


def test_session_name_all_is_reserved() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Metrics().session("all")


# --- listen addresses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_parse_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "port"),
        ("127.0.0.1:", "port"),
        ("127.0.0.1:http", "port"),
        ("127.0.0.1:65536", "port"),
        ("127.0.0.1:+94", "port"),
        ("::1:9464", "brackets"),
        ("[::1]", r"\[IPV6\]:PORT"),
        ("[::1:9464", r"\[IPV6\]:PORT"),
        ("[1.2.3.4]:9464", "not an IPv6"),
        ("my host:9464", "bad host"),
    ],
)
def test_parse_listen_address_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_listen_address(text)
    assert repr(text) in str(caught.value)


# --- the HTTP endpoint ------------------------------------------------------------


@dataclass
class Endpoint:
    port: int
    render: Callable[[], str]

    async def exchange(
        self, data: bytes, half_close: bool = False
    ) -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(data)
            await writer.drain()
            if half_close:
                writer.write_eof()
            response = await asyncio.wait_for(reader.read(), 3)  # until the server closes
        finally:
            writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode().split("\r\n")
        assert status_line.startswith("HTTP/1.1 ")
        headers = {}
        for line in header_lines:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == len(body) or data.startswith(b"HEAD")
        return int(status_line.split()[1]), headers, body

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return await self.exchange(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    exposition = Exposition(lambda: Snapshot(device_counters(COUNTERS), []))
    exposition.observe(report(hold_us=100), 0, {})
    state = Endpoint(0, exposition.render)

    def render() -> str:  # what the test sets in state.render at the time
        return state.render()

    server = await serve_metrics("127.0.0.1", 0, render)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await server.wait_closed()


async def test_get_metrics(endpoint: Endpoint) -> None:
    status, headers, body = await endpoint.get("/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    assert samples[("vhost_balloon_reports_total", ())] == 5
    assert samples[("vhost_balloon_report_hold_seconds_count", ())] == 1
    status, _, _ = await endpoint.get("/metrics?name[]=x")  # queries are ignored
    assert status == 200


async def test_http_errors_and_the_server_survives(endpoint: Endpoint) -> None:
    assert (await endpoint.get("/"))[0] == 404
    assert (await endpoint.get("/metricsx"))[0] == 404
    status, headers, _ = await endpoint.exchange(b"POST /metrics HTTP/1.1\r\n\r\n")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, headers, body = await endpoint.exchange(b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 0
    assert (await endpoint.exchange(b"\x00\xff garbage\r\n\r\n"))[0] == 400
    assert (await endpoint.exchange(b"GET /metrics HTTP/2.0\r\n\r\n"))[0] == 400
    assert (await endpoint.exchange(b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n"))[0] == 400
    truncated = b"GET /metrics HTTP/1.1\r\n"  # then the client shuts its side
    assert (await endpoint.exchange(truncated, half_close=True))[0] == 400
    oversized = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 16384 + b"\r\n\r\n"
    status, _, body = await endpoint.exchange(oversized)
    assert status == 400
    assert b"8192" in body
    endless = b"A" * 20000  # no line end at all
    assert (await endpoint.exchange(endless))[0] == 400
    # A client that connects and leaves at once.
    _, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    writer.close()
    assert (await endpoint.get("/metrics"))[0] == 200


async def test_render_failure_is_a_500_not_a_crash(endpoint: Endpoint) -> None:
    def broken() -> str:
        raise RuntimeError("boom")

    endpoint.render = broken
    assert (await endpoint.get("/metrics"))[0] == 500
    endpoint.render = lambda: "ok 1\n"
    status, _, body = await endpoint.get("/metrics")
    assert (status, body) == (200, b"ok 1\n")


async def test_concurrent_scrapes(endpoint: Endpoint) -> None:
    results = await asyncio.gather(*(endpoint.get("/metrics") for _ in range(10)))
    assert {status for status, _, _ in results} == {200}


async def test_a_stalled_client_is_dropped(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "READ_TIMEOUT", 0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed, no answer
    finally:
        writer.close()
    assert (await endpoint.get("/metrics"))[0] == 200


async def test_render_runs_on_the_callers_loop_thread(endpoint: Endpoint) -> None:
    threads = []

    def render() -> str:
        threads.append(threading.get_ident())
        return "ok 1\n"

    endpoint.render = render
    assert (await endpoint.get("/metrics"))[0] == 200
    assert threads == [threading.get_ident()]  # the endpoint's own thread never calls it


async def test_a_busy_caller_loop_is_a_503_not_a_hang(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "RENDER_TIMEOUT", 0.1)
    statuses = []

    def scrape() -> None:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                statuses.append(reply.status)
        except urllib.error.HTTPError as error:
            statuses.append(error.code)

    client = threading.Thread(target=scrape)
    client.start()
    deadline = time.monotonic() + 10
    while client.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # blocks this loop, where render() would run
    client.join()
    assert statuses == [503]
    assert (await endpoint.get("/metrics"))[0] == 200  # and the next one is served


async def test_idle_connections_make_room_for_a_scrape_at_the_cap(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "IDLE_GRACE_S", 0.2)
    idle = [
        await asyncio.open_connection("127.0.0.1", endpoint.port)
        for _ in range(metrics_module.MAX_CONNECTIONS + 4)
    ]
    try:
        status, _, _ = await asyncio.wait_for(endpoint.get("/metrics"), 10)
        assert status == 200
        # The oldest idle ones were dropped, unanswered, to make room.
        assert await asyncio.wait_for(idle[0][0].read(), 5) == b""
    finally:
        for _, writer in idle:
            writer.close()
