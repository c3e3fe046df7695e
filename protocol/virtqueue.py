"""Split virtqueue, both sides, over any `GuestMemory` (virtio 1.x, 2.7).

`DeviceQueue` is what a device does: pop available chains (direct NEXT
chains or one indirect table), publish used entries, decide whether to
notify. `DriverQueue` is what a driver does: add a chain, decide whether to
kick, collect used entries; the mocked guest and unit tests use it to build
real ring bytes that the device side then parses.

Every malformed ring state raises `QueueError` with a `QueueErrorKind`; no
other exception escapes the device side for bad guest data, except
`MemoryFault` from a `GuardedBuffer` whose pages the front-end took away.

Memory ordering: used entries are written before used.idx and avail.idx is
read before the ring entries; on x86 (TSO) program order gives that. The two
places that need a full fence (publish used.idx then read used_event; write
avail_event then re-read avail.idx) call `fence`, which the caller supplies.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from vhost_balloon.protocol.errors import AddressError, QueueError, QueueErrorKind
from vhost_balloon.protocol.memory import (
    GuardedBuffer,
    GuestMemory,
    LoadableBuffer,
    RegionBuffer,
    Space,
    WritableBuffer,
    load,
    load_index,
    snapshot,
    store,
    store_index,
)

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
DESC_SIZE = DESC.size

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
USED_F_NO_NOTIFY = 1
AVAIL_F_NO_INTERRUPT = 1

MAX_QUEUE_SIZE = 32768
# The largest indirect table any queue accepts; a queue accepts at most its
# own size (QEMU's VIRTQUEUE_MAX_SIZE is 1024).
MAX_INDIRECT_ENTRIES = MAX_QUEUE_SIZE


def _no_fence() -> None:
    return None


def vring_need_event(event_idx: int, new: int, old: int) -> bool:
    """EVENT_IDX rule: notify iff event_idx lies in [old, new) modulo 2^16."""
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Queue size and the addresses of its three parts (in some space)."""

    size: int
    desc: int
    avail: int
    used: int

    @property
    def desc_bytes(self) -> int:
        return DESC_SIZE * self.size

    @property
    def avail_bytes(self) -> int:
        return 6 + 2 * self.size  # flags, idx, ring[size], used_event

    @property
    def used_bytes(self) -> int:
        return 6 + USED_ELEM.size * self.size  # flags, idx, ring[size], avail_event

    def validate(self) -> None:
        if not 1 <= self.size <= MAX_QUEUE_SIZE or self.size & (self.size - 1):
            raise QueueError(QueueErrorKind.BAD_LAYOUT, f"queue size {self.size}")
        if self.desc % 16 or self.avail % 2 or self.used % 4:
            raise QueueError(
                QueueErrorKind.BAD_LAYOUT,
                f"misaligned ring desc={self.desc:#x} avail={self.avail:#x} used={self.used:#x}",
            )

    @classmethod
    def packed_at(cls, base: int, size: int) -> RingLayout:
        """Desc table, avail ring and used ring laid out back to back from `base`."""
        desc = (base + 15) & ~15
        avail = desc + DESC_SIZE * size
        used = (avail + 6 + 2 * size + 3) & ~3
        return cls(size, desc, avail, used)

    @property
    def end(self) -> int:
        return self.used + self.used_bytes


class Descriptor(NamedTuple):
    """One buffer of a chain (a NamedTuple: 32 are built per report)."""

    addr: int
    length: int
    flags: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & DESC_F_WRITE)


@dataclass(frozen=True, slots=True)
class Chain:
    head: int
    descriptors: tuple[Descriptor, ...]
    indirect: bool

    @property
    def writable(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.descriptors if d.writable)

    @property
    def readable(self) -> tuple[Descriptor, ...]:
        return tuple(d for d in self.descriptors if not d.writable)


def _locate(
    memory: GuestMemory, addr: int, length: int, space: Space, what: str
) -> tuple[RegionBuffer, int]:
    try:
        return memory.locate(addr, length, space)
    except AddressError as error:
        raise QueueError(QueueErrorKind.ADDRESS, f"{what}: {error}") from None


def _locate_own(
    memory: GuestMemory, addr: int, length: int, space: Space, what: str
) -> tuple[WritableBuffer, int]:
    """The driver's rings: always in its own plain mappings."""
    buffer, offset = _locate(memory, addr, length, space, what)
    if isinstance(buffer, GuardedBuffer):
        raise TypeError("a driver's rings must be plain buffers")
    return buffer, offset


class DeviceQueue:
    """Device side of one split virtqueue."""

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        ring_space: Space = Space.GPA,
        indirect: bool = False,
        event_idx: bool = False,
        next_avail: int = 0,
        fence: Callable[[], None] = _no_fence,
    ) -> None:
        layout.validate()
        self.memory = memory
        self.size = layout.size
        self.indirect = indirect
        self.event_idx = event_idx
        self.fence = fence
        self._desc_buf, self._desc = _locate(
            memory, layout.desc, layout.desc_bytes, ring_space, "descriptor table"
        )
        self._avail_buf, self._avail = _locate(
            memory, layout.avail, layout.avail_bytes, ring_space, "avail ring"
        )
        self._used_buf, self._used = _locate(
            memory, layout.used, layout.used_bytes, ring_space, "used ring"
        )
        self.next_avail = next_avail & 0xFFFF
        # Continue from what the used ring says (a ring may be restarted with
        # SET_VRING_BASE after GET_VRING_BASE).
        self.next_used = load_index(self._used_buf, self._used + 2)
        self._signalled_used: int | None = None
        self._seen_pending = 0  # available chains at the last avail.idx read

    # -- avail side -------------------------------------------------------

    def avail_idx(self) -> int:
        return load_index(self._avail_buf, self._avail + 2)

    def has_available(self) -> bool:
        pending = (self.avail_idx() - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise QueueError(
                QueueErrorKind.AVAIL_AHEAD, f"avail.idx is {pending} ahead, queue size {self.size}"
            )
        self._seen_pending = pending
        return pending > 0

    @property
    def others_waiting(self) -> bool:
        """Whether more chains than the one last popped were available when it
        was popped (from the index read the pop made: no extra load). A
        driver that waits for each chain, as Linux does, never has any."""
        return self._seen_pending > 1

    def pop(self) -> Chain | None:
        """The next available chain, or None; raises QueueError if malformed."""
        if not self.has_available():
            return None
        slot = self._avail + 4 + 2 * (self.next_avail % self.size)
        (head,) = load(U16, self._avail_buf, slot)
        if head >= self.size:
            raise QueueError(QueueErrorKind.HEAD_OUT_OF_RANGE, f"head {head} >= {self.size}")
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> Chain:
        # A guarded table is copied out whole: one syscall, not one per descriptor.
        table_buf, table = snapshot(self._desc_buf, self._desc, self.size * DESC_SIZE)
        table_size = self.size
        descriptors: list[Descriptor] = []
        index, walked, indirect, seen_writable = head, 0, False, False
        while True:
            walked += 1
            if walked > table_size:
                raise QueueError(QueueErrorKind.LOOP, f"chain from head {head}")
            addr, length, flags, nxt = load(DESC, table_buf, table + DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                table_buf, table, table_size = self._enter_indirect(addr, length, flags, indirect)
                indirect, index, walked = True, 0, 0
                continue
            if addr + length > 1 << 64:
                raise QueueError(QueueErrorKind.OVERFLOW, f"addr {addr:#x} len {length:#x}")
            if flags & DESC_F_WRITE:
                seen_writable = True
            elif seen_writable:
                raise QueueError(QueueErrorKind.READ_AFTER_WRITE, f"chain from head {head}")
            descriptors.append(Descriptor(addr, length, flags))
            if not flags & DESC_F_NEXT:
                return Chain(head, tuple(descriptors), indirect)
            if nxt >= table_size:
                raise QueueError(QueueErrorKind.NEXT_OUT_OF_RANGE, f"next {nxt} >= {table_size}")
            index = nxt

    def _enter_indirect(
        self, addr: int, length: int, flags: int, nested: bool
    ) -> tuple[LoadableBuffer, int, int]:
        # Direct descriptors may precede the indirect one (virtio 1.x 2.7.5.3.2:
        # the device MUST handle it); Linux only ever puts it at the head.
        if nested:
            raise QueueError(QueueErrorKind.NESTED_INDIRECT)
        if not self.indirect:
            raise QueueError(QueueErrorKind.INDIRECT_NOT_NEGOTIATED)
        if flags & DESC_F_NEXT:
            raise QueueError(QueueErrorKind.INDIRECT_WITH_NEXT)
        # A chain may not be longer than the queue (virtio 2.7.5.3.1): bounding
        # indirect tables by the queue size bounds what a guest makes us walk.
        if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.size:
            raise QueueError(QueueErrorKind.INDIRECT_BAD_LENGTH, f"length {length}")
        if addr + length > 1 << 64:
            raise QueueError(QueueErrorKind.OVERFLOW, f"indirect table {addr:#x}+{length:#x}")
        buf, offset = _locate(self.memory, addr, length, Space.GPA, "indirect table")
        return (*snapshot(buf, offset, length), length // DESC_SIZE)

    # -- used side --------------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Publish one used entry: the element first, then used.idx."""
        slot = self._used + 4 + USED_ELEM.size * (self.next_used % self.size)
        store(USED_ELEM, self._used_buf, slot, head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF
        store_index(self._used_buf, self._used + 2, self.next_used)

    def needs_notify(self) -> bool:
        """Whether the driver asked to be interrupted for what was published."""
        if not self.event_idx:
            flags = load_index(self._avail_buf, self._avail)
            return not flags & AVAIL_F_NO_INTERRUPT
        self.fence()
        old, new = self._signalled_used, self.next_used
        self._signalled_used = new
        if old is None:
            return True
        used_event = load_index(self._avail_buf, self._avail + 4 + 2 * self.size)
        return vring_need_event(used_event, new, old)

    # -- kick suppression -------------------------------------------------

    def disable_notifications(self) -> None:
        if not self.event_idx:
            flags = load_index(self._used_buf, self._used)
            store_index(self._used_buf, self._used, flags | USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (drain again)."""
        if self.event_idx:
            store_index(
                self._used_buf, self._used + 4 + USED_ELEM.size * self.size, self.next_avail
            )
        else:
            flags = load_index(self._used_buf, self._used)
            store_index(self._used_buf, self._used, flags & ~USED_F_NO_NOTIFY)
        self.fence()
        return self.has_available()


@dataclass(frozen=True, slots=True)
class Buffer:
    """One buffer a driver adds: guest-physical address, length, direction."""

    addr: int
    length: int
    writable: bool


class DriverQueue:
    """Driver side of one split virtqueue, over rings it owns in guest memory."""

    def __init__(
        self,
        memory: GuestMemory,
        layout: RingLayout,
        *,
        event_idx: bool = False,
        fence: Callable[[], None] = _no_fence,
    ) -> None:
        layout.validate()
        self.memory = memory
        self.layout = layout
        self.size = layout.size
        self.event_idx = event_idx
        self.fence = fence
        self._desc_buf, self._desc = _locate_own(
            memory, layout.desc, layout.desc_bytes, Space.GPA, "descriptor table"
        )
        self._avail_buf, self._avail = _locate_own(
            memory, layout.avail, layout.avail_bytes, Space.GPA, "avail ring"
        )
        self._used_buf, self._used = _locate_own(
            memory, layout.used, layout.used_bytes, Space.GPA, "used ring"
        )
        for buf, offset, length in (
            (self._desc_buf, self._desc, layout.desc_bytes),
            (self._avail_buf, self._avail, layout.avail_bytes),
            (self._used_buf, self._used, layout.used_bytes),
        ):
            buf[offset : offset + length] = bytes(length)
        self._free = list(range(self.size))
        self._in_flight: dict[int, list[int]] = {}  # head -> ring descriptors it uses
        self.avail_idx = 0
        self.last_used = 0
        self._kicked_idx = 0

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _write_desc(
        self, buf: WritableBuffer, base: int, index: int, desc: Buffer, next_index: int | None
    ) -> None:
        flags = (DESC_F_WRITE if desc.writable else 0) | (
            DESC_F_NEXT if next_index is not None else 0
        )
        store(DESC, buf, base + DESC_SIZE * index, desc.addr, desc.length, flags, next_index or 0)

    def add(self, buffers: Sequence[Buffer], *, indirect_table: int | None = None) -> int:
        """Add one chain (readable buffers first) and make it available.

        With `indirect_table` (a guest-physical address with room for
        16 * len(buffers) bytes) the chain is one INDIRECT descriptor.
        Returns the head index.
        """
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        if indirect_table is not None:
            table_buf, table = _locate_own(
                self.memory, indirect_table, DESC_SIZE * len(buffers), Space.GPA, "indirect table"
            )
            for i, buffer in enumerate(buffers):
                self._write_desc(
                    table_buf, table, i, buffer, i + 1 if i + 1 < len(buffers) else None
                )
            ring_indices = self._take(1)
            store(
                DESC,
                self._desc_buf,
                self._desc + DESC_SIZE * ring_indices[0],
                indirect_table,
                DESC_SIZE * len(buffers),
                DESC_F_INDIRECT,
                0,
            )
        else:
            ring_indices = self._take(len(buffers))
            for pos, buffer in enumerate(buffers):
                nxt = ring_indices[pos + 1] if pos + 1 < len(ring_indices) else None
                self._write_desc(self._desc_buf, self._desc, ring_indices[pos], buffer, nxt)
        head = ring_indices[0]
        self._in_flight[head] = ring_indices
        store_index(self._avail_buf, self._avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        store_index(self._avail_buf, self._avail + 2, self.avail_idx)  # entry before idx
        return head

    def _take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise ValueError(f"{count} descriptors needed, {len(self._free)} free")
        taken, self._free = self._free[:count], self._free[count:]
        return taken

    def kick_needed(self) -> bool:
        """Whether the device wants a kick for what was added since the last call."""
        self.fence()
        old, new = self._kicked_idx, self.avail_idx
        self._kicked_idx = new
        if self.event_idx:
            avail_event = load_index(self._used_buf, self._used + 4 + USED_ELEM.size * self.size)
            return vring_need_event(avail_event, new, old)
        flags = load_index(self._used_buf, self._used)
        return not flags & USED_F_NO_NOTIFY

    def get_used(self) -> list[tuple[int, int]]:
        """Collect (head, length) of newly used chains and free their descriptors."""
        used_idx = load_index(self._used_buf, self._used + 2)
        done: list[tuple[int, int]] = []
        while self.last_used != used_idx:
            if (used_idx - self.last_used) & 0xFFFF > len(self._in_flight):
                raise QueueError(
                    QueueErrorKind.USED_OVERRUN, f"used.idx {used_idx}, last seen {self.last_used}"
                )
            slot = self._used + 4 + USED_ELEM.size * (self.last_used % self.size)
            head, length = USED_ELEM.unpack_from(self._used_buf, slot)
            indices = self._in_flight.pop(head, None)
            if indices is None:
                raise QueueError(QueueErrorKind.USED_OVERRUN, f"used id {head} not in flight")
            self._free.extend(indices)
            done.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx:
            # Ask for an interrupt on the next used entry.
            store_index(self._avail_buf, self._avail + 4 + 2 * self.size, self.last_used)
        return done
