"""The balloon device's queue processing, over rings in plain memory."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.vhost.device import QueueHandle
from vhost_balloon.backend.vhost.mapping import MemoryMap
from vhost_balloon.backend.vhost.session import SessionLogger
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable
from vhost_balloon.protocol.virtio import BALLOON_F_REPORTING, F_INDIRECT_DESC, feature_mask
from vhost_balloon.protocol.virtqueue import Buffer, DeviceQueue, DriverQueue, RingLayout


async def test_a_ring_full_of_skipped_entries_lets_other_work_run() -> None:
    """A guest that keeps the ring full of useless chains must not keep the loop."""
    size = 64
    memory = GuestMemory(RegionTable([Region(0, 1 << 20, 0, 0)]), [bytearray(1 << 20)])
    layout = RingLayout.packed_at(0, size)
    driver = DriverQueue(memory, layout)
    for chain in range(size):  # a full ring of chains whose entries are all unaligned
        driver.add(
            [Buffer(0x10001 + i, 4096, True) for i in range(size)],
            indirect_table=0x4000 + chain * 16 * size,
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        device = BalloonDevice(
            BalloonSettings(),
            executor,
            "t",
            SessionLogger(logging.getLogger("t"), {"session": "t"}),
        )
        device.set_features(feature_mask(BALLOON_F_REPORTING, F_INDIRECT_DESC))
        queue = DeviceQueue(memory, layout, indirect=True)
        context = QueueHandle.fixed(2, queue, MemoryMap())
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.ensure_future(ticker())
        await device.process_queue(context, 0)
        ticking.cancel()
    assert device.stats.reports == size
    assert device.stats.skipped_outside == size * size
    assert ticks >= size // 2  # the other task ran between chains
    assert [head for head, _ in driver.get_used()] == list(range(size))
