"""Contiguous allocation attempts (guest/contig.py) against the free lists.

The zone in most tests is 16 pageblocks (32 MiB) with 0..1 reserved and a
16 MiB aligned allocation: the candidates are pageblocks [0, 8), never
valid, and [8, 16), the target. At boot the order-10 list reads
[14, 12, 10, 8, 6, 4, 2].
"""

from __future__ import annotations

import asyncio

import pytest

from vhost_balloon.guest.contig import (
    AttemptResult,
    ContigConfig,
    Outcome,
    attempt,
    blocked_by_reports,
    candidate_ranges,
    free_range,
)
from vhost_balloon.guest.freelists import (
    MAX_ORDER,
    PAGEBLOCK_ORDER,
    BlockState,
    FreeArea,
    FreeBlock,
    FreeListError,
    MigrateType,
)
from vhost_balloon.guest.page_reporting import PageReporting, ReportingConfig, ReportingState

O9, O10 = PAGEBLOCK_ORDER, MAX_ORDER
MiB = 1 << 20
CONFIG = ContigConfig(size=16 * MiB, align=16 * MiB)
TARGET = range(8, 16)


def _zone() -> FreeArea:
    return FreeArea.boot(16, range(2))


def _order10(area: FreeArea) -> list[int]:
    return list(area.free_list(O10, MigrateType.MOVABLE))


def test_the_candidates_are_the_aligned_ranges_lowest_first() -> None:
    assert candidate_ranges(_zone(), CONFIG) == [range(0, 8), TARGET]
    overlapping = ContigConfig(size=16 * MiB, align=8 * MiB)
    assert candidate_ranges(_zone(), overlapping) == [range(0, 8), range(4, 12), TARGET]
    assert candidate_ranges(FreeArea(7), CONFIG) == []
    assert (CONFIG.size_pageblocks, CONFIG.align_pageblocks) == (8, 8)


def test_an_attempt_takes_the_first_valid_range_and_marks_it_contig() -> None:
    area = _zone()
    result = attempt(area, CONFIG)
    assert result == AttemptResult(Outcome.OK, 8)
    assert result.ok
    assert area.state[8:16] == [BlockState.CONTIG] * 8
    assert area.state[2:8] == [BlockState.FREE] * 6
    assert _order10(area) == [6, 4, 2]
    assert area.free_pageblocks() == 6


def test_an_attempt_overlapping_an_in_flight_report_fails_on_its_first_held_pageblock() -> None:
    area = _zone()
    assert area.isolate(14) == O10  # what a report of [14, 12] pulls
    assert area.isolate(12) == O10
    result = attempt(area, CONFIG)
    assert result == AttemptResult(Outcome.HELD, start=8, first_busy=12)
    assert not result.ok
    # A failed attempt changes nothing.
    assert area.state[8:12] == [BlockState.FREE] * 4
    assert area.state[12:16] == [BlockState.HELD] * 4
    assert _order10(area) == [10, 8, 6, 4, 2]

    # The report's used entry arrives: putback, and the same attempt works.
    area.putback(14, O10, reported=True)
    area.putback(12, O10, reported=True)
    assert attempt(area, CONFIG) == AttemptResult(Outcome.OK, 8)
    assert area.reported == set()  # 12 and 14 were taken with the range


def test_a_report_holding_the_range_start_is_the_first_busy_pageblock() -> None:
    area = _zone()
    area.isolate(8)
    area.isolate(14)
    assert attempt(area, CONFIG) == AttemptResult(Outcome.HELD, start=8, first_busy=8)


def test_a_held_range_is_skipped_for_a_later_valid_one() -> None:
    area = FreeArea.boot(24, range(2))  # candidates [0, 8) reserved, [8, 16), [16, 24)
    area.isolate(10)
    assert attempt(area, CONFIG) == AttemptResult(Outcome.OK, 16)
    assert attempt(area, CONFIG) == AttemptResult(Outcome.HELD, start=8, first_busy=10)


async def test_an_attempt_during_a_pass_fails_then_succeeds_after_the_ack() -> None:
    area = _zone()
    # A previous pass reported 10 and 8, so this pass reports [14, 12] and
    # then [6, 4]: only its first report overlaps the target.
    for start in (10, 8):
        area.putback(start, area.isolate(start), reported=True)
    assert _order10(area) == [14, 12, 6, 4, 2, 10, 8]

    gate: list[asyncio.Future[bool]] = []
    seen: list[list[FreeBlock]] = []
    arrived = asyncio.Event()

    async def report(blocks: list[FreeBlock]) -> bool:
        seen.append(list(blocks))
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        gate.append(future)
        arrived.set()
        return await future

    async def next_report() -> list[FreeBlock]:
        await asyncio.wait_for(arrived.wait(), 5.0)
        arrived.clear()
        return seen[-1]

    reporting = PageReporting(area, ReportingConfig(capacity=2, delay_s=0.01), report)
    reporting.request()
    try:
        assert await next_report() == [FreeBlock(14, O10), FreeBlock(12, O10)]
        failed = attempt(area, CONFIG)
        assert failed == AttemptResult(Outcome.HELD, start=8, first_busy=12)

        gate[-1].set_result(True)  # the ack: putback, then the next report
        assert await next_report() == [FreeBlock(6, O10), FreeBlock(4, O10)]
        retried = attempt(area, CONFIG)
        assert retried == AttemptResult(Outcome.OK, 8)
        assert area.state[8:16] == [BlockState.CONTIG] * 8
        gate[-1].set_result(True)
        # Budget ceil(7/32) = 1 gave two reports: 2 waits for the next pass.
        assert await next_report() == [FreeBlock(2, O10)]
        gate[-1].set_result(True)
    finally:
        await reporting.stop()
    assert reporting.state is ReportingState.IDLE
    assert area.reported == {2, 4, 6}


def test_a_reserved_pageblock_in_the_only_range_means_no_range() -> None:
    area = FreeArea.boot(8, range(1))
    assert attempt(area, CONFIG) == AttemptResult(Outcome.NO_RANGE)
    assert area.free_pageblocks() == 7
    area = FreeArea.boot(8, range(0))
    index = area.allocate(O9)
    assert index == 6
    area.reserve(index)
    assert attempt(area, CONFIG) == AttemptResult(Outcome.NO_RANGE)


def test_a_range_already_allocated_contiguously_is_not_valid() -> None:
    area = _zone()
    assert attempt(area, CONFIG).ok
    assert attempt(area, CONFIG) == AttemptResult(Outcome.NO_RANGE)


def test_a_zone_smaller_than_the_allocation_has_no_range() -> None:
    assert attempt(FreeArea.boot(6, range(0)), CONFIG) == AttemptResult(Outcome.NO_RANGE)


def test_movable_blocks_in_the_range_are_migrated_out() -> None:
    area = _zone()
    # From the head: 14 (15 goes to order 9), then 15, then 12 (13 to order 9).
    assert [area.allocate(O9) for _ in range(3)] == [14, 15, 12]
    assert area.free_pageblocks() == 11

    result = attempt(area, CONFIG)
    # The range's free pageblocks leave the lists first; the movable ones go
    # to the head of what is left: 6 (7 split off), then 7, then 4 (5 split off).
    assert result == AttemptResult(Outcome.OK, 8, moved=((12, 6), (14, 7), (15, 4)))
    assert area.state[8:16] == [BlockState.CONTIG] * 8
    assert [area.state[i] for i in (4, 6, 7)] == [BlockState.USED] * 3
    assert list(area.blocks()) == [FreeBlock(2, O10), FreeBlock(5, O9)]
    assert area.free_pageblocks() == 3


def test_no_memory_when_the_movable_blocks_have_nowhere_to_go() -> None:
    area = _zone()
    taken = [area.allocate(O9) for _ in range(8)]
    assert taken == [14, 15, 12, 13, 10, 11, 8, 9]  # the whole target is in use
    before = (list(area.state), dict(area.order_of))
    # 8 movable pageblocks, 6 free outside the range.
    assert attempt(area, CONFIG) == AttemptResult(Outcome.NO_MEMORY, start=8)
    assert (list(area.state), dict(area.order_of)) == before

    # Freeing 8 and 9 leaves 6 to move and exactly 6 free outside.
    area.release(8)
    assert area.release(9) == FreeBlock(8, O10)
    result = attempt(area, CONFIG)
    assert result.outcome is Outcome.OK
    assert result.moved == ((10, 6), (11, 7), (12, 4), (13, 5), (14, 2), (15, 3))
    assert area.free_pageblocks() == 0
    assert area.state[2:8] == [BlockState.USED] * 6


def test_held_wins_over_no_memory_in_the_result() -> None:
    # [8, 16) is held in part, [16, 24) is full of movable blocks with no room.
    area = FreeArea.boot(24, range(2))
    for index in range(16, 24):
        area.take_range(index, 1, BlockState.USED)
    for index in range(2, 8):
        area.take_range(index, 1, BlockState.USED)
    area.isolate(10)
    assert area.free_pageblocks() == 6  # 8, 9, 12..15
    assert attempt(area, CONFIG) == AttemptResult(Outcome.HELD, start=8, first_busy=10)


def test_free_range_puts_the_range_back_merged_and_unreported() -> None:
    area = _zone()
    for start in (14, 12, 10, 8, 6, 4, 2):  # a pass reported everything
        area.putback(start, area.isolate(start), reported=True)
    assert area.reported_pageblocks() == 14
    assert attempt(area, CONFIG).ok
    assert area.reported_pageblocks() == 6

    # Pageblock by pageblock: each odd one merges with the even one before it.
    assert free_range(area, 8, 8) == [O9, O10, O9, O10, O9, O10, O9, O10]
    assert area.state[8:16] == [BlockState.FREE] * 8
    assert _order10(area)[:4] == [14, 12, 10, 8]  # at the head
    assert area.reported == {2, 4, 6}
    assert area.free_pageblocks() == 14


async def test_a_freed_range_is_reported_again() -> None:
    area = _zone()
    for start in (14, 12, 10, 8, 6, 4, 2):
        area.putback(start, area.isolate(start), reported=True)
    assert attempt(area, CONFIG).ok
    seen: list[list[FreeBlock]] = []

    async def report(blocks: list[FreeBlock]) -> bool:
        seen.append(list(blocks))
        return True

    reporting = PageReporting(area, ReportingConfig(capacity=4, delay_s=0.01), report)
    for order in free_range(area, 8, 8):
        reporting.notify_free(order)
    assert reporting.state is ReportingState.REQUESTED
    await reporting.run_pass()
    await reporting.stop()
    assert seen == [[FreeBlock(start, O10) for start in (14, 12, 10, 8)]]
    assert area.reported_pageblocks() == 14


def test_free_range_of_something_not_allocated_is_refused() -> None:
    area = _zone()
    with pytest.raises(FreeListError):
        free_range(area, 8, 8)


@pytest.mark.parametrize(
    "config",
    [
        ContigConfig(size=3 * MiB),
        ContigConfig(size=1 * MiB),
        ContigConfig(align=6 * MiB),
        ContigConfig(align=3 * MiB),
        ContigConfig(rate=0),
        ContigConfig(retries=-1),
        ContigConfig(backoff_s=-0.1),
        ContigConfig(hold_s=-1),
    ],
)
def test_bad_contig_configs_are_refused(config: ContigConfig) -> None:
    with pytest.raises(ValueError):
        config.validate()


def test_good_contig_config_in_pageblocks() -> None:
    config = ContigConfig(size=6 * MiB, align=8 * MiB)
    config.validate()
    assert (config.size_pageblocks, config.align_pageblocks) == (3, 4)


def test_blocked_means_every_valid_range_holds_a_reported_block() -> None:
    area = FreeArea.boot(32, range(2))  # ranges 0-7 (reserved: invalid), 8-15, 16-23, 24-31
    assert not blocked_by_reports(area, CONFIG)
    area.isolate(8)  # a report holds 8-9: 16-23 and 24-31 are still free
    assert not blocked_by_reports(area, CONFIG)
    assert attempt(area, CONFIG) == AttemptResult(Outcome.OK, 16)
    area.isolate(24)  # now every valid range holds a reported block (16-23 is taken)
    assert blocked_by_reports(area, CONFIG)
    assert attempt(area, CONFIG).outcome is Outcome.HELD
    area.putback(24, O10, reported=True)
    assert not blocked_by_reports(area, CONFIG)


def test_no_valid_range_is_not_blocked_by_reports() -> None:
    area = FreeArea.boot(8, range(2))  # the only range holds reserved blocks
    assert not blocked_by_reports(area, CONFIG)
