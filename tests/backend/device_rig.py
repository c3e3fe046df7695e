"""A balloon device over a real, sealed memfd and a ring in it, without a socket.

The invariant tests drive `BalloonDevice.process_queue` directly (on a
thread, as a queue thread does) and watch
what the guest would see: the used ring, the call signals, and which of the
reported pages the host still holds (the memfd's allocated blocks).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.balloon.discard import allocated_bytes
from vhost_balloon.backend.balloon.records import BalloonRecord, ReportRecord
from vhost_balloon.backend.latency.injection import NO_INJECTION, PhaseLatency
from vhost_balloon.backend.vhost.device import QueueHandle
from vhost_balloon.backend.vhost.mapping import MappedRegion, MemoryMap
from vhost_balloon.backend.vhost.session import SessionLogger
from vhost_balloon.protocol.vhost_user import MemoryRegionDesc
from vhost_balloon.protocol.virtio import BALLOON_F_REPORTING, feature_mask
from vhost_balloon.protocol.virtqueue import Buffer, DeviceQueue, DriverQueue, RingLayout

MiB = 1 << 20
RAM = 64 * MiB
# inflate, deflate, reporting (no stats queue offered)
QUEUE_INDEX = {"inflate": 0, "deflate": 1, "reporting": 2}
REPORTING_QUEUE = QUEUE_INDEX["reporting"]
FIRST_PAGE = 8 * MiB  # reported pages start here; the ring lives below
PFN_ARRAY = 1 * MiB  # an inflate chain's PFNs (touched before the rig starts)
PFN_ARRAY_BYTES = 64 * 1024


@dataclass
class Rig:
    """One device, one started reporting queue, and the guest's view of it."""

    device: BalloonDevice
    driver: DriverQueue
    queue: DeviceQueue
    handle: QueueHandle
    memory_map: MemoryMap
    fd: int
    ring_bytes: int = 0  # the ring's pages (and the PFN array), held throughout
    notifications: int = 0
    records: list[ReportRecord | BalloonRecord] = field(default_factory=list)
    # For each used entry pushed: the bytes the host still held at that moment.
    held_at_push: list[int] = field(default_factory=list)
    kind: str = "reporting"  # the queue the rig runs

    def post_report(self, entries: int = 4, length: int = 2 * MiB) -> int:
        """Dirty `entries` pages of `length` bytes and post them as one chain:
        a report, or on the inflate queue their PFNs (with a gap between the
        ranges, so that each is one discard, as each report entry is)."""
        view = self.memory_map.regions[0].view
        stride = length if self.kind == "reporting" else 2 * length
        buffers = []
        pfns: list[int] = []
        for index in range(entries):
            gpa = FIRST_PAGE + index * stride
            view[gpa : gpa + length] = b"\xa5" * length  # the host holds these now
            buffers.append(Buffer(gpa, length, True))
            pfns += range(gpa >> 12, (gpa + length) >> 12)
        if self.kind == "reporting":
            return self.driver.add(buffers)
        array = struct.pack(f"<{len(pfns)}I", *pfns)
        assert len(array) <= PFN_ARRAY_BYTES
        view[PFN_ARRAY : PFN_ARRAY + len(array)] = array
        return self.driver.add([Buffer(PFN_ARRAY, len(array), False)])

    def reported_bytes_held(self) -> int:
        """Bytes of the reported pages the host still holds (ring pages excluded)."""
        return allocated_bytes(self.fd) - self.ring_bytes

    @property
    def used(self) -> int:
        """Entries on the used ring so far (the guest's view, read from its memory)."""
        return int(self.queue.next_used)

    def used_heads(self) -> list[int]:
        return [head for head, _ in self.driver.get_used()]


@contextmanager
def reporting_rig(
    latency: PhaseLatency = NO_INJECTION,
    settings: BalloonSettings | None = None,
    kind: str = "reporting",
) -> Iterator[Rig]:
    """A device with its reporting (or inflate) queue started over 64 MiB of
    sealed memfd."""
    fd = os.memfd_create("rig", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, RAM)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    region = MappedRegion(MemoryRegionDesc(0, RAM, 0x7F0000000000, 0), os.dup(fd))
    memory_map = MemoryMap([region])
    layout = RingLayout.packed_at(0x1000, 8)
    driver = DriverQueue(memory_map.memory, layout)
    queue = DeviceQueue(memory_map.memory, layout)
    device = BalloonDevice(
        settings or BalloonSettings(),
        "rig",
        SessionLogger(logging.getLogger("rig"), {"session": "rig"}),
        latency=latency,
    )
    device.set_features(feature_mask(BALLOON_F_REPORTING))
    rig: Rig

    def notify() -> bool:
        rig.notifications += 1
        return True

    handle = QueueHandle.fixed(QUEUE_INDEX[kind], queue, memory_map, notify=notify)
    rig = Rig(device, driver, queue, handle, memory_map, fd, kind=kind)
    region.view[PFN_ARRAY : PFN_ARRAY + PFN_ARRAY_BYTES] = b"\x01" * PFN_ARRAY_BYTES
    rig.ring_bytes = allocated_bytes(fd)
    assert rig.ring_bytes <= FIRST_PAGE
    push = queue.push

    def watched_push(head: int, length: int) -> None:
        rig.held_at_push.append(rig.reported_bytes_held())
        push(head, length)

    queue.push = watched_push  # type: ignore[method-assign]
    device.record_hooks.append(rig.records.append)
    device.balloon_hooks.append(rig.records.append)
    device.queue_started(handle)
    try:
        yield rig
    finally:
        memory_map.close()
        os.close(fd)
