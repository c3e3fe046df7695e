"""Helpers for the unit tests: fake guest memory and raw ring bytes.

`RawRing` writes descriptor tables and avail rings byte by byte, the way a
buggy or hostile guest could, so that malformed-ring tests go through the
same parser production uses. Legal rings are better built with
`protocol.virtqueue.DriverQueue`.
"""

from __future__ import annotations

import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable, store
from vhost_balloon.protocol.virtqueue import (
    DESC,
    DESC_F_NEXT,
    DESC_SIZE,
    U16,
    USED_ELEM,
    DeviceQueue,
    DriverQueue,
    RingLayout,
)

U16_MASK = 0xFFFF
GUEST_SIZE = 0x10000  # 64 KiB of fake guest RAM at guest-physical 0
UVA_BASE = 0x7F00_0000_0000  # where the "front-end" mapped it
INDIRECT_AREA = 0x8000  # indirect tables live from here on


def make_memory(
    size: int = GUEST_SIZE, gpa: int = 0, uva: int = UVA_BASE
) -> tuple[GuestMemory, bytearray]:
    """One region of `size` bytes at `gpa` (front-end address `uva`)."""
    buf = bytearray(size)
    table = RegionTable([Region(gpa, size, uva, 0)])
    return GuestMemory(table, [buf]), buf


class RawRing:
    """Writes ring structures directly into guest memory (GPA 0 based)."""

    def __init__(self, memory: GuestMemory, buf: bytearray, layout: RingLayout) -> None:
        self.memory = memory
        self.buf = buf
        self.layout = layout
        self.size = layout.size

    def set_desc(
        self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0, *, table: int = -1
    ) -> None:
        base = self.layout.desc if table < 0 else table
        DESC.pack_into(self.buf, base + DESC_SIZE * index, addr, length, flags, nxt)

    def set_chain(self, head: int, parts: list[tuple[int, int, int]], *, table: int = -1) -> None:
        """Consecutive descriptors head, head+1, ... linked with NEXT."""
        for pos, (addr, length, flags) in enumerate(parts):
            last = pos == len(parts) - 1
            self.set_desc(
                head + pos,
                addr,
                length,
                flags | (0 if last else DESC_F_NEXT),
                0 if last else head + pos + 1,
                table=table,
            )

    def set_avail_entry(self, slot: int, head: int) -> None:
        U16.pack_into(self.buf, self.layout.avail + 4 + 2 * (slot % self.size), head)

    def set_avail_idx(self, idx: int) -> None:
        U16.pack_into(self.buf, self.layout.avail + 2, idx & U16_MASK)

    def set_avail_flags(self, flags: int) -> None:
        U16.pack_into(self.buf, self.layout.avail, flags)

    def set_used_event(self, value: int) -> None:
        U16.pack_into(self.buf, self.layout.avail + 4 + 2 * self.size, value & U16_MASK)

    def set_used_idx(self, idx: int) -> None:
        U16.pack_into(self.buf, self.layout.used + 2, idx & U16_MASK)

    def make_available(self, *heads: int, start: int = 0) -> None:
        """Put `heads` in the avail ring from index `start` and publish them."""
        for k, head in enumerate(heads):
            self.set_avail_entry(start + k, head)
        self.set_avail_idx(start + len(heads))

    def used_flags(self) -> int:
        return int(U16.unpack_from(self.buf, self.layout.used)[0])

    def used_idx(self) -> int:
        return int(U16.unpack_from(self.buf, self.layout.used + 2)[0])

    def used_elem(self, slot: int) -> tuple[int, int]:
        head, length = USED_ELEM.unpack_from(
            self.buf, self.layout.used + 4 + USED_ELEM.size * (slot % self.size)
        )
        return int(head), int(length)

    def avail_event(self) -> int:
        return int(U16.unpack_from(self.buf, self.layout.used + 4 + USED_ELEM.size * self.size)[0])

    def used_event(self) -> int:
        return int(U16.unpack_from(self.buf, self.layout.avail + 4 + 2 * self.size)[0])

    def device(
        self, *, indirect: bool = False, event_idx: bool = False, next_avail: int = 0
    ) -> DeviceQueue:
        return DeviceQueue(
            self.memory,
            self.layout,
            indirect=indirect,
            event_idx=event_idx,
            next_avail=next_avail,
        )


def raw_ring(size: int = 8) -> RawRing:
    memory, buf = make_memory()
    return RawRing(memory, buf, RingLayout.packed_at(0, size))


def start_driver_at(driver: DriverQueue, index: int) -> None:
    """Pretend `driver` has already added and collected `index` chains.

    DriverQueue always starts at 0; walking 65536 chains to reach the 16-bit
    wrap would make tests slow, so the indices are set the way a long-running
    driver would have left them: avail.idx == used.idx == index, nothing in
    flight. A DeviceQueue created afterwards with next_avail=index continues
    from there (as after SET_VRING_BASE).
    """
    index &= U16_MASK
    driver.avail_idx = index
    driver.last_used = index
    driver._kicked_idx = index
    layout = driver.layout
    avail_buf, avail_offset = driver.memory.locate(layout.avail, layout.avail_bytes)
    store(U16, avail_buf, avail_offset + 2, index)
    used_buf, used_offset = driver.memory.locate(layout.used, layout.used_bytes)
    store(U16, used_buf, used_offset + 2, index)


class Hang(AssertionError):
    """Raised when code under test runs far longer than it possibly should."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body loops for `seconds`."""

    def expired(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s: probably an endless loop")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def u16_at(buf: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from("<H", buf, offset)[0])
