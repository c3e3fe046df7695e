"""The balloon device's queue processing, over rings in plain memory."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator

import pytest

from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.vhost.device import QueueHandle
from vhost_balloon.backend.vhost.mapping import MemoryMap
from vhost_balloon.backend.vhost.session import SessionLogger
from vhost_balloon.backend.vhost.worker import share_the_gil_fairly
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable
from vhost_balloon.protocol.virtio import BALLOON_F_REPORTING, F_INDIRECT_DESC, feature_mask
from vhost_balloon.protocol.virtqueue import Buffer, DeviceQueue, DriverQueue, RingLayout


@pytest.fixture
def fair_gil() -> Iterator[None]:
    """The GIL switch interval the server sets (the interpreter's default is 5 ms)."""
    default = sys.getswitchinterval()
    share_the_gil_fairly()
    yield
    sys.setswitchinterval(default)


@pytest.mark.usefixtures("fair_gil")
async def test_a_ring_full_of_skipped_entries_lets_other_work_run() -> None:
    """A guest that keeps the ring full of useless chains must not keep the
    event loop: while the queue's thread drains it, the loop keeps running."""
    size = 64
    memory = GuestMemory(RegionTable([Region(0, 1 << 20, 0, 0)]), [bytearray(1 << 20)])
    layout = RingLayout.packed_at(0, size)
    driver = DriverQueue(memory, layout)
    for chain in range(size):  # a full ring of chains whose entries are all unaligned
        driver.add(
            [Buffer(0x10001 + i, 4096, True) for i in range(size)],
            indirect_table=0x4000 + chain * 16 * size,
        )
    device = BalloonDevice(
        BalloonSettings(),
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

    ticks_at_record: list[int] = []
    device.record_hooks.append(lambda record: ticks_at_record.append(ticks))
    ticking = asyncio.ensure_future(ticker())
    await asyncio.to_thread(device.process_queue, context, 0)
    ticking.cancel()
    assert device.stats.reports == size
    assert device.stats.skipped_outside == size * size
    # The loop ran while the chains were drained, not only before or after.
    assert ticks_at_record[-1] > ticks_at_record[0]
    assert [head for head, _ in driver.get_used()] == list(range(size))
