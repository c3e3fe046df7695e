"""What a guest with a malformed ring or bad report entries can and cannot do."""

from __future__ import annotations

import asyncio
import struct

import pytest

from tests.conftest import StartBackend
from vhost_balloon.backend.vhost.session import SessionState
from vhost_balloon.guest.runner import MockGuest
from vhost_balloon.protocol.virtqueue import DESC, Buffer

U16 = struct.Struct("<H")


async def _wait_err(guest: MockGuest, index: int, timeout: float = 5.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (count := guest.frontend.err_count(index)) == 0:
        if loop.time() > deadline:
            return 0
        await asyncio.sleep(0.01)
    return count


def _corrupt(guest: MockGuest, how: str) -> None:
    """Make the reporting ring malformed the way a buggy or hostile guest could."""
    index = guest.driver.reporting_queue
    ring = guest.driver.layout.rings[index]
    memory = guest.ram.memory
    (avail_idx,) = U16.unpack(memory.read(ring.avail + 2, 2))
    slot = ring.avail + 4 + 2 * (avail_idx % ring.size)
    if how == "head out of range":
        memory.write(slot, U16.pack(ring.size + 3))
        memory.write(ring.avail + 2, U16.pack(avail_idx + 1))
    elif how == "descriptor loop":
        memory.write(ring.desc, DESC.pack(0x1000000, 4096, 1 | 2, 1))  # 0 -> 1
        memory.write(ring.desc + 16, DESC.pack(0x1200000, 4096, 1 | 2, 0))  # 1 -> 0
        memory.write(slot, U16.pack(0))
        memory.write(ring.avail + 2, U16.pack(avail_idx + 1))
    elif how == "avail index far ahead":
        memory.write(ring.avail + 2, U16.pack(avail_idx + ring.size + 1))
    elif how == "indirect table outside memory":
        memory.write(ring.desc, DESC.pack(1 << 50, 16 * 4, 4, 0))
        memory.write(slot, U16.pack(0))
        memory.write(ring.avail + 2, U16.pack(avail_idx + 1))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "head out of range",
        "descriptor loop",
        "avail index far ahead",
        "indirect table outside memory",
    ],
)
async def test_malformed_ring_breaks_only_that_device(
    start_backend: StartBackend, how: str
) -> None:
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as healthy:
        guest = MockGuest(backend.guest_options())
        await guest.start()
        try:
            await guest.run(1)
            _corrupt(guest, how)
            guest.frontend.kick(guest.driver.reporting_queue)
            assert await _wait_err(guest, guest.driver.reporting_queue) >= 1
            broken = [s for s in backend.server.sessions.values() if s.state is SessionState.BROKEN]
            assert len(broken) == 1
            assert broken[0].device.stats.queue_errors == 1  # type: ignore[attr-defined]
            # The broken session still answers messages; the other one still reports.
            assert await guest.frontend.get_config(0, 16)
            summary = healthy.summary(await healthy.run(3))
            assert summary["reports"] == 3 and summary["integrity_ok"]
        finally:
            await guest.close()


async def test_entries_outside_ram_or_unaligned_are_skipped_not_discarded(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        driver = guest.driver
        index = driver.reporting_queue
        block = driver.layout.blocks[0]
        size = driver.layout.block_size
        mapping, offset = guest.ram.locate(block.gpa, size)
        mapping[offset : offset + size] = b"\x77" * size
        ram_end = max(r.guest_phys_addr + r.size for r in guest.ram.regions)
        vq = driver.queue(index)
        head = vq.add(
            [
                Buffer(block.gpa + 512, 4096, True),  # not page-aligned
                Buffer(block.gpa, 4096 + 100, True),  # length not a page multiple
                Buffer(ram_end - 4096, 8192, True),  # crosses the end of RAM
                Buffer(1 << 62, 4096, True),  # nowhere near RAM
            ]
        )
        if vq.kick_needed():
            guest.frontend.kick(index)
        await guest.frontend.wait_call(index, 5.0)
        assert [h for h, _ in vq.get_used()] == [head]
        # Nothing was discarded: the guest's data is intact.
        assert bytes(mapping[offset : offset + size]) == b"\x77" * size
        (record,) = backend.trace()
        assert record["skipped_unaligned"] == 2
        assert record["skipped_outside"] == 2
        assert record["discarded_entries"] == 0
        # The device keeps working for well-formed reports.
        summary = guest.summary(await guest.run(2))
        assert summary["freed_bytes"] == summary["reported_bytes"]


async def test_readable_descriptors_are_ignored(start_backend: StartBackend) -> None:
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        driver = guest.driver
        index = driver.reporting_queue
        block = driver.layout.blocks[0]
        size = driver.layout.block_size
        mapping, offset = guest.ram.locate(block.gpa, size)
        mapping[offset : offset + size] = b"\x33" * size
        vq = driver.queue(index)
        vq.add([Buffer(block.gpa, size, False)])  # device-readable: not a report entry
        if vq.kick_needed():
            guest.frontend.kick(index)
        await guest.frontend.wait_call(index, 5.0)
        assert len(vq.get_used()) == 1
        assert bytes(mapping[offset : offset + 16]) == b"\x33" * 16
        (record,) = backend.trace()
        assert record["entries"] == 0 and record["discarded_entries"] == 0
