"""mm/page_reporting.c as a model: when passes run, which free blocks a pass
pulls, and how they go back (written from the kernel's behaviour, not its
code).

- A free of a block of at least page_reporting_order requests reporting;
  an idle reporter starts a pass `delay_s` (2 s in Linux) later.
- A pass walks orders page_reporting_order..MAX_ORDER and, in each, the
  migratetypes in order. On each list it skips Reported blocks and pulls
  unreported ones into one scatterlist of `capacity` entries; a full list
  is reported (one report in flight: the pass waits for the device) and
  drained back. Each list gets a budget of ceil(nr_free / (capacity * 16))
  reports plus one; a list that runs out of budget asks for another pass.
  What is left in the scatterlist at the end is reported as well.
- A pass that saw a new request (or ran out of budget) schedules the next
  one `delay_s` after it ends; otherwise reporting goes idle.
- The pass does nothing when the zone has fewer free pageblocks than
  `low_watermark` plus one full report, or exactly that (Linux's watermark check).

The walk between two reports runs without awaiting, so it is atomic with
respect to the other tasks of the guest, as the zone lock makes it in Linux.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

from vhost_balloon.guest.freelists import (
    MAX_ORDER,
    PAGEBLOCK_ORDER,
    FreeArea,
    FreeBlock,
    MigrateType,
    pageblocks,
)

ReportFn = Callable[[list[FreeBlock]], Awaitable[bool]]


class ReportingState(Enum):
    IDLE = "idle"
    REQUESTED = "requested"
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class ReportingConfig:
    capacity: int = 32
    order: int = PAGEBLOCK_ORDER  # page_reporting_order
    delay_s: float = 2.0  # PAGE_REPORTING_DELAY
    budget_divisor: int = 16
    low_watermark: int = 0  # pageblocks

    def validate(self) -> None:
        if not PAGEBLOCK_ORDER <= self.order <= MAX_ORDER:
            raise ValueError(f"page_reporting_order {self.order} is outside 9..10")
        if self.capacity < 1 or self.budget_divisor < 1:
            raise ValueError("capacity and budget divisor must be positive")
        if self.delay_s < 0 or self.low_watermark < 0:
            raise ValueError("delay and watermark cannot be negative")


@dataclass(slots=True)
class Pass:
    """One reporting pass, on the monotonic clock."""

    t_start_ns: int
    t_end_ns: int = 0
    reports: int = 0
    pageblocks: int = 0


@dataclass(slots=True)
class PageReporting:
    area: FreeArea
    config: ReportingConfig
    report: ReportFn
    state: ReportingState = ReportingState.IDLE
    passes: list[Pass] = field(default_factory=list)
    errors: int = 0
    error: Exception | None = None
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False

    def notify_free(self, order: int) -> None:
        """`page_reporting_notify_free`: called for every free that may be reported."""
        if order >= self.config.order:
            self.request()

    def request(self) -> None:
        if self.state is ReportingState.REQUESTED:
            return
        previous, self.state = self.state, ReportingState.REQUESTED
        if previous is ReportingState.IDLE:
            self._schedule()

    def _schedule(self) -> None:
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.config.delay_s, self._start_pass)

    def _start_pass(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self.run_pass())

    async def run_pass(self) -> None:
        self.state = ReportingState.ACTIVE
        current = Pass(time.monotonic_ns())
        self.passes.append(current)
        try:
            await self._process_zone(current)
        except Exception as error:
            # Reporting is dead from here on (as a driver whose device broke):
            # whoever runs the model must stop, not measure a guest without it.
            self.error = error
            self.failed.set()
            return
        finally:
            current.t_end_ns = time.monotonic_ns()
        if self.state is ReportingState.REQUESTED:
            self._schedule()
        else:
            self.state = ReportingState.IDLE

    async def stop(self) -> None:
        """No new pass; the one running finishes its report in flight and stops."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await self._task

    # ------------------------------------------------------------------ a pass
    async def _process_zone(self, current: Pass) -> None:
        config = self.config
        needed = config.low_watermark + config.capacity * pageblocks(config.order)
        if self.area.free_pageblocks() <= needed:  # zone_watermark_ok wants more than the mark
            return
        scatterlist: list[FreeBlock] = []
        for order in range(config.order, MAX_ORDER + 1):
            for mt in MigrateType:
                if not await self._cycle(order, mt, scatterlist, current):
                    return
        if scatterlist and not self._stopping:
            await self._report(scatterlist, current)
        for block in scatterlist:  # stopping: back unreported
            self.area.putback(block.start, block.order, reported=False)

    async def _cycle(
        self, order: int, mt: MigrateType, scatterlist: list[FreeBlock], current: Pass
    ) -> bool:
        """One free list; False when a report failed (the pass ends)."""
        area = self.area
        free_list = area.free_list(order, mt)
        if not free_list:
            return True
        per_report = self.config.capacity * self.config.budget_divisor
        budget = math.ceil(area.nr_free(order) / per_report)
        while not self._stopping:
            room = self.config.capacity - len(scatterlist)
            unreported = [start for start in free_list if start not in area.reported]
            if not unreported:
                return True
            if budget < 0:
                self.state = ReportingState.REQUESTED
                return True
            for start in unreported[:room]:
                scatterlist.append(FreeBlock(start, area.isolate(start)))
            if len(scatterlist) < self.config.capacity:
                return True  # the list is drained; the next list fills the rest
            ok = await self._report(scatterlist, current)
            budget -= 1
            if not ok:
                return False
        return True

    async def _report(self, scatterlist: list[FreeBlock], current: Pass) -> bool:
        blocks = list(scatterlist)
        scatterlist.clear()
        ok = False
        try:
            ok = await self.report(blocks)
        except Exception:
            self.errors += 1
            raise
        finally:
            for block in blocks:  # page_reporting_drain
                self.area.putback(block.start, block.order, reported=ok)
            current.reports += 1
            current.pageblocks += sum(pageblocks(block.order) for block in blocks)
        return ok
