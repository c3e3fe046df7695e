"""The buddy free lists over pageblocks (guest/freelists.py), pure bookkeeping.

Every expectation below is worked out by hand from mm/page_alloc.c's rules:
a block's buddy is `start ^ pageblocks(order)`, a normal free links at the
head, the reporting putback links at the tail, a merged block is new (so it
is not Reported) and a split hands the upper halves back unreported.
"""

from __future__ import annotations

import pytest

from vhost_balloon.guest.freelists import (
    MAX_ORDER,
    PAGEBLOCK_BYTES,
    PAGEBLOCK_ORDER,
    BlockState,
    FreeArea,
    FreeBlock,
    FreeListError,
    MigrateType,
    pageblocks,
)

O9, O10 = PAGEBLOCK_ORDER, MAX_ORDER
MOVABLE, UNMOVABLE = MigrateType.MOVABLE, MigrateType.UNMOVABLE


def _list(area: FreeArea, order: int, mt: MigrateType = MOVABLE) -> list[int]:
    """A free list from head to tail."""
    return list(area.free_list(order, mt))


def _report(area: FreeArea, start: int) -> FreeBlock:
    """What one successful report does to a free block: isolate, then put back."""
    return area.putback(start, area.isolate(start), reported=True)


def test_constants_describe_2mib_pageblocks_and_4mib_max_order() -> None:
    assert PAGEBLOCK_BYTES == 2 << 20
    assert (pageblocks(O9), pageblocks(O10)) == (1, 2)


def test_boot_merges_pageblocks_into_order_10_blocks_around_the_reserved_range() -> None:
    # 10 pageblocks, 0..2 reserved: 3 has a reserved buddy (2) and stays
    # order 9; 4+5, 6+7, 8+9 merge. Each free links at the head, so the
    # order-10 list reads from the last block freed.
    area = FreeArea.boot(10, range(3))
    assert _list(area, O9) == [3]
    assert _list(area, O10) == [8, 6, 4]
    assert (area.nr_free(O9), area.nr_free(O10)) == (1, 3)
    assert area.free_pageblocks() == 7
    assert area.count_state(BlockState.RESERVED) == 3
    assert area.count_state(BlockState.FREE) == 7
    assert list(area.blocks()) == [
        FreeBlock(3, O9),
        FreeBlock(4, O10),
        FreeBlock(6, O10),
        FreeBlock(8, O10),
    ]
    assert area.reported == set()
    assert all(
        not _list(area, order, mt)
        for order in (O9, O10)
        for mt in (UNMOVABLE, MigrateType.RECLAIMABLE)
    )


def test_boot_leaves_a_last_pageblock_without_buddy_at_order_9() -> None:
    # 5 pageblocks: the buddy of 4 would be 5, outside the zone.
    area = FreeArea.boot(5, range(0))
    assert _list(area, O10) == [2, 0]
    assert _list(area, O9) == [4]
    assert area.free_pageblocks() == 5


def test_a_zone_needs_a_pageblock() -> None:
    with pytest.raises(FreeListError):
        FreeArea(0)


def test_free_next_to_a_free_buddy_merges_and_clears_reported() -> None:
    area = FreeArea(4)  # all reserved
    assert area.free(0) == FreeBlock(0, O9)  # buddy 1 is reserved
    assert _report(area, 0) == FreeBlock(0, O9)
    assert area.reported == {0}
    assert area.reported_pageblocks() == 1

    assert area.free(1) == FreeBlock(0, O10)
    assert area.reported == set()
    assert area.reported_pageblocks() == 0
    assert _list(area, O9) == []
    assert _list(area, O10) == [0]


def test_free_of_the_lower_half_merges_with_a_reported_upper_buddy() -> None:
    area = FreeArea(4)
    area.free(3)
    _report(area, 3)
    assert area.reported == {3}
    assert area.free(2) == FreeBlock(2, O10)
    assert area.reported == set()
    assert _list(area, O10) == [2]
    assert area.order_of == {2: O10}


def test_free_next_to_a_held_buddy_does_not_merge() -> None:
    area = FreeArea(4)
    area.free(0)
    assert area.isolate(0) == O9
    assert area.state[0] is BlockState.HELD
    assert area.free_pageblocks() == 0  # held is neither free nor in use

    assert area.free(1) == FreeBlock(1, O9)
    assert _list(area, O9) == [1]

    # The report comes back: now the buddy is free, so they merge, and the
    # merged block is not Reported even though the report succeeded.
    assert area.putback(0, O9, reported=True) == FreeBlock(0, O10)
    assert area.reported == set()
    assert _list(area, O9) == []
    assert _list(area, O10) == [0]


def test_putback_goes_to_the_tail_and_is_reported_when_it_did_not_merge() -> None:
    area = FreeArea(8)
    for index in (0, 2, 4):  # odd buddies stay reserved
        area.free(index)
    assert _list(area, O9) == [4, 2, 0]

    assert area.isolate(4) == O9
    assert _list(area, O9) == [2, 0]
    assert area.putback(4, O9, reported=True) == FreeBlock(4, O9)
    assert _list(area, O9) == [2, 0, 4]
    assert area.reported == {4}

    area.isolate(2)
    area.putback(2, O9, reported=False)  # a failed report
    assert _list(area, O9) == [0, 4, 2]
    assert area.reported == {4}

    area.free(6)  # a normal free: head, unreported
    assert _list(area, O9) == [6, 0, 4, 2]
    assert area.reported == {4}


def test_putback_to_the_tail_of_the_order_10_list() -> None:
    area = FreeArea.boot(8, range(0))
    assert _list(area, O10) == [6, 4, 2, 0]
    assert area.isolate(6) == O10
    assert area.state[6:8] == [BlockState.HELD, BlockState.HELD]
    assert area.putback(6, O10, reported=True) == FreeBlock(6, O10)
    assert _list(area, O10) == [4, 2, 0, 6]
    assert area.reported == {6}
    assert area.reported_pageblocks() == 2


def test_putback_lands_on_the_pageblocks_current_migratetype() -> None:
    area = FreeArea(4)
    area.free(0)
    assert _list(area, O9, MOVABLE) == [0]
    area.isolate(0)
    area.migratetype[0] = UNMOVABLE  # changed while the report held it
    area.putback(0, O9, reported=True)
    assert _list(area, O9, MOVABLE) == []
    assert _list(area, O9, UNMOVABLE) == [0]
    assert area.reported == {0}
    # and it is taken off that list again without trouble
    assert area.allocate(O9, UNMOVABLE) == 0
    assert area.reported == set()


def test_putback_of_a_block_that_is_not_held_is_refused() -> None:
    area = FreeArea.boot(4, range(0))
    with pytest.raises(FreeListError):
        area.putback(0, O10, reported=True)  # free, not held
    with pytest.raises(FreeListError):
        area.isolate(1)  # inside a free block, not its start


def test_allocate_takes_the_head_of_the_wanted_list() -> None:
    area = FreeArea(8)
    for index in (0, 2, 4):
        area.free(index)
    assert area.allocate(O9) == 4
    assert area.state[4] is BlockState.USED
    assert area.allocate(O9) == 2
    assert _list(area, O9) == [0]
    assert area.free_pageblocks() == 1


def test_allocate_splits_an_order_10_block_leaving_the_upper_half_unreported() -> None:
    area = FreeArea.boot(4, range(0))
    assert _list(area, O10) == [2, 0]
    _report(area, 2)  # [0, 2]
    _report(area, 0)  # [2, 0], both Reported
    assert area.reported == {0, 2}

    assert area.allocate(O9) == 2
    assert area.state[2:4] == [BlockState.USED, BlockState.FREE]
    assert _list(area, O9) == [3]
    assert area.reported == {0}  # the half is a new block: unreported
    assert _list(area, O10) == [0]
    assert area.free_pageblocks() == 3


def test_the_split_half_goes_to_the_head_of_its_list() -> None:
    # The half (pageblock 1) is of another migratetype than the block it was
    # split from, so its order-9 list can already hold a block.
    area = FreeArea(6)
    area.migratetype[1] = UNMOVABLE
    area.migratetype[4] = UNMOVABLE
    area.free(4)  # order 9 (buddy 5 reserved), UNMOVABLE list
    area.free(0)
    area.free(1)  # merges: order 10 at 0, on pageblock 0's (MOVABLE) list
    assert _list(area, O10) == [0]
    assert _list(area, O9, UNMOVABLE) == [4]
    assert area.allocate(O9) == 0
    assert _list(area, O9, UNMOVABLE) == [1, 4]


def test_allocate_order_10_takes_a_whole_block() -> None:
    area = FreeArea.boot(4, range(0))
    assert area.allocate(O10) == 2
    assert area.state == [BlockState.FREE, BlockState.FREE, BlockState.USED, BlockState.USED]
    assert area.allocate(O10) == 0
    assert area.allocate(O10) is None
    assert area.allocate(O9) is None


def test_allocate_prefers_a_larger_block_of_its_type_then_falls_back_to_other_types() -> None:
    area = FreeArea(4)
    area.migratetype[2] = area.migratetype[3] = UNMOVABLE
    area.free(2)
    area.free(3)  # order 10 at 2, UNMOVABLE
    area.free(0)  # order 9 at 0, MOVABLE (buddy 1 reserved)
    assert area.allocate(O9, MOVABLE) == 0
    assert area.allocate(O10, MOVABLE) == 2  # fallback to UNMOVABLE
    assert area.allocate(O9, MOVABLE) is None

    area = FreeArea(4)
    area.migratetype[2] = area.migratetype[3] = UNMOVABLE
    area.free(0)
    area.free(1)  # order 10 at 0, MOVABLE
    area.free(2)  # order 9 at 2, UNMOVABLE: buddy 3 reserved
    assert area.allocate(O9, MOVABLE) == 0  # splits its own type first
    assert _list(area, O9, MOVABLE) == [1]
    assert area.allocate(O9, UNMOVABLE) == 2
    assert area.allocate(O9, UNMOVABLE) == 1  # fallback to MOVABLE
    assert area.allocate(O9) is None


def test_fallback_splits_a_block_of_another_type() -> None:
    area = FreeArea(4)
    area.migratetype[2] = area.migratetype[3] = UNMOVABLE
    area.free(2)
    area.free(3)
    assert area.allocate(O9, MOVABLE) == 2
    assert _list(area, O9, UNMOVABLE) == [3]


def test_double_free_raises() -> None:
    area = FreeArea.boot(4, range(0))
    with pytest.raises(FreeListError, match="freed twice"):
        area.free(0)
    with pytest.raises(FreeListError, match="freed twice"):
        area.free(2, O10)
    start = area.allocate(O9)
    assert start == 2
    area.release(start)
    with pytest.raises(FreeListError):
        area.release(start)  # free now, not allocated
    with pytest.raises(FreeListError):
        area.free(3)  # merged with 2 above, so free


def test_free_rejects_unaligned_or_outside_blocks_and_bad_orders() -> None:
    area = FreeArea(4)
    with pytest.raises(FreeListError):
        area.free(1, O10)  # not aligned to 2 pageblocks
    with pytest.raises(FreeListError):
        area.free(4)
    with pytest.raises(FreeListError):
        area.free(0, 11)
    with pytest.raises(FreeListError):
        area.free(0, 8)
    assert area.count_state(BlockState.RESERVED) == 4  # nothing changed


def test_release_and_reserve_check_the_state() -> None:
    area = FreeArea.boot(4, range(0))
    with pytest.raises(FreeListError):
        area.release(0)  # free
    with pytest.raises(FreeListError):
        area.reserve(0)  # free
    start = area.allocate(O9)
    assert start is not None
    area.reserve(start)
    with pytest.raises(FreeListError):
        area.release(start)  # reserved


def test_take_range_splits_blocks_straddling_either_edge() -> None:
    area = FreeArea.boot(8, range(0))
    assert _list(area, O10) == [6, 4, 2, 0]
    _report(area, 0)
    _report(area, 4)
    assert area.reported == {0, 4}

    area.take_range(1, 4, BlockState.CONTIG)  # pageblocks 1..4
    assert area.state == [
        BlockState.FREE,
        BlockState.CONTIG,
        BlockState.CONTIG,
        BlockState.CONTIG,
        BlockState.CONTIG,
        BlockState.FREE,
        BlockState.FREE,
        BlockState.FREE,
    ]
    # The outer halves of 0+1 and 4+5 are freed again, to the head, unreported.
    assert _list(area, O9) == [5, 0]
    assert _list(area, O10) == [6]
    assert area.reported == set()
    assert area.free_pageblocks() == 4
    assert list(area.blocks()) == [FreeBlock(0, O9), FreeBlock(5, O9), FreeBlock(6, O10)]


def test_take_range_leaves_allocated_pageblocks_alone() -> None:
    area = FreeArea.boot(4, range(0))
    assert area.allocate(O9) == 2  # 3 is left free at order 9
    area.take_range(2, 2, BlockState.CONTIG)
    assert area.state == [BlockState.FREE, BlockState.FREE, BlockState.USED, BlockState.CONTIG]
    assert _list(area, O9) == []
    assert _list(area, O10) == [0]


def test_freeing_a_held_pageblock_is_a_double_free() -> None:
    # A held block is free memory lent to a report; only its putback may
    # free it. Freeing it again would link it while the report still has it.
    area = FreeArea.boot(4, range(0))
    assert area.isolate(2) == O10
    with pytest.raises(FreeListError):
        area.free(2)
    assert area.state[2:4] == [BlockState.HELD, BlockState.HELD]
    assert area.putback(2, O10, reported=True) == FreeBlock(2, O10)
