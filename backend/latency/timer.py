"""Precise sleeps: a timerfd on the event loop, clock_nanosleep in threads.

asyncio.sleep is only millisecond-precise: the epoll selector rounds its
timeout up to whole milliseconds, so an injected 100 us delay becomes about
1 ms. Instead `sleep_ns` arms a Linux timerfd for an absolute CLOCK_MONOTONIC
deadline and waits for it to become readable through `loop.add_reader`; the
loop blocks in epoll until the hrtimer fires, and timerfds get no timer
slack.

The timerfds are loop-independent kernel objects, so one process-wide pool
serves every event loop (tests run a new loop per test): a sleeper takes an
idle fd or creates one, registers it only with its own running loop, and
gives it back disarmed and drained, on every path including cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time

from vhost_balloon.backend.libc import (
    CLOCK_MONOTONIC,
    TFD_CLOEXEC,
    TFD_NONBLOCK,
    TFD_TIMER_ABSTIME,
    timerfd_create,
    timerfd_settime,
)

NS_PER_S = 1_000_000_000
_MAX_IDLE = 256  # idle timerfds kept; a burst of more sleepers closes the surplus

_pool_lock = threading.Lock()  # loops in several threads may share the pool
_idle: list[int] = []


def _create() -> int:
    return timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)


def _arm(fd: int, deadline_ns: int) -> None:
    """One-shot expiry at an absolute CLOCK_MONOTONIC time (a past one fires at once)."""
    timerfd_settime(fd, TFD_TIMER_ABSTIME, deadline_ns)


def _acquire() -> int:
    with _pool_lock:
        if _idle:
            return _idle.pop()
    return _create()


def _release(fd: int, clean: bool) -> None:
    """Back to the pool; unless the expiry was consumed, disarm and drain it first."""
    if not clean:
        try:
            timerfd_settime(fd, 0, 0)  # an expiry of 0 disarms
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)  # an expiry that fired but was never read
        except OSError:
            os.close(fd)  # not trustworthy for reuse
            return
    with _pool_lock:
        if len(_idle) < _MAX_IDLE:
            _idle.append(fd)
            return
    os.close(fd)


def _on_expiry(fd: int, waiter: asyncio.Future[None]) -> None:
    try:
        os.read(fd, 8)  # the expiration count; reading it clears readability
    except BlockingIOError:
        return  # spurious wake-up: not expired yet
    except OSError as error:
        if not waiter.done():
            waiter.set_exception(error)
        return
    if not waiter.done():
        waiter.set_result(None)


async def sleep_ns(duration_ns: int) -> int:
    """Sleep in the running event loop with ~tens-of-us precision.

    Returns the ns actually slept (time.monotonic_ns based, always >= the
    request); 0 or negative returns at once with 0, without yielding.
    """
    if duration_ns <= 0:
        return 0
    loop = asyncio.get_running_loop()
    start = time.monotonic_ns()
    # Absolute deadline: time spent before arming still counts toward the sleep.
    deadline = start + duration_ns
    fd = _acquire()
    clean = False
    try:
        while True:
            _arm(fd, deadline)
            waiter = loop.create_future()
            loop.add_reader(fd, _on_expiry, fd, waiter)
            try:
                await waiter
            finally:
                loop.remove_reader(fd)  # also cancels a callback already queued
            # The one-shot timer expired and its count was read: fd is reusable as is.
            clean = True
            now = time.monotonic_ns()
            if now >= deadline:  # same clock as the timer, so always true in practice
                return now - start
            clean = False
    finally:
        _release(fd, clean)


def sleep_ns_blocking(duration_ns: int) -> int:
    """Sleep in a worker thread; returns the ns actually slept (>= the request).

    time.sleep is clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) on Linux,
    precise to the thread's timer slack (50 us by default). Refuses to run on
    a thread with a running event loop, which it would stall.
    """
    if duration_ns <= 0:
        return 0
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("sleep_ns_blocking would block the event loop; await sleep_ns")
    start = time.monotonic_ns()
    deadline = start + duration_ns
    while (now := time.monotonic_ns()) < deadline:
        time.sleep((deadline - now) / NS_PER_S)  # float seconds may round a ns short
    return now - start


def close_timers() -> None:
    """Close the idle pooled timerfds (tests, shutdown); busy ones return later."""
    with _pool_lock:
        fds = _idle[:]
        _idle.clear()
    for fd in fds:
        os.close(fd)
