"""Log lines a guest can cause, limited per session.

A front-end that floods its ring with bad chains would otherwise write a
warning per chain, thousands a second, into the host's log (and through
the logging lock, hold up every session's threads). Like the kernel's
printk_ratelimit: BURST lines per INTERVAL_S, then silence, and the next
line that gets through says how many were left out. Counters are kept
elsewhere (DeviceStats): nothing is lost but repetition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

BURST = 10
INTERVAL_S = 5.0


class LimitedLog:
    """warning() and error() with at most `burst` lines per `interval_s`."""

    def __init__(
        self,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        *,
        burst: int = BURST,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._burst = burst
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window_start = float("-inf")
        self._in_window = 0
        self.suppressed = 0  # lines left out since the last one logged
        self.suppressed_total = 0

    def _admit(self) -> int | None:
        """None to stay silent, else how many lines were left out before this one."""
        now = self._clock()
        with self._lock:
            if now - self._window_start >= self._interval_s:
                self._window_start, self._in_window = now, 0
            if self._in_window >= self._burst:
                self.suppressed += 1
                self.suppressed_total += 1
                return None
            self._in_window += 1
            left_out, self.suppressed = self.suppressed, 0
            return left_out

    def log(self, level: int, message: str, *args: object) -> None:
        left_out = self._admit()
        if left_out is None:
            return
        if left_out:
            message += f" ({left_out} similar lines left out since the last one)"
        self._log.log(level, message, *args)

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def error(self, message: str, *args: object) -> None:
        self.log(logging.ERROR, message, *args)
