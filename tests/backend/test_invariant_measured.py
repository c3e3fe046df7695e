"""Invariant 5's promise: every figure a record carries is measured, never the
request.

The sleeps are made to oversleep by a known amount (the queue thread's timed
sleep runs long, with no early wake to make up for it; each discard syscall
takes a known time),
so a figure copied from the request, or only the last of several summed ones,
is short by an amount no noise can make up. Each phase's timestamps must
also leave room for what was measured inside the phase.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from tests.backend.device_rig import MiB, reporting_rig
from vhost_balloon.backend.balloon import discard as discard_module
from vhost_balloon.backend.balloon.device import BalloonSettings
from vhost_balloon.backend.balloon.discard import DiscardStrategy, DiscardTarget
from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.latency import timer
from vhost_balloon.backend.latency.contention import BigLock
from vhost_balloon.backend.latency.injection import (
    NO_INJECTION,
    LatencyInjection,
    LatencySettings,
    Point,
    parse_delay_option,
)

ENTRIES = 4
REQUESTED_NS = 1_000_000  # every injected delay asks for 1 ms
OVERSLEEP_NS = 3_000_000  # and every sleep takes 3 ms more than it asks
PHASE_POINTS = [Point.KICK, Point.REPORT, Point.PUBLISH, Point.NOTIFY]


@pytest.fixture
def oversleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timed sleep runs OVERSLEEP_NS long, and the exact sleeper wakes
    no earlier than its deadline (a margin of 0), so nothing makes up for it."""

    def long_sleep(seconds: float) -> None:
        time.sleep(seconds + OVERSLEEP_NS / 1e9)

    monkeypatch.setattr(
        timer, "LATENESS", timer.WakeLateness(initial_ns=0, floor_ns=0, ceiling_ns=0)
    )
    slow_time = SimpleNamespace(monotonic_ns=time.monotonic_ns, sleep=long_sleep)
    monkeypatch.setattr(timer, "time", slow_time)


@pytest.fixture
def big_lock() -> Iterator[BigLock]:
    yield BigLock()


def _settings(*points: Point) -> LatencySettings:
    delays = dict(parse_delay_option(f"{p.value}=const:{REQUESTED_NS}ns") for p in points)
    return LatencySettings(delays=delays)


async def _one_report(latency: LatencyInjection, strategy: DiscardStrategy) -> ReportRecord:
    with reporting_rig(latency, BalloonSettings(discard=strategy)) as rig:
        rig.post_report(ENTRIES, 2 * MiB)
        await asyncio.to_thread(rig.device.process_queue, rig.handle, time.monotonic_ns())
        (record,) = rig.records
        assert isinstance(record, ReportRecord)
        assert rig.device.stats.discard_syscall_ns == record.discard_syscall_ns
        return record


@pytest.mark.usefixtures("oversleeping")
async def test_injected_delays_are_what_was_slept_not_what_was_asked(
    big_lock: BigLock,
) -> None:
    settings = _settings(*PHASE_POINTS)
    record = await _one_report(LatencyInjection(lambda: settings, big_lock), DiscardStrategy.NONE)
    for point in PHASE_POINTS:
        assert record.injected_ns[point.value] >= REQUESTED_NS + OVERSLEEP_NS, point
    # Each delay lies inside its phase's timestamps.
    injected = record.injected_ns
    assert record.t_start_ns - record.t_kick_ns >= injected["kick"]
    assert record.t_discard_start_ns - record.t_popped_ns >= injected["report"]
    assert record.t_published_ns - record.t_discard_done_ns >= injected["publish"]
    assert record.t_notified_ns - record.t_published_ns >= injected["notify"]


@pytest.mark.usefixtures("oversleeping")
async def test_per_entry_delays_are_summed_as_slept_around_the_syscalls(
    big_lock: BigLock,
) -> None:
    settings = _settings(Point.ENTRY)
    record = await _one_report(
        LatencyInjection(lambda: settings, big_lock), DiscardStrategy.PUNCH_HOLE
    )
    slept = record.injected_ns["entry"]
    assert slept >= ENTRIES * (REQUESTED_NS + OVERSLEEP_NS)
    discard_window = record.t_discard_done_ns - record.t_discard_start_ns
    assert discard_window >= slept + record.discard_syscall_ns


async def test_discard_syscall_time_is_the_sum_over_every_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Entry i's syscall takes (i + 1) ms: the sum is 10 ms, the largest 4 ms.
    real = discard_module._discard_one
    calls = 0

    def slow_syscall(strategy: DiscardStrategy, target: DiscardTarget) -> None:
        nonlocal calls
        calls += 1
        time.sleep(calls * 1e-3)
        real(strategy, target)

    monkeypatch.setattr(discard_module, "_discard_one", slow_syscall)
    for strategy in (DiscardStrategy.PUNCH_HOLE, DiscardStrategy.MADV_DONTNEED):
        calls = 0
        with reporting_rig(NO_INJECTION, BalloonSettings(discard=strategy)) as rig:
            rig.post_report(ENTRIES, 2 * MiB)
            await asyncio.to_thread(rig.device.process_queue, rig.handle, time.monotonic_ns())
            (record,) = rig.records
        assert calls == ENTRIES
        assert record.discard_syscall_ns >= 10_000_000, strategy
        assert record.discard_syscall_ns <= record.t_discard_done_ns - record.t_discard_start_ns
