"""The balloon target the host set, and how long the guest took to reach it.

A target is `num_pages` in the config space; the driver reaches it when it
writes back an `actual` equal to it (Linux writes `actual` after every
inflate or deflate step). Set on the event loop (the control socket),
reached on the loop too (SET_CONFIG): no lock needed.
"""

from __future__ import annotations

import time
from typing import Any

from vhost_balloon.protocol.virtio import BALLOON_PFN_SHIFT

NS_PER_S = 1_000_000_000


class BalloonTarget:
    def __init__(self) -> None:
        self.num_pages: int | None = None  # None: never set by the host
        self.set_ns = 0
        self.reached_ns = 0  # 0: not reached yet
        self.actual = 0

    def set(self, num_pages: int, actual: int) -> None:
        self.num_pages = num_pages
        self.set_ns = time.monotonic_ns()
        self.reached_ns = self.set_ns if actual == num_pages else 0
        self.actual = actual

    def copy(self) -> BalloonTarget:
        copied = BalloonTarget()
        copied.num_pages, copied.set_ns = self.num_pages, self.set_ns
        copied.reached_ns, copied.actual = self.reached_ns, self.actual
        return copied

    def driver_reset(self) -> None:
        """The device was reset: the new driver has ballooned nothing, and the
        target (if any) is to be reached again, timed from now."""
        self.actual = 0
        if self.num_pages is not None:
            self.set(self.num_pages, 0)

    def actual_written(self, actual: int) -> None:
        self.actual = actual
        if self.num_pages is not None and not self.reached_ns and actual == self.num_pages:
            self.reached_ns = time.monotonic_ns()

    @property
    def seconds_to_target(self) -> float | None:
        """How long the last target took to reach; None while it is not reached."""
        if self.num_pages is None or not self.reached_ns:
            return None
        return (self.reached_ns - self.set_ns) / NS_PER_S

    def describe(self, guest_ram_bytes: int) -> dict[str, Any]:
        """The target and `actual` as sizes (QEMU's query-balloon reports
        ram - actual; these are the ballooned bytes themselves)."""
        pending = None
        if self.num_pages is not None and not self.reached_ns:
            pending = (time.monotonic_ns() - self.set_ns) / NS_PER_S
        num_pages = self.num_pages or 0
        return {
            "target_set": self.num_pages is not None,
            "target_bytes": guest_ram_bytes - (num_pages << BALLOON_PFN_SHIFT),
            "target_pages": num_pages,
            "ballooned_bytes": self.actual << BALLOON_PFN_SHIFT,
            "seconds_to_target": self.seconds_to_target,
            "pending_seconds": pending,
        }
