"""Exact sleeps for the queue threads: a timed sleep, then a short finish.

An injected delay must land where it was asked for: it is the x axis of
every study. A timed sleep alone wakes late, by the kernel's wake-up latency
(tens of microseconds on a loaded VM, more with the default 50 us timer
slack). So `sleep_exact_ns` sleeps on the clock (clock_nanosleep, the GIL
released) to shortly before the deadline and finishes with `sched_yield`
calls, each of which also releases the GIL, until the deadline has passed
(for at most SPIN_LIMIT_NS: a longer finish is slept first).

How early to wake is calibrated from how late this process's timed sleeps
really wake (`WakeLateness`): a high quantile of the recent lateness, so the
finish almost always starts before the deadline and rarely spins for long.
Every sleep returns what it really slept, measured on CLOCK_MONOTONIC, and
that is what the trace records.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque

NS_PER_S = 1_000_000_000
US = 1_000


class WakeLateness:
    """How late timed sleeps wake, and so how early an exact sleep must wake.

    `margin_ns` is the `quantile` of the last `window` observed lateness
    values plus `slack_ns`, kept within [floor_ns, ceiling_ns]: waking that
    much early, the timed sleep ends before the deadline about `quantile`
    of the time; the rest land late by the excess, and are measured.
    """

    def __init__(
        self,
        *,
        initial_ns: int = 100 * US,
        window: int = 64,
        quantile: float = 0.95,
        slack_ns: int = 5 * US,
        floor_ns: int = 10 * US,
        ceiling_ns: int = 1_000 * US,
    ) -> None:
        self._observed: deque[int] = deque(maxlen=window)
        self._quantile = quantile
        self._slack_ns = slack_ns
        self._floor_ns = floor_ns
        self._ceiling_ns = ceiling_ns
        self._margin_ns = min(max(initial_ns, floor_ns), ceiling_ns)
        self._lock = threading.Lock()  # queue threads of every session share one

    def margin_ns(self) -> int:
        return self._margin_ns

    def observe(self, late_ns: int) -> None:
        """One timed sleep woke `late_ns` after its target (negative: early)."""
        with self._lock:
            self._observed.append(max(0, late_ns))
            # Sorting 64 values takes a few microseconds, inside the margin
            # the finish spends spinning anyway.
            ordered = sorted(self._observed)
            at = min(len(ordered) - 1, int(self._quantile * len(ordered)))
            margin = ordered[at] + self._slack_ns
            self._margin_ns = min(max(margin, self._floor_ns), self._ceiling_ns)


LATENESS = WakeLateness()  # one per process: every thread wakes through the same scheduler

# The finish yields for at most this long. Quiet, a timed sleep here wakes
# 42 us late at the median and 113 us at p95; a larger margin means the
# lateness observed included waits for the GIL (other threads running Python:
# 0.5 ms median with two busy threads), which spinning cannot avoid, since
# every sched_yield returns through the GIL too. So the rest of a large margin
# is slept, and only the last SPIN_LIMIT_NS are yielded away.
SPIN_LIMIT_NS = 200 * US


def sleep_exact_ns(duration_ns: int, lateness: WakeLateness | None = None) -> int:
    """Sleep in a worker thread until `duration_ns` after the call; returns the
    ns actually slept (>= the request, and close to it).

    Refuses to run on a thread with a running event loop, which it would stall.
    """
    if duration_ns <= 0:
        return 0
    _refuse_on_event_loop()
    lateness = lateness or LATENESS
    start = time.monotonic_ns()
    deadline = start + duration_ns
    wake_at = deadline - lateness.margin_ns()
    if wake_at > start:
        # time.sleep is clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) on
        # Linux; float seconds may round a nanosecond short, which the finish covers.
        time.sleep((wake_at - start) / NS_PER_S)
        lateness.observe(time.monotonic_ns() - wake_at)
    while (now := time.monotonic_ns()) < deadline:
        if deadline - now > SPIN_LIMIT_NS:
            time.sleep((deadline - now - SPIN_LIMIT_NS) / NS_PER_S)
        else:
            os.sched_yield()  # releases the GIL: the other threads run meanwhile
    return now - start


def _refuse_on_event_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("a blocking sleep would block the event loop: sleep in a queue thread")
