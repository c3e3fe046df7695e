"""Guest memory: a region table and address translation.

Two address spaces point into the same regions: guest-physical addresses
(what descriptors carry) and the front-end's virtual addresses (what
SET_VRING_ADDR carries). A range is accepted only if it lies entirely inside
one region; crossing a region end is refused, never split.
"""

from __future__ import annotations

import abc
import bisect
import enum
import itertools
import mmap
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from vhost_balloon.protocol.errors import AddressError

U64_LIMIT = 1 << 64


class Space(enum.Enum):
    GPA = "guest-physical"
    UVA = "front-end virtual"


@dataclass(frozen=True, slots=True)
class Region:
    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int

    def start(self, space: Space) -> int:
        return self.guest_phys_addr if space is Space.GPA else self.userspace_addr

    def file_offset(self, offset_in_region: int) -> int:
        """Offset in the backing fd of a byte at `offset_in_region`."""
        return self.mmap_offset + offset_in_region

    def validate(self) -> None:
        if self.size <= 0:
            raise AddressError(f"region at gpa {self.guest_phys_addr:#x} has size {self.size}")
        for name, base in (
            ("gpa", self.guest_phys_addr),
            ("uva", self.userspace_addr),
            ("mmap_offset", self.mmap_offset),
        ):
            if base < 0 or base + self.size > U64_LIMIT:
                raise AddressError(f"region {name} {base:#x} + size {self.size:#x} wraps 64 bits")


def _check_disjoint(regions: Sequence[Region], space: Space) -> None:
    ordered = sorted(regions, key=lambda r: r.start(space))
    for left, right in itertools.pairwise(ordered):
        if left.start(space) + left.size > right.start(space):
            raise AddressError(f"regions overlap in {space.value} space at {right.start(space):#x}")


class RegionTable:
    """An immutable, validated set of regions with fast lookup in both spaces."""

    def __init__(self, regions: Sequence[Region]) -> None:
        for region in regions:
            region.validate()
        _check_disjoint(regions, Space.GPA)
        _check_disjoint(regions, Space.UVA)
        self.regions: tuple[Region, ...] = tuple(regions)
        self._sorted: dict[Space, tuple[list[int], list[int]]] = {}
        for space in Space:
            order = sorted(range(len(regions)), key=lambda i: regions[i].start(space))
            self._sorted[space] = ([regions[i].start(space) for i in order], order)

    def __len__(self) -> int:
        return len(self.regions)

    def find(self, addr: int, length: int, space: Space = Space.GPA) -> tuple[int, int]:
        """(region index, offset in region) of [addr, addr+length), inside one region."""
        if addr < 0 or length < 0 or addr + length > U64_LIMIT:
            raise AddressError(f"{space.value} range {addr:#x}+{length:#x} wraps 64 bits")
        starts, order = self._sorted[space]
        pos = bisect.bisect_right(starts, addr) - 1
        if pos >= 0:
            index = order[pos]
            region = self.regions[index]
            offset = addr - starts[pos]
            if offset < region.size and offset + length <= region.size:
                return index, offset
        raise AddressError(
            f"{space.value} range {addr:#x}+{length:#x} is not inside one memory region"
        )

    def gpa_to_uva(self, gpa: int) -> int:
        index, offset = self.find(gpa, 1)
        return self.regions[index].userspace_addr + offset


# What rings are read from and written to: the backend's and the mocked
# guest's MAP_SHARED mappings, or plain bytearrays in unit tests.
WritableBuffer: TypeAlias = mmap.mmap | bytearray | memoryview


class GuardedBuffer(abc.ABC):
    """Bytes that are read and written by copies that can fail.

    A region whose file the front-end can shrink (hugetlbfs, tmpfs, an
    unsealed memfd) would SIGBUS the whole process on a plain load; the
    backend wraps such a region in one of these, whose copies raise
    `MemoryFault` instead (the syscalls live in the back-end, not here).
    """

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`; MemoryFault if they are gone."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Store `data` at `offset`; MemoryFault if the bytes are gone."""


RegionBuffer: TypeAlias = WritableBuffer | GuardedBuffer
# What ring fields are loaded from: a region, or a copy taken out of one.
LoadableBuffer: TypeAlias = RegionBuffer | bytes


def load(layout: struct.Struct, buffer: LoadableBuffer, offset: int) -> tuple[int, ...]:
    """`layout.unpack_from`, through a copy when the buffer is guarded."""
    if isinstance(buffer, GuardedBuffer):
        return layout.unpack(buffer.read(offset, layout.size))
    return layout.unpack_from(buffer, offset)


def store(layout: struct.Struct, buffer: RegionBuffer, offset: int, *values: int) -> None:
    """`layout.pack` stored at `offset` (through a copy when the buffer is guarded).

    Never `pack_into` on shared memory: it zeroes the destination before
    packing, so a peer reading at that moment sees zeros.
    """
    data = layout.pack(*values)
    if isinstance(buffer, GuardedBuffer):
        buffer.write(offset, data)
        return
    if not 0 <= offset <= len(buffer) - len(data):
        raise IndexError(f"store of {len(data)} bytes at {offset} past a {len(buffer)}-byte buffer")
    buffer[offset : offset + len(data)] = data


# The 16-bit ring fields both sides change while the other reads them
# (avail.idx and flags, used.idx and flags, used_event, avail_event) are
# loaded and stored in one 16-bit access, as a C driver does. struct reads
# and writes them a byte at a time (pack_into zeroes them first), and
# bytes slices copy them with memcpy, which may load the second byte twice:
# a guest could then see used.idx torn, or 0, for an instant.
_SWAP = sys.byteorder != "little"  # virtio rings are little-endian


def load_index(buffer: LoadableBuffer, offset: int) -> int:
    """A 16-bit little-endian ring field, read in one access (never torn)."""
    if isinstance(buffer, GuardedBuffer):
        return int.from_bytes(buffer.read(offset, 2), "little")
    if isinstance(buffer, bytes):  # a copy: nobody writes it
        return int.from_bytes(buffer[offset : offset + 2], "little")
    with memoryview(buffer) as view, view[offset : offset + 2] as field, field.cast("H") as word:
        value = int(word[0])
    return ((value & 0xFF) << 8 | value >> 8) if _SWAP else value


def store_index(buffer: RegionBuffer, offset: int, value: int) -> None:
    """Store a 16-bit little-endian ring field in one access (never torn)."""
    if isinstance(buffer, GuardedBuffer):
        buffer.write(offset, (value & 0xFFFF).to_bytes(2, "little"))
        return
    if _SWAP:
        value = (value & 0xFF) << 8 | (value & 0xFFFF) >> 8
    with memoryview(buffer) as view, view[offset : offset + 2] as field, field.cast("H") as word:
        word[0] = value & 0xFFFF


def snapshot(buffer: RegionBuffer, offset: int, length: int) -> tuple[LoadableBuffer, int]:
    """A guarded buffer's bytes copied out in one call (one syscall rather
    than one per field); any other buffer as it is."""
    if isinstance(buffer, GuardedBuffer):
        return buffer.read(offset, length), 0
    return buffer, offset


class GuestMemory:
    """A region table plus one byte buffer per region (no syscalls here).

    The backend passes its MAP_SHARED mappings, the mocked guest its own,
    unit tests plain bytearrays: the same ring code runs over all of them.
    """

    def __init__(self, table: RegionTable, buffers: Sequence[RegionBuffer]) -> None:
        if len(buffers) != len(table):
            raise ValueError("one buffer per region is required")
        for region, buffer in zip(table.regions, buffers, strict=True):
            if len(buffer) < region.size:
                raise ValueError("buffer smaller than its region")
        self.table = table
        self.buffers: tuple[RegionBuffer, ...] = tuple(buffers)

    def locate(self, addr: int, length: int, space: Space = Space.GPA) -> tuple[RegionBuffer, int]:
        index, offset = self.table.find(addr, length, space)
        return self.buffers[index], offset

    def read(self, addr: int, length: int, space: Space = Space.GPA) -> bytes:
        buffer, offset = self.locate(addr, length, space)
        if isinstance(buffer, GuardedBuffer):
            return buffer.read(offset, length)
        return bytes(buffer[offset : offset + length])

    def write(self, addr: int, data: bytes, space: Space = Space.GPA) -> None:
        buffer, offset = self.locate(addr, len(data), space)
        if isinstance(buffer, GuardedBuffer):
            buffer.write(offset, data)
        else:
            buffer[offset : offset + len(data)] = data
