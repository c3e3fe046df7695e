"""Where the driver puts things in guest RAM (pure arithmetic, no I/O).

Region 0 starts with the rings of every queue, each followed by one
indirect table, then one scratch page (the balloon's PFN array and stats
buffer: memory the device reads that is neither a ring nor a block), then a
gap of at least one page, then the integrity region (written once, never
reported). Every other buddy-aligned block of
`4096 << order` bytes, in every region, may be reported. Blocks are handed
out even-numbered first, then odd-numbered, so the entries of one report
are usually not adjacent and each has its own guard pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vhost_balloon.guest.errors import ConfigError
from vhost_balloon.protocol.memory import Region
from vhost_balloon.protocol.virtqueue import DESC_SIZE, MAX_QUEUE_SIZE, RingLayout

PAGE_SIZE = 4096
SCRATCH_SIZE = PAGE_SIZE


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _size(value: int) -> str:
    return f"{value >> 20} MiB" if value >= 1 << 20 else f"{value >> 10} KiB"


@dataclass(frozen=True, slots=True)
class Block:
    """A reportable buddy block and the region it lies in."""

    gpa: int
    region: int


@dataclass(frozen=True, slots=True)
class GuestLayout:
    rings: tuple[RingLayout, ...]
    indirect_tables: tuple[int, ...]
    reserved_end: int  # end of the ring area (block-aligned)
    integrity_gpa: int
    integrity_size: int
    block_size: int
    blocks: tuple[Block, ...]  # in rotation order
    # One page after the indirect tables, before reserved_end: never a
    # block, a ring or integrity page, so the balloon may write it any time.
    scratch_gpa: int
    scratch_size: int = SCRATCH_SIZE

    @property
    def integrity_end(self) -> int:
        return self.integrity_gpa + self.integrity_size

    @property
    def scratch_end(self) -> int:
        return self.scratch_gpa + self.scratch_size

    def in_integrity(self, gpa: int) -> bool:
        return self.integrity_gpa <= gpa < self.integrity_end

    @property
    def reportable_bytes(self) -> int:
        return self.block_size * len(self.blocks)


def plan_layout(
    regions: Sequence[Region],
    *,
    queues: int,
    queue_size: int,
    capacity: int,
    order: int,
    integrity_bytes: int,
    min_blocks: int,
) -> GuestLayout:
    """Place rings, indirect tables, the scratch page, the integrity region and the blocks."""
    if not 1 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
        raise ConfigError(f"queue size {queue_size} is not a power of two up to {MAX_QUEUE_SIZE}")
    if not 0 <= order <= 20:
        raise ConfigError(f"order {order} is outside 0..20")
    if integrity_bytes < 0:
        raise ConfigError("the integrity region size cannot be negative")
    block_size = PAGE_SIZE << order
    first = regions[0]
    cursor = first.guest_phys_addr
    rings: list[RingLayout] = []
    tables: list[int] = []
    for _ in range(queues):
        ring = RingLayout.packed_at(cursor, queue_size)
        table = _align_up(ring.end, DESC_SIZE)
        rings.append(ring)
        tables.append(table)
        cursor = table + DESC_SIZE * capacity
    scratch_gpa = _align_up(cursor, PAGE_SIZE)
    cursor = scratch_gpa + SCRATCH_SIZE
    # A page of slack after the rings: the page before the first block that
    # may carry a guard stamp is never a ring page.
    reserved_end = _align_up(cursor + PAGE_SIZE, block_size)
    integrity_size = _align_up(integrity_bytes, PAGE_SIZE)
    unreportable_end = _align_up(reserved_end + integrity_size, block_size)
    if unreportable_end > first.guest_phys_addr + first.size:
        raise ConfigError(
            f"region 0 ({first.size >> 20} MiB) cannot hold the rings and a "
            f"{integrity_size >> 20} MiB integrity region"
        )
    ordered: list[Block] = []
    for index, region in enumerate(regions):
        gpa = _align_up(region.guest_phys_addr, block_size)
        while gpa + block_size <= region.guest_phys_addr + region.size:
            if not first.guest_phys_addr <= gpa < unreportable_end:
                ordered.append(Block(gpa, index))
            gpa += block_size
    ordered.sort(key=lambda block: block.gpa)
    if len(ordered) < min_blocks:
        raise ConfigError(
            f"guest RAM holds {len(ordered)} reportable {_size(block_size)} blocks, "
            f"a report of {min_blocks} entries needs at least {min_blocks}: give it more memory"
        )
    rotation = tuple(ordered[0::2] + ordered[1::2])
    return GuestLayout(
        tuple(rings),
        tuple(tables),
        reserved_end,
        reserved_end,
        integrity_size,
        block_size,
        rotation,
        scratch_gpa,
    )
