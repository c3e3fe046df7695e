"""Contiguous allocations against the free-list model: the guest-side cost.

An attempt is `alloc_contig_pages()` reduced to what decides its outcome
when reporting runs (mm/page_alloc.c, mm/page_isolation.c, for semantics):

- candidate ranges are the `align`-aligned ranges of `size` inside the
  zone, lowest first; one holding unmovable or already-allocated-contiguous
  pageblocks is not valid and is not tried (`pfn_range_valid_contig`);
- a valid range whose pageblocks are free or movable would be isolated and
  its movable pageblocks migrated out (this needs as many free pageblocks
  outside the range); then `test_pages_isolated` finds every pageblock free
  unless a report holds one: that attempt fails with -EBUSY and the first
  held pageblock is the first busy pfn;
- the first range that succeeds is taken (`CONTIG`) and freed again after
  `hold_s`, one pageblock at a time, so it merges, goes back on the lists
  unreported and is reported again, as in a real guest.

The attempt is instantaneous: the model does not stretch the isolation
itself, only asks whether a report holds part of the range at that moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from vhost_balloon.guest.freelists import (
    PAGEBLOCK_BYTES,
    PAGEBLOCK_ORDER,
    BlockState,
    FreeArea,
    FreeListError,
)

MAX_RETRIES = 10_000_000  # beyond this a failed attempt never ends


class Outcome(Enum):
    OK = "ok"
    HELD = "held"  # -EBUSY: a report held part of every tried range
    NO_MEMORY = "no-memory"  # no room to migrate the range's movable blocks
    NO_RANGE = "no-range"  # no valid candidate range at all


@dataclass(frozen=True, slots=True)
class ContigConfig:
    size: int = 1 << 30
    align: int = 1 << 30
    rate: float = 2.0  # attempts per second (Poisson arrivals)
    retries: int = 0  # after a failure, like callers that retry
    backoff_s: float = 0.01  # first retry delay, doubled per retry
    hold_s: float = 0.05  # how long a successful allocation is kept
    touch: bool = False  # write the range when allocated (init_on_alloc=1)
    cost_s: float = 0.0  # a failed attempt's own time (isolate, test, undo) before the next

    def validate(self) -> None:
        for name, value in (("size", self.size), ("align", self.align)):
            if value < PAGEBLOCK_BYTES or value % PAGEBLOCK_BYTES:
                raise ValueError(f"contiguous {name} must be a multiple of 2 MiB, got {value}")
        if self.align & (self.align - 1):
            raise ValueError(f"contiguous alignment {self.align} is not a power of two")
        if not self.rate > 0:
            raise ValueError("the attempt rate must be positive")
        if min(self.retries, self.backoff_s, self.hold_s, self.cost_s) < 0:
            raise ValueError("retries, backoff, hold and attempt cost cannot be negative")
        if self.retries > MAX_RETRIES:
            raise ValueError(f"retries {self.retries} is above {MAX_RETRIES}")

    @property
    def size_pageblocks(self) -> int:
        return self.size // PAGEBLOCK_BYTES

    @property
    def align_pageblocks(self) -> int:
        return self.align // PAGEBLOCK_BYTES


@dataclass(frozen=True, slots=True)
class AttemptResult:
    outcome: Outcome
    start: int | None = None  # pageblock of the range taken, or of the range that failed
    first_busy: int | None = None  # first held pageblock (HELD only)
    moved: tuple[tuple[int, int], ...] = ()  # (old, new) pageblocks migrated out

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


def candidate_ranges(area: FreeArea, config: ContigConfig) -> list[range]:
    """Every aligned range of the configured size inside the zone, lowest first."""
    size, align = config.size_pageblocks, config.align_pageblocks
    return [range(start, start + size) for start in range(0, area.count - size + 1, align)]


def attempt(area: FreeArea, config: ContigConfig) -> AttemptResult:
    """One `alloc_contig_pages()`: take the first range that works, or say why none did."""
    result = AttemptResult(Outcome.NO_RANGE)
    for candidate in candidate_ranges(area, config):
        states = [area.state[index] for index in candidate]
        if BlockState.RESERVED in states or BlockState.CONTIG in states:
            continue  # not a valid range: never isolated, never traced
        if BlockState.HELD in states:
            first = candidate.start + states.index(BlockState.HELD)
            result = AttemptResult(Outcome.HELD, candidate.start, first)
            continue
        movable = [
            index
            for index, state in zip(candidate, states, strict=True)
            if state is BlockState.USED
        ]
        free_inside = states.count(BlockState.FREE)
        if len(movable) > area.free_pageblocks() - free_inside:
            if result.outcome is not Outcome.HELD:
                result = AttemptResult(Outcome.NO_MEMORY, candidate.start)
            continue
        moved = _take(area, candidate, movable)
        return AttemptResult(Outcome.OK, candidate.start, moved=moved)
    return result


def blocked_by_reports(area: FreeArea, config: ContigConfig) -> bool:
    """Would an attempt now fail because reports hold part of every valid range?"""
    valid = False
    for candidate in candidate_ranges(area, config):
        states = {area.state[index] for index in candidate}
        if BlockState.RESERVED in states or BlockState.CONTIG in states:
            continue
        if BlockState.HELD not in states:
            return False
        valid = True
    return valid


def _take(area: FreeArea, candidate: range, movable: list[int]) -> tuple[tuple[int, int], ...]:
    """Isolate the range, migrate its movable blocks out, mark it CONTIG."""
    area.take_range(candidate.start, len(candidate), BlockState.CONTIG)
    moved = []
    for index in movable:
        target = area.allocate(PAGEBLOCK_ORDER)
        if target is None:  # attempt() counted the room first
            raise FreeListError("no free pageblock to migrate into")
        area.state[index] = BlockState.CONTIG
        moved.append((index, target))
    return tuple(moved)


def free_range(area: FreeArea, start: int, count: int) -> list[int]:
    """Free a contiguous allocation pageblock by pageblock; returns the orders freed."""
    return [area.release(index).order for index in range(start, start + count)]
