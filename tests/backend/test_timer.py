"""timerfd sleeps: behaviour only (never how precise they are; see the report/benchmarks)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_balloon.backend.latency.timer import close_timers, sleep_ns, sleep_ns_blocking

MS = 1_000_000


def open_fds() -> set[int]:
    listed = os.listdir("/proc/self/fd")
    # drop the directory fd listdir itself used, closed by now
    return {int(name) for name in listed if os.path.lexists(f"/proc/self/fd/{name}")}


def timerfds() -> set[int]:
    return {fd for fd in open_fds() if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[timerfd]"}


def fdinfo(fd: int) -> dict[str, str]:
    lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def is_idle(fd: int) -> bool:
    """Disarmed, with no unread expiry."""
    info = fdinfo(fd)
    return info["it_value"] == "(0, 0)" and info["ticks"] == "0"


@pytest.fixture(autouse=True)
def empty_pool() -> Iterator[None]:
    close_timers()
    yield
    close_timers()


async def test_sleep_returns_at_least_the_requested_time() -> None:
    for duration in (1, 50_000, 1 * MS, 3 * MS):
        before = time.monotonic_ns()
        slept = await sleep_ns(duration)
        elapsed = time.monotonic_ns() - before
        assert slept >= duration
        assert elapsed >= slept


async def test_zero_or_negative_returns_at_once() -> None:
    baseline = timerfds()
    assert await sleep_ns(0) == 0
    assert await sleep_ns(-5) == 0
    assert timerfds() == baseline  # no timerfd needed


async def test_concurrent_sleepers_all_finish_with_one_fd_each_at_most() -> None:
    baseline = timerfds()
    durations = [(50 - i) * MS // 10 for i in range(50)]  # 5ms down to 0.1ms
    tasks = [asyncio.create_task(sleep_ns(d)) for d in durations]
    await asyncio.sleep(0)  # every sleeper has armed its timer
    assert len(timerfds() - baseline) <= 50
    slept = await asyncio.gather(*tasks)
    assert all(s >= d for s, d in zip(slept, durations, strict=True))
    pooled = timerfds() - baseline
    assert 0 < len(pooled) <= 50
    assert all(is_idle(fd) for fd in pooled)
    loop = asyncio.get_running_loop()
    assert not any(loop.remove_reader(fd) for fd in pooled)  # none left registered

    # A second wave reuses the pool instead of creating new fds.
    await asyncio.gather(*(sleep_ns(d) for d in durations))
    assert timerfds() - baseline == pooled
    close_timers()
    assert timerfds() == baseline


async def test_sequential_sleeps_reuse_one_fd() -> None:
    baseline = timerfds()
    for _ in range(20):
        await sleep_ns(10_000)
    assert len(timerfds() - baseline) == 1


async def test_cancellation_returns_the_fd_disarmed() -> None:
    baseline = open_fds()
    task = asyncio.create_task(sleep_ns(10_000 * MS))
    await asyncio.sleep(0)
    (fd,) = open_fds() - baseline
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[timerfd]"
    flags = int(fdinfo(fd)["flags"], 8)
    assert flags & os.O_NONBLOCK and flags & os.O_CLOEXEC
    assert not is_idle(fd)  # armed for 10 s
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert open_fds() - baseline == {fd}  # back in the pool, not leaked
    assert is_idle(fd)
    assert not asyncio.get_running_loop().remove_reader(fd)
    # Reused, the disarmed fd neither fires early nor stays stuck on the old 10 s.
    assert await sleep_ns(2 * MS) >= 2 * MS
    assert open_fds() - baseline == {fd}
    close_timers()
    assert open_fds() == baseline


async def test_cancelling_after_the_timer_fired_unread_drains_it() -> None:
    baseline = timerfds()
    task = asyncio.create_task(sleep_ns(1 * MS))
    await asyncio.sleep(0)
    time.sleep(0.005)  # block the loop: the timer fires but nobody reads it
    (fd,) = timerfds() - baseline
    assert fdinfo(fd)["ticks"] == "1"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert is_idle(fd)
    # The stale expiry was drained: the next sleeper on that fd waits its full time.
    for duration in (20 * MS, 5 * MS):
        assert await sleep_ns(duration) >= duration
    assert len(timerfds() - baseline) == 1


async def test_the_loop_keeps_running_during_a_sleep() -> None:
    ticks = 0
    sleeping = True

    async def ticker() -> None:
        nonlocal ticks
        while sleeping:
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    ticks_at_start = ticks
    slept = await sleep_ns(200 * MS)
    ticks_during = ticks - ticks_at_start
    sleeping = False
    await task
    assert slept >= 200 * MS
    # A sleep that blocked the loop would let the ticker run at most once.
    assert ticks_during >= 10


def test_works_across_consecutive_event_loops() -> None:
    baseline = timerfds()
    assert asyncio.run(sleep_ns(1 * MS)) >= 1 * MS
    pooled = timerfds() - baseline
    assert len(pooled) == 1
    assert asyncio.run(sleep_ns(1 * MS)) >= 1 * MS  # the same fd, in a new loop
    assert timerfds() - baseline == pooled


def test_loops_in_two_threads_share_the_pool_safely() -> None:
    results: list[list[int]] = []

    def run() -> None:
        async def many() -> list[int]:
            return list(await asyncio.gather(*(sleep_ns(MS) for _ in range(10))))

        results.append(asyncio.run(many()))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2
    assert all(s >= MS for slept in results for s in slept)


def test_blocking_sleep_returns_at_least_the_requested_time() -> None:
    assert sleep_ns_blocking(0) == 0
    assert sleep_ns_blocking(-1) == 0
    for duration in (1, 100_000, 2 * MS):
        assert sleep_ns_blocking(duration) >= duration


async def test_blocking_sleep_refuses_to_block_the_event_loop() -> None:
    with pytest.raises(RuntimeError, match="would block the event loop"):
        sleep_ns_blocking(MS)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, sleep_ns_blocking, MS) >= MS
