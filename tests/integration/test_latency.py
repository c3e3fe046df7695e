"""Latency injection, contention and runtime control, seen from both sides."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import vhost_balloon.backend.latency.injection
from tests.conftest import StartBackend
from tests.integration.discard_gate import TIMESTAMPS
from vhost_balloon.backend.latency.contention import parse_bql, parse_mmap_contention
from vhost_balloon.backend.latency.delays import parse_delay
from vhost_balloon.backend.latency.injection import LatencySettings, Point
from vhost_balloon.backend.observe.control import control_request
from vhost_balloon.guest.runner import MockGuest
from vhost_balloon.protocol.virtqueue import Buffer

MS = 1_000_000


def _delays(**points: str) -> LatencySettings:
    return LatencySettings(delays={Point(p): parse_delay(m) for p, m in points.items()})


# The phase each point must stretch, as (earlier timestamp, later timestamp).
PHASE = {
    "kick": ("t_kick_ns", "t_start_ns"),
    "report": ("t_popped_ns", "t_discard_start_ns"),
    "entry": ("t_discard_start_ns", "t_discard_done_ns"),
    "publish": ("t_discard_done_ns", "t_published_ns"),
    "notify": ("t_published_ns", "t_notified_ns"),
}


@pytest.mark.parametrize("point", list(PHASE))
async def test_each_injection_point_delays_the_phase_it_names(
    start_backend: StartBackend, point: str
) -> None:
    model = "const:1ms" if point == "entry" else "const:15ms"
    backend = await start_backend(latency=_delays(**{point: model}))
    async with MockGuest(backend.guest_options(capacity=16)) as guest:
        result = await guest.run(3)
    records = backend.trace()
    assert len(records) == 3
    expected = 16 * MS if point == "entry" else 15 * MS
    for record, seen in zip(records, result.reports, strict=True):
        injected = record["injected_ns"][point]
        assert injected >= expected  # measured, not just requested
        earlier, later = PHASE[point]
        assert record[later] - record[earlier] >= injected
        # The guest waited at least as long as everything injected.
        assert seen.hold_ns >= sum(record["injected_ns"].values())
        assert record["settings"]["delay"] == {point: model}
        # Every phase adds up to the hold window the backend saw.
        stamps = [record[k] for k in TIMESTAMPS]
        assert stamps == sorted(stamps)


async def test_a_two_second_delay_does_not_hold_up_another_session(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(latency=_delays(kick="const:2s"))
    async with (
        MockGuest(backend.guest_options()) as slow,
        MockGuest(backend.guest_options()) as fast,
    ):
        index = slow.driver.reporting_queue
        size = slow.driver.layout.block_size
        vq = slow.driver.queue(index)
        vq.add([Buffer(block.gpa, size, True) for block in slow.driver.layout.blocks[:4]])
        if vq.kick_needed():
            slow.frontend.kick(index)
        await asyncio.sleep(0.1)  # slow's report is now asleep in its kick delay
        await backend.server.latency.apply(LatencySettings().changed())
        loop = asyncio.get_running_loop()
        began = loop.time()
        summary = fast.summary(await fast.run(5))
        assert summary["reports"] == 5
        assert loop.time() - began < 2.0, "the other session waited for the 2 s delay"
        assert vq.get_used() == []  # slow is still being held
        await slow.frontend.wait_call(index, 5.0)
        assert len(vq.get_used()) == 1
    slow_record = next(r for r in backend.trace() if r["settings"]["delay"])
    assert slow_record["injected_ns"]["kick"] >= 2000 * MS


async def test_bql_waits_are_recorded(start_backend: StartBackend) -> None:
    # One thread holds the lock 4 ms at a time, 100 times a second.
    latency = LatencySettings(bql=parse_bql("const:4ms@100"))
    backend = await start_backend(latency=latency)
    async with MockGuest(backend.guest_options(capacity=8)) as guest:
        await guest.run(20)
    records = backend.trace()
    assert all(set(r["bql_wait_ns"]) == {"pop", "publish", "notify"} for r in records)
    assert sum(sum(r["bql_wait_ns"].values()) for r in records) > 0
    assert records[0]["settings"]["bql"] == "const:4ms@100"


async def test_mmap_contention_threads_start_stop_and_show_in_the_trace(
    start_backend: StartBackend,
) -> None:
    def contention_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if "mmap" in t.name]

    latency = LatencySettings(mmap=parse_mmap_contention("2,size=16M"))
    backend = await start_backend(latency=latency)
    assert len(contention_threads()) == 2
    async with MockGuest(backend.guest_options()) as guest:
        summary = guest.summary(await guest.run(3))
    assert summary["freed_bytes"] == summary["reported_bytes"]
    assert all(r["settings"]["mmap_contention"] == "2,size=16M" for r in backend.trace())
    await backend.server.latency.apply(backend.server.latency.settings.changed(mmap=None))
    assert contention_threads() == []


async def test_runtime_change_applies_from_the_next_report_and_drops_none(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(control=True)
    control = backend.server.settings.control_socket
    assert control is not None
    async with MockGuest(backend.guest_options(capacity=8)) as guest:
        first = await guest.run(5)
        reply = await asyncio.to_thread(
            control_request, control, {"cmd": "set", "delay": {"publish": "const:10ms"}}
        )
        assert reply["ok"] and reply["settings"]["delay"] == {"publish": "const:10ms"}
        second = await guest.run(5)
        reply = await asyncio.to_thread(
            control_request, control, {"cmd": "set", "delay": {"publish": "none"}}
        )
        assert reply["settings"]["delay"] == {}
        third = await guest.run(5)
        stats = await asyncio.to_thread(control_request, control, {"cmd": "stats"})
    records = backend.trace()
    assert len(records) == 15  # nothing dropped
    assert len(first.reports) == len(second.reports) == len(third.reports) == 5
    versions = [r["settings"]["version"] for r in records]
    assert versions == [0] * 5 + [1] * 5 + [2] * 5
    assert all(r["injected_ns"].get("publish", 0) >= 10 * MS for r in records[5:10])
    assert all("publish" not in r["injected_ns"] for r in records[:5] + records[10:])
    assert all(seen.hold_ns >= 10 * MS for seen in second.reports)
    session: dict[str, Any] = next(iter(stats["sessions"].values()))
    assert session["reports"] == 15
    assert session["hold_us"]["count"] == 15


async def test_control_socket_refuses_bad_settings_and_keeps_the_old_ones(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(control=True, latency=_delays(notify="const:1ms"))
    control = backend.server.settings.control_socket
    assert control is not None
    for bad in (
        {"cmd": "set", "delay": {"nowhere": "const:1ms"}},
        {"cmd": "set", "delay": {"publish": "const:-1ms"}},
        {"cmd": "set", "bql": "const:1ms"},
        {"cmd": "set", "mmap_contention": "zero"},
        {"cmd": "set", "seed": "seven"},
        {"cmd": "set", "volume": 11},
        {"cmd": "launch"},
    ):
        reply = await asyncio.to_thread(control_request, control, bad)
        assert reply["ok"] is False and reply["error"]
    reply = await asyncio.to_thread(control_request, control, {"cmd": "get"})
    assert reply["settings"]["delay"] == {"notify": "const:1ms"}
    assert reply["settings"]["version"] == 0


async def test_a_report_that_fails_midway_breaks_its_queue_loudly(
    start_backend: StartBackend, monkeypatch: pytest.MonkeyPatch
) -> None:

    def failed(duration_ns: int) -> int:
        raise OSError(4, "clock_nanosleep failed: Interrupted system call")

    monkeypatch.setattr(vhost_balloon.backend.latency.injection, "sleep_exact_ns", failed)
    backend_ = await start_backend(latency=_delays(publish="const:1ms"))
    async with MockGuest(backend_.guest_options()) as guest:
        index = guest.driver.reporting_queue
        vq = guest.driver.queue(index)
        size = guest.driver.layout.block_size
        vq.add([Buffer(guest.driver.layout.blocks[0].gpa, size, True)])
        if vq.kick_needed():
            guest.frontend.kick(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while guest.frontend.err_count(index) == 0:
            assert loop.time() < deadline, "the err eventfd was never signalled"
            await asyncio.sleep(0.01)
        (session,) = backend_.server.sessions.values()
        assert session.rings.vrings[index].broken
        assert await guest.frontend.get_config(0, 16)  # the session still answers


async def test_a_report_found_while_draining_does_not_inherit_the_previous_kick(
    start_backend: StartBackend,
) -> None:
    """The backend drains the ring after each report; a chain posted during
    the previous report is found without a kick of its own. Its window must
    open after the previous report was used, not at the previous kick
    (found by the real-guest attribution: a 100 ms report recorded 205 ms)."""
    backend_ = await start_backend(latency=_delays(report="const:100ms"))
    async with MockGuest(backend_.guest_options()) as guest:
        index = guest.driver.reporting_queue
        vq = guest.driver.queue(index)
        size = guest.driver.layout.block_size
        blocks = guest.driver.layout.blocks
        vq.add([Buffer(blocks[0].gpa, size, True)])
        guest.frontend.kick(index)
        await asyncio.sleep(0.03)  # inside the first report's 100 ms
        vq.add([Buffer(blocks[1].gpa, size, True)])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(backend_.trace()) < 2:
            assert loop.time() < deadline, "the second report never completed"
            await asyncio.sleep(0.01)
    first, second = backend_.trace()[:2]
    assert second["t_kick_ns"] >= first["t_notified_ns"]
    for record in (first, second):
        window = record["t_notified_ns"] - record["t_kick_ns"]
        assert 100 * MS <= window < 190 * MS, record
