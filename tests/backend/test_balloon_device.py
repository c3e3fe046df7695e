"""The balloon device's queue processing, over rings in plain memory."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from unittest import mock

import pytest

from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.vhost import log_limit, worker
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


def test_a_flooded_ring_says_so_in_a_few_lines_and_is_made_to_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each useless chain is counted, but a full ring of them logs at most
    a burst of warnings, and the thread draining it sleeps once it has used
    its share of CPU (the other sessions get the GIL meanwhile)."""
    size = 64
    memory = GuestMemory(RegionTable([Region(0, 1 << 20, 0, 0)]), [bytearray(1 << 20)])
    layout = RingLayout.packed_at(0, size)
    driver = DriverQueue(memory, layout)
    for chain in range(size):
        driver.add(
            [Buffer(0x10001 + i, 4096, True) for i in range(size)],
            indirect_table=0x4000 + chain * 16 * size,
        )
    device = BalloonDevice(
        BalloonSettings(), "t", SessionLogger(logging.getLogger("t"), {"session": "t"})
    )
    device.set_features(feature_mask(BALLOON_F_REPORTING, F_INDIRECT_DESC))
    queue = DeviceQueue(memory, layout, indirect=True)
    slept: list[float] = []
    real_sleep = time.sleep

    def counting_sleep(seconds: float) -> None:
        slept.append(seconds)
        real_sleep(seconds)

    with (
        caplog.at_level(logging.WARNING, logger="t"),
        mock.patch("time.sleep", counting_sleep),
    ):
        device.process_queue(QueueHandle.fixed(2, queue, MemoryMap()), 0)
    assert device.stats.reports == size and device.stats.skipped_outside == size * size
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == log_limit.BURST
    assert device.guest_log.suppressed_total == size - log_limit.BURST
    # 64 chains of 64 entries take well over BUSY_NS of CPU here.
    assert slept and all(s == worker.FLOOD_SLEEP_S for s in slept)


def test_the_limited_log_says_how_many_lines_it_left_out() -> None:
    now = [0.0]
    lines: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("limited-log-test")
    logger.propagate = False
    logger.addHandler(Sink())
    limited = log_limit.LimitedLog(logger, burst=2, interval_s=5.0, clock=lambda: now[0])
    for i in range(5):
        limited.warning("bad chain %d", i)
    assert lines == ["bad chain 0", "bad chain 1"] and limited.suppressed == 3
    now[0] = 5.0  # a new window
    limited.error("bad chain %d", 5)
    assert lines[-1] == "bad chain 5 (3 similar lines left out since the last one)"
    assert limited.suppressed == 0 and limited.suppressed_total == 3


def test_only_a_ring_with_chains_waiting_is_throttled() -> None:
    """A driver that waits for each chain (Linux) is never made to sleep,
    however long its chains take; a flooding one is, once it has used its share."""
    slept: list[float] = []

    def burn() -> None:
        start = time.thread_time_ns()
        while time.thread_time_ns() - start < 2 * worker.BUSY_NS:
            pass

    with mock.patch("time.sleep", slept.append):
        turns = worker.GilTurns()
        for _ in range(3):
            burn()
            turns.between_chains(False)
        assert slept == [] and turns.throttled == 0
        burn()
        turns.between_chains(True)
        assert slept == [worker.FLOOD_SLEEP_S] and turns.throttled == 1
