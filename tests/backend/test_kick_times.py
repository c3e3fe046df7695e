"""A report's window opens at its own kick, never at one that belonged to an
earlier report (kicks fold while the queue's thread is busy)."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.vhost.device import QueueHandle
from vhost_balloon.backend.vhost.mapping import MemoryMap
from vhost_balloon.backend.vhost.session import SessionLogger
from vhost_balloon.backend.vhost.worker import QueueThread
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable
from vhost_balloon.protocol.virtio import BALLOON_F_REPORTING, feature_mask
from vhost_balloon.protocol.virtqueue import Buffer, DeviceQueue, DriverQueue, RingLayout

REPORTING = 2


async def test_a_folded_kick_does_not_open_a_later_reports_window() -> None:
    """The driver posts B while the device re-enables notifications (B is
    drained in the same batch, and B's kick stays pending), then posts C
    once B is used: C's window must not open before B was published."""
    memory = GuestMemory(RegionTable([Region(0, 1 << 20, 0, 0)]), [bytearray(1 << 20)])
    layout = RingLayout.packed_at(0, 8)
    driver = DriverQueue(memory, layout)
    queue = DeviceQueue(memory, layout)
    records: list[ReportRecord] = []
    enables = 0
    real_enable = queue.enable_notifications
    kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def racy_enable() -> bool:
        nonlocal enables
        enables += 1
        result = real_enable()
        if enables == 1:  # B arrives in the window, with a kick that folds
            driver.add([Buffer(0x10000, 4096, False)])
            os.eventfd_write(kick_fd, 1)
            return queue.has_available()
        if enables == 2:  # B was used; the driver posts C, its kick folds too
            time.sleep(0.01)
            driver.add([Buffer(0x20000, 4096, False)])
            os.eventfd_write(kick_fd, 1)
        return result

    queue.enable_notifications = racy_enable  # type: ignore[method-assign]
    logger = SessionLogger(logging.getLogger("test"), {"session": "t"})
    device = BalloonDevice(BalloonSettings(), "t", logger)
    device.set_features(feature_mask(BALLOON_F_REPORTING))
    context = QueueHandle.fixed(REPORTING, queue, MemoryMap())
    device.record_hooks.append(records.append)
    thread_failures: list[str] = []
    thread = QueueThread(
        "q2",
        kick_fd,
        lambda kick_ns: device.process_queue(context, kick_ns),
        lambda: True,
        thread_failures.append,
    )
    thread.start()
    try:
        driver.add([Buffer(0x0, 4096, False)])  # A
        os.eventfd_write(kick_fd, 1)
        for _ in range(400):
            await asyncio.sleep(0.005)
            if len(records) >= 3:
                break
    finally:
        thread.stop()
        await thread.wait_stopped()
        os.close(kick_fd)
    assert thread_failures == []
    assert len(records) == 3
    a, b, c = records
    assert b.t_kick_ns >= a.t_published_ns
    assert c.t_kick_ns >= b.t_published_ns
    for record in records:
        assert record.t_kick_ns <= record.t_popped_ns <= record.t_published_ns
