"""Exact sleeps: behaviour only (how exact they are is measured in benchmarks/)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from types import SimpleNamespace

import pytest

from vhost_balloon.backend.latency import timer
from vhost_balloon.backend.latency.timer import WakeLateness, sleep_exact_ns

MS = 1_000_000
US = 1_000


def test_a_sleep_returns_at_least_the_requested_time() -> None:
    for duration in (1, 50 * US, 1 * MS, 3 * MS):
        before = time.monotonic_ns()
        slept = sleep_exact_ns(duration)
        elapsed = time.monotonic_ns() - before
        assert slept >= duration
        assert elapsed >= slept


def test_zero_or_negative_returns_at_once() -> None:
    assert sleep_exact_ns(0) == 0
    assert sleep_exact_ns(-5) == 0


async def test_a_sleep_refuses_to_block_the_event_loop() -> None:
    with pytest.raises(RuntimeError, match="would block the event loop"):
        sleep_exact_ns(MS)
    assert await asyncio.to_thread(sleep_exact_ns, MS) >= MS


def _recording_sleeps(monkeypatch: pytest.MonkeyPatch, late_ns: int = 0) -> list[float]:
    """timer's time.sleep, recorded, and running `late_ns` long."""
    asked: list[float] = []

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        time.sleep(seconds + late_ns / 1e9)

    monkeypatch.setattr(timer, "time", SimpleNamespace(monotonic_ns=time.monotonic_ns, sleep=sleep))
    return asked


class _FakeClock:
    """timer's clock and sleep, and os.sched_yield, on a clock of their own:
    a timed sleep wakes exactly `late_ns` late, a yield takes `yield_ns`."""

    def __init__(self, late_ns: int = 0, yield_ns: int = 10 * US) -> None:
        self.now_ns = 1_000_000_000
        self.late_ns = late_ns
        self.yield_ns = yield_ns
        self.asked: list[float] = []
        self.yields = 0

    def monotonic_ns(self) -> int:
        return self.now_ns

    def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.now_ns += round(seconds * 1e9) + self.late_ns

    def sched_yield(self) -> None:
        self.yields += 1
        self.now_ns += self.yield_ns


def _fake_clock(monkeypatch: pytest.MonkeyPatch, **kwargs: int) -> _FakeClock:
    clock = _FakeClock(**kwargs)
    monkeypatch.setattr(timer, "time", clock)
    monkeypatch.setattr(os, "sched_yield", clock.sched_yield)
    return clock


def test_the_timed_sleep_wakes_early_by_the_margin_and_the_finish_yields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a clock of its own: on a loaded machine a real sleep can wake past
    # the whole margin, and the finish has nothing left to do.
    clock = _fake_clock(monkeypatch, late_ns=20 * US)
    lateness = WakeLateness(initial_ns=150 * US, floor_ns=150 * US, ceiling_ns=150 * US)
    assert sleep_exact_ns(2 * MS, lateness) == 2 * MS
    assert clock.asked == [1.85e-3]  # woken 150 us early
    assert clock.yields == 13  # the last 130 us, yielded in 10 us steps


def test_a_sleep_shorter_than_the_margin_only_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _recording_sleeps(monkeypatch)
    lateness = WakeLateness(initial_ns=500 * US)
    assert sleep_exact_ns(100 * US, lateness) >= 100 * US
    assert asked == []


def test_a_margin_grown_by_gil_waits_is_slept_not_spun(monkeypatch: pytest.MonkeyPatch) -> None:
    # Catches: a finish that yields through a whole 1 ms margin (the margin
    # learnt from wake-ups delayed by other threads' Python): a CPU spun per
    # delay per session, for nothing, since every yield waits for the GIL too.
    clock = _fake_clock(monkeypatch, late_ns=20 * US)
    start = clock.now_ns
    remaining_at_yield: list[int] = []
    counting = clock.sched_yield

    def recording_yield() -> None:
        remaining_at_yield.append(start + 5 * MS - clock.now_ns)
        counting()

    monkeypatch.setattr(os, "sched_yield", recording_yield)
    lateness = WakeLateness(initial_ns=MS, floor_ns=MS, ceiling_ns=MS)
    assert sleep_exact_ns(5 * MS, lateness) == 5 * MS
    # To 1 ms early; woken 20 us late, the rest but the last 200 us is slept too.
    assert clock.asked == [4e-3, 780e-6]
    assert len(remaining_at_yield) == 18  # the last 180 us, in 10 us yields
    assert max(remaining_at_yield) <= timer.SPIN_LIMIT_NS


def test_lateness_observed_moves_the_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    _recording_sleeps(monkeypatch, late_ns=300 * US)  # every timed sleep wakes 300 us late
    lateness = WakeLateness(initial_ns=10 * US, floor_ns=10 * US, slack_ns=5 * US)
    for _ in range(16):
        sleep_exact_ns(1 * MS, lateness)
    # The margin has learnt the lateness (each wake was >= 300 us past its target).
    assert lateness.margin_ns() >= 300 * US


def test_the_margin_follows_the_quantile_within_its_bounds() -> None:
    lateness = WakeLateness(window=100, quantile=0.9, slack_ns=0, floor_ns=10 * US, ceiling_ns=MS)
    for late in range(100):
        lateness.observe(late * US)  # 0 .. 99 us
    assert lateness.margin_ns() == 90 * US
    for _ in range(100):
        lateness.observe(50 * MS)  # a stall of the whole machine
    assert lateness.margin_ns() == MS  # never more than the ceiling
    for _ in range(100):
        lateness.observe(-5 * US)  # woke early: counted as on time
    assert lateness.margin_ns() == 10 * US  # never less than the floor


def test_threads_share_one_calibration_safely() -> None:
    lateness = WakeLateness()
    errors: list[BaseException] = []

    def observe() -> None:
        try:
            for late in range(2000):
                lateness.observe(late)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert 10 * US <= lateness.margin_ns() <= 1000 * US
