"""Reporting passes (guest/page_reporting.py) against a fake device.

The fake `report` coroutine records every scatterlist and, when gated,
keeps it in flight until the test acknowledges it, so the test can look at
the free lists while pages are held. Expected reports are worked out by
hand: a boot-time zone of 2N pageblocks is N order-10 blocks whose list
reads from the highest start down, each list gets
ceil(nr_free / (capacity * divisor)) + 1 reports, and putbacks go to the
tail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import pytest

from vhost_balloon.guest.freelists import (
    MAX_ORDER,
    PAGEBLOCK_ORDER,
    BlockState,
    FreeArea,
    FreeBlock,
    MigrateType,
    pageblocks,
)
from vhost_balloon.guest.page_reporting import PageReporting, ReportingConfig, ReportingState

O9, O10 = PAGEBLOCK_ORDER, MAX_ORDER
DELAY_S = 0.01
IDLE, REQUESTED, ACTIVE = ReportingState.IDLE, ReportingState.REQUESTED, ReportingState.ACTIVE


class FakeDevice:
    """A `report` coroutine: records what it is given, answers `results` in turn."""

    def __init__(
        self,
        area: FreeArea,
        *,
        gated: bool = False,
        results: Iterable[bool] = (),
        raises: int = 0,
    ) -> None:
        self.area = area
        self.gated = gated
        self.results = list(results)
        self.raises = raises  # how many first reports raise
        self.reports: list[list[FreeBlock]] = []
        self.states: list[set[BlockState]] = []  # states of the blocks when handed over
        self._pending: asyncio.Future[bool] | None = None
        self._arrived = asyncio.Event()

    async def __call__(self, blocks: list[FreeBlock]) -> bool:
        self.reports.append(list(blocks))
        self.states.append(
            {
                self.area.state[index]
                for block in blocks
                for index in range(block.start, block.start + pageblocks(block.order))
            }
        )
        if self.raises:
            self.raises -= 1
            raise RuntimeError("the device went away")
        ok = self.results.pop(0) if self.results else True
        if not self.gated:
            return ok
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending = future
        self._arrived.set()
        await future
        return ok

    async def in_flight(self) -> list[FreeBlock]:
        """Wait until a report is held by the device; returns it."""
        await asyncio.wait_for(self._arrived.wait(), 5.0)
        return self.reports[-1]

    def ack(self) -> None:
        """Complete the report in flight (the used entry arrives)."""
        assert self._pending is not None, "no report in flight"
        future, self._pending = self._pending, None
        self._arrived.clear()
        future.set_result(True)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `predicate` on the event loop; whether it became true in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


def blocks10(*starts: int) -> list[FreeBlock]:
    return [FreeBlock(start, O10) for start in starts]


def _reporting(
    area: FreeArea,
    device: FakeDevice,
    *,
    capacity: int,
    order: int = O9,
    budget_divisor: int = 16,
    low_watermark: int = 0,
) -> PageReporting:
    settings = ReportingConfig(
        capacity=capacity,
        order=order,
        delay_s=DELAY_S,
        budget_divisor=budget_divisor,
        low_watermark=low_watermark,
    )
    settings.validate()
    return PageReporting(area, settings, device)


async def test_a_pass_below_the_watermark_reports_nothing() -> None:
    area = FreeArea.boot(3, range(0))  # 3 free pageblocks < one report of 4
    device = FakeDevice(area)
    reporting = _reporting(area, device, capacity=4)
    await reporting.run_pass()
    assert device.reports == []
    assert [p.reports for p in reporting.passes] == [0]
    assert reporting.state is IDLE
    assert area.reported == set()


@pytest.mark.parametrize(("low_watermark", "reports"), [(5, 0), (3, 2)])
async def test_the_watermark_adds_to_one_full_report(low_watermark: int, reports: int) -> None:
    # 6 free pageblocks; capacity 2 needs 2 + low_watermark of them.
    area = FreeArea.boot(6, range(0))
    device = FakeDevice(area)
    reporting = _reporting(area, device, capacity=2, low_watermark=low_watermark)
    await reporting.run_pass()
    assert len(device.reports) == reports
    if reports:  # [4, 2] full, then [0] as the leftover
        assert device.reports == [blocks10(4, 2), blocks10(0)]
        assert area.reported == {0, 2, 4}
    assert reporting.state is IDLE


@pytest.mark.parametrize(
    ("count", "capacity", "divisor", "first_pass", "requested"),
    [
        # 6 order-10 blocks, capacity 2: budget ceil(6/32) = 1, 2 reports, 2 blocks left
        (12, 2, 16, 2, True),
        # 40 blocks, capacity 1: budget ceil(40/16) = 3, 4 reports
        (80, 1, 16, 4, True),
        # 5 blocks, capacity 1, divisor 2: budget ceil(5/2) = 3, 4 reports, 1 left
        (10, 1, 2, 4, True),
        # 10 blocks, capacity 2, divisor 1: budget 5 would allow 6, the list drains after 5
        (20, 2, 1, 5, False),
        # 7 blocks, capacity 3, divisor 1: budget 3; 3 + 3 full, 1 as the leftover
        (14, 3, 1, 3, False),
    ],
)
async def test_each_list_gets_its_budget_plus_one_reports(
    count: int, capacity: int, divisor: int, first_pass: int, requested: bool
) -> None:
    area = FreeArea.boot(count, range(0))
    device = FakeDevice(area)
    reporting = _reporting(area, device, capacity=capacity, budget_divisor=divisor)
    await reporting.run_pass()
    try:
        assert len(device.reports) == first_pass
        assert reporting.passes[0].reports == first_pass
        blocks = sum(len(report) for report in device.reports)
        assert reporting.passes[0].pageblocks == 2 * blocks
        assert len(area.reported) == blocks
        assert reporting.state is (REQUESTED if requested else IDLE)
    finally:
        await reporting.stop()


async def test_out_of_budget_schedules_another_pass_that_finishes_the_list() -> None:
    area = FreeArea.boot(12, range(0))  # order-10 list [10, 8, 6, 4, 2, 0]
    device = FakeDevice(area)
    reporting = _reporting(area, device, capacity=2)
    await reporting.run_pass()
    assert device.reports == [blocks10(10, 8), blocks10(6, 4)]
    assert reporting.state is REQUESTED
    # The reported ones went to the tail; 2 and 0 wait for the next pass.
    assert list(area.free_list(O10, MigrateType.MOVABLE)) == [2, 0, 10, 8, 6, 4]

    assert await until(lambda: len(reporting.passes) == 2 and reporting.state is IDLE)
    assert device.reports[2:] == [blocks10(2, 0)]
    assert [p.reports for p in reporting.passes] == [2, 1]
    assert area.reported == {0, 2, 4, 6, 8, 10}
    assert area.reported_pageblocks() == 12
    await asyncio.sleep(5 * DELAY_S)
    assert len(reporting.passes) == 2  # everything reported: idle, no new pass
    await reporting.stop()


async def test_a_request_starts_a_pass_after_the_delay_and_repeats_do_not_stack() -> None:
    area = FreeArea.boot(12, range(0))
    device = FakeDevice(area)
    reporting = _reporting(area, device, capacity=2, budget_divisor=1)  # one pass does all
    reporting.notify_free(O9)
    assert reporting.state is REQUESTED
    assert reporting.passes == []  # not before the delay
    reporting.notify_free(O10)
    reporting.request()
    assert await until(lambda: reporting.state is IDLE)
    await asyncio.sleep(5 * DELAY_S)
    assert len(reporting.passes) == 1
    assert len(device.reports) == 3
    await reporting.stop()


async def test_blocks_are_held_while_the_report_is_in_flight_and_reported_after() -> None:
    area = FreeArea.boot(8, range(0))  # order-10 list [6, 4, 2, 0]
    device = FakeDevice(area, gated=True)
    reporting = _reporting(area, device, capacity=2)
    reporting.request()

    assert await device.in_flight() == blocks10(6, 4)
    assert reporting.state is ACTIVE
    assert device.states == [{BlockState.HELD}]
    assert area.state[4:8] == [BlockState.HELD] * 4
    assert area.free_pageblocks() == 4
    assert 4 not in area.order_of and 6 not in area.order_of
    assert area.reported == set()
    device.ack()

    assert await device.in_flight() == blocks10(2, 0)
    assert area.state[4:8] == [BlockState.FREE] * 4
    assert area.reported == {4, 6}
    assert area.state[0:4] == [BlockState.HELD] * 4
    device.ack()

    assert await until(lambda: reporting.state is IDLE)
    assert area.reported == {0, 2, 4, 6}
    assert list(area.free_list(O10, MigrateType.MOVABLE)) == [6, 4, 2, 0]
    assert area.count_state(BlockState.HELD) == 0
    await reporting.stop()


async def test_the_scatterlist_carries_over_from_one_list_to_the_next() -> None:
    # 0 reserved: 1 is order 9, then order-10 blocks [4, 2].
    area = FreeArea.boot(6, range(1))
    device = FakeDevice(area)
    reporting = _reporting(area, device, capacity=2)
    await reporting.run_pass()
    assert device.reports == [[FreeBlock(1, O9), FreeBlock(4, O10)], [FreeBlock(2, O10)]]
    assert area.reported == {1, 2, 4}
    assert area.reported_pageblocks() == 5
    assert reporting.state is IDLE


async def test_a_buddy_freed_during_a_report_merges_on_putback_and_is_reported_again() -> None:
    area = FreeArea.boot(4, range(0))
    assert area.allocate(O9) == 2  # 3 stays free at order 9
    device = FakeDevice(area, gated=True)
    reporting = _reporting(area, device, capacity=2)
    reporting.request()

    assert await device.in_flight() == [FreeBlock(3, O9), FreeBlock(0, O10)]
    assert area.release(2) == FreeBlock(2, O9)  # its buddy 3 is held: no merge
    reporting.notify_free(O9)
    assert reporting.state is REQUESTED
    device.ack()

    # 3 merged with 2 into a new, unreported order-10 block at the tail:
    # the same pass picks it up as its leftover.
    assert await device.in_flight() == [FreeBlock(2, O10)]
    assert area.reported == {0}
    device.ack()

    # The request made during the pass gives a second pass; nothing is left.
    assert await until(lambda: len(reporting.passes) == 2 and reporting.state is IDLE)
    assert [p.reports for p in reporting.passes] == [2, 0]
    assert area.reported == {0, 2}
    await reporting.stop()


async def test_a_free_below_the_reporting_order_does_not_request() -> None:
    area = FreeArea.boot(8, range(0))
    device = FakeDevice(area)
    reporting = _reporting(area, device, capacity=2, order=O10)
    reporting.notify_free(O9)
    assert reporting.state is IDLE
    await asyncio.sleep(5 * DELAY_S)
    assert reporting.passes == []

    reporting.notify_free(O10)
    assert reporting.state is REQUESTED
    assert await until(lambda: len(reporting.passes) == 1 and reporting.state is IDLE)
    assert device.reports == [blocks10(6, 4), blocks10(2, 0)]
    await reporting.stop()


async def test_a_failed_report_puts_the_blocks_back_unreported_and_ends_the_pass() -> None:
    area = FreeArea.boot(12, range(0))  # [10, 8, 6, 4, 2, 0]
    device = FakeDevice(area, results=[False])
    reporting = _reporting(area, device, capacity=2)
    await reporting.run_pass()
    assert device.reports == [blocks10(10, 8)]
    assert [p.reports for p in reporting.passes] == [1]
    assert area.reported == set()
    assert list(area.free_list(O10, MigrateType.MOVABLE)) == [6, 4, 2, 0, 10, 8]
    assert area.count_state(BlockState.HELD) == 0
    assert reporting.state is IDLE
    assert reporting.errors == 0
    await asyncio.sleep(5 * DELAY_S)
    assert len(reporting.passes) == 1
    await reporting.stop()


async def test_a_report_that_raises_ends_reporting_and_says_so() -> None:
    area = FreeArea.boot(8, range(0))  # [6, 4, 2, 0]
    device = FakeDevice(area, raises=1)
    reporting = _reporting(area, device, capacity=2)
    reporting.request()
    await asyncio.wait_for(reporting.failed.wait(), 5.0)
    assert isinstance(reporting.error, RuntimeError)
    assert reporting.errors == 1
    assert device.reports == [blocks10(6, 4)]
    # The blocks of the broken report went back, unreported.
    assert area.reported == set()
    assert area.count_state(BlockState.HELD) == 0
    assert list(area.free_list(O10, MigrateType.MOVABLE)) == [2, 0, 6, 4]
    # Reporting is dead: a later free does not start another pass.
    reporting.notify_free(O10)
    await asyncio.sleep(5 * DELAY_S)
    assert len(reporting.passes) == 1
    assert len(device.reports) == 1
    await asyncio.wait_for(reporting.stop(), 5.0)  # and stopping it does not raise


async def test_stop_waits_for_the_report_in_flight_and_no_pass_follows() -> None:
    area = FreeArea.boot(12, range(0))
    device = FakeDevice(area, gated=True)
    reporting = _reporting(area, device, capacity=2)
    reporting.request()
    assert await device.in_flight() == blocks10(10, 8)

    stopping = asyncio.get_running_loop().create_task(reporting.stop())
    await asyncio.sleep(5 * DELAY_S)
    assert not stopping.done()  # it waits for the device
    device.ack()
    await asyncio.wait_for(stopping, 5.0)

    assert device.reports == [blocks10(10, 8)]  # no further report
    assert area.reported == {8, 10}
    assert area.count_state(BlockState.HELD) == 0
    assert area.free_pageblocks() == 12
    reporting.notify_free(O10)
    await asyncio.sleep(5 * DELAY_S)
    assert len(reporting.passes) == 1
    assert len(device.reports) == 1


async def test_stop_before_the_delay_cancels_the_pass() -> None:
    area = FreeArea.boot(8, range(0))
    device = FakeDevice(area)
    reporting = _reporting(area, device, capacity=2)
    reporting.request()
    await reporting.stop()
    await asyncio.sleep(5 * DELAY_S)
    assert reporting.passes == []
    assert device.reports == []


@pytest.mark.parametrize(
    "config",
    [
        ReportingConfig(order=8),
        ReportingConfig(order=11),
        ReportingConfig(capacity=0),
        ReportingConfig(budget_divisor=0),
        ReportingConfig(delay_s=-1.0),
        ReportingConfig(low_watermark=-1),
    ],
)
def test_bad_reporting_configs_are_refused(config: ReportingConfig) -> None:
    with pytest.raises(ValueError):
        config.validate()
