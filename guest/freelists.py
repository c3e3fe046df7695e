"""The guest's buddy free lists, by order and migratetype, with the state
free page reporting keeps (pure bookkeeping, no I/O, no clock).

The unit is a pageblock (order 9, 2 MiB), the smallest thing free page
reporting hands to the device: orders below page_reporting_order are never
reported, so they are not modelled, and a pageblock is either wholly free
or wholly taken. Free blocks have order 9 or 10 (MAX_PAGE_ORDER, 4 MiB).

What mirrors mm/page_alloc.c and mm/page_reporting.c (read for semantics):
- a freed block merges with its free buddy; a merged block is new, so it
  loses the Reported flag of either half;
- a normal free puts the block at the head of its list; the reporting
  putback (`__putback_isolated_page`) puts it at the tail, onto the list of
  the pageblock's *current* migratetype, and only then may it be flagged
  Reported (if it did not merge);
- allocation takes the head of the wanted list, falls back to larger
  orders (splitting; the halves go back unreported) and then to other
  migratetypes;
- a block pulled for a report is in neither the free lists nor in use:
  `HELD`, which is what makes `alloc_contig_range()` fail with -EBUSY.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum, IntEnum

PAGEBLOCK_ORDER = 9
MAX_ORDER = 10  # MAX_PAGE_ORDER on x86-64
PAGE_SIZE = 4096
PAGEBLOCK_BYTES = PAGE_SIZE << PAGEBLOCK_ORDER


class MigrateType(IntEnum):
    """The migratetypes reporting walks, in Linux's order (ISOLATE is skipped)."""

    UNMOVABLE = 0
    MOVABLE = 1
    RECLAIMABLE = 2


class BlockState(Enum):
    FREE = "free"  # part of a free buddy block
    HELD = "held"  # pulled off the free lists for a report in flight
    USED = "used"  # allocated (movable: a contiguous allocation may migrate it)
    CONTIG = "contig"  # part of a successful contiguous allocation
    RESERVED = "reserved"  # unmovable: firmware, kernel, the virtqueues


class FreeListError(Exception):
    """An operation that the buddy allocator would never perform."""


def pageblocks(order: int) -> int:
    """Pageblocks in a block of `order`."""
    return 1 << (order - PAGEBLOCK_ORDER)


@dataclass(frozen=True, slots=True)
class FreeBlock:
    start: int  # first pageblock
    order: int


class FreeArea:
    """One zone's free lists over `count` pageblocks, all initially `RESERVED`."""

    @classmethod
    def boot(cls, count: int, reserved: range) -> FreeArea:
        """A zone whose pageblocks are all free except `reserved` (the
        kernel, firmware, the virtqueues): memblock handing memory over."""
        area = cls(count)
        for index in range(count):
            if index not in reserved:
                area.free(index)
        return area

    def __init__(self, count: int, *, default_type: MigrateType = MigrateType.MOVABLE) -> None:
        if count < 1:
            raise FreeListError("a zone needs at least one pageblock")
        self.count = count
        self.state: list[BlockState] = [BlockState.RESERVED] * count
        self.migratetype: list[MigrateType] = [default_type] * count
        self.lists: dict[tuple[int, MigrateType], OrderedDict[int, None]] = {
            (order, mt): OrderedDict()
            for order in range(PAGEBLOCK_ORDER, MAX_ORDER + 1)
            for mt in MigrateType
        }
        self.order_of: dict[int, int] = {}  # start of every free block -> its order
        self.reported: set[int] = set()  # starts of free blocks flagged Reported

    # ---------------------------------------------------------------- queries
    def free_list(self, order: int, mt: MigrateType) -> OrderedDict[int, None]:
        return self.lists[(order, mt)]

    def nr_free(self, order: int) -> int:
        """`free_area[order].nr_free`: free blocks of that order, every migratetype."""
        return sum(len(self.lists[(order, mt)]) for mt in MigrateType)

    def free_pageblocks(self) -> int:
        return sum(pageblocks(order) for order in self.order_of.values())

    def count_state(self, state: BlockState) -> int:
        return self.state.count(state)

    def reported_pageblocks(self) -> int:
        return sum(pageblocks(self.order_of[start]) for start in self.reported)

    def blocks(self) -> Iterator[FreeBlock]:
        for start, order in sorted(self.order_of.items()):
            yield FreeBlock(start, order)

    def _set_state(self, start: int, order: int, state: BlockState) -> None:
        for index in range(start, start + pageblocks(order)):
            self.state[index] = state

    # ------------------------------------------------------------- free lists
    def _unlink(self, start: int) -> int:
        """Take a free block off its list (clearing Reported); returns its order."""
        order = self.order_of.pop(start)
        del self.lists[(order, self.migratetype[start])][start]
        self.reported.discard(start)
        return order

    def _link(self, start: int, order: int, *, tail: bool) -> None:
        free_list = self.lists[(order, self.migratetype[start])]
        free_list[start] = None
        if not tail:
            free_list.move_to_end(start, last=False)
        self.order_of[start] = order

    def free(self, start: int, order: int = PAGEBLOCK_ORDER, *, tail: bool = False) -> FreeBlock:
        """`__free_one_page`: merge with free buddies, then link; returns the result."""
        self._check_block(start, order)
        for index in range(start, start + pageblocks(order)):
            if self.state[index] in (BlockState.FREE, BlockState.HELD):
                # A HELD block is still the report's: only putback frees it.
                raise FreeListError(f"pageblock {index} is freed twice")
        return self._merge_and_link(start, order, tail=tail)

    def _merge_and_link(self, start: int, order: int, *, tail: bool) -> FreeBlock:
        self._set_state(start, order, BlockState.FREE)
        while order < MAX_ORDER:
            buddy = start ^ pageblocks(order)
            if buddy + pageblocks(order) > self.count or self.order_of.get(buddy) != order:
                break
            self._unlink(buddy)
            start = min(start, buddy)
            order += 1
        self._link(start, order, tail=tail)
        return FreeBlock(start, order)

    def isolate(self, start: int) -> int:
        """`__isolate_free_page` for a report: off the lists, `HELD`; returns its order."""
        if start not in self.order_of:
            raise FreeListError(f"pageblock {start} is not the start of a free block")
        order = self._unlink(start)
        self._set_state(start, order, BlockState.HELD)
        return order

    def putback(self, start: int, order: int, *, reported: bool) -> FreeBlock:
        """`page_reporting_drain`: back at the tail of the block's current
        migratetype; flagged Reported only when it did not merge."""
        for index in range(start, start + pageblocks(order)):
            if self.state[index] is not BlockState.HELD:
                raise FreeListError(f"pageblock {index} was not held by a report")
        result = self._merge_and_link(start, order, tail=True)
        if reported and result == FreeBlock(start, order):
            self.reported.add(start)
        return result

    def allocate(self, order: int, mt: MigrateType = MigrateType.MOVABLE) -> int | None:
        """A block of `order` from the head of the lists (`USED`), or None."""
        fallbacks = [mt, *(other for other in MigrateType if other is not mt)]
        for wanted in fallbacks:
            for current in range(order, MAX_ORDER + 1):
                free_list = self.lists[(current, wanted)]
                if not free_list:
                    continue
                start = next(iter(free_list))
                self._unlink(start)
                # expand(): the upper halves go back, unreported.
                for half in range(current - 1, order - 1, -1):
                    self._link(start + pageblocks(half), half, tail=False)
                self._set_state(start, order, BlockState.USED)
                return start
        return None

    def take_range(self, start: int, count: int, state: BlockState) -> None:
        """Remove the free pageblocks [start, start+count) from the lists and
        mark them `state`; free blocks straddling an edge are split."""
        end = start + count
        overlapping = [
            b for b in self.blocks() if b.start < end and b.start + pageblocks(b.order) > start
        ]
        for block in overlapping:
            self._unlink(block.start)
            for index in range(block.start, block.start + pageblocks(block.order)):
                if start <= index < end:
                    self.state[index] = state
                else:
                    self.state[index] = BlockState.USED  # freed again just below
                    self.free(index)

    def release(self, index: int) -> FreeBlock:
        """Free one taken pageblock (USED or CONTIG) at the list head."""
        if self.state[index] not in (BlockState.USED, BlockState.CONTIG):
            raise FreeListError(f"pageblock {index} is {self.state[index].value}, not allocated")
        return self.free(index)

    def reserve(self, index: int) -> None:
        """Mark a pageblock unmovable and in use (never freed, never migrated)."""
        if self.state[index] is BlockState.FREE:
            raise FreeListError(f"pageblock {index} is free")
        self.state[index] = BlockState.RESERVED

    def _check_block(self, start: int, order: int) -> None:
        if not PAGEBLOCK_ORDER <= order <= MAX_ORDER:
            raise FreeListError(f"order {order} is outside {PAGEBLOCK_ORDER}..{MAX_ORDER}")
        if start % pageblocks(order) or not 0 <= start < start + pageblocks(order) <= self.count:
            raise FreeListError(f"block {start} of order {order} is unaligned or outside the zone")
