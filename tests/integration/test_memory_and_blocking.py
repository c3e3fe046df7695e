"""Memory table variants, region removal, and a slow discard that must not
stall anyone else."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.conftest import StartBackend, open_fds
from tests.integration.discard_gate import Gate
from vhost_balloon.guest.runner import MockGuest
from vhost_balloon.protocol.vhost_user import (
    FrontendRequest,
    MemoryTable,
    SingleMemoryRegion,
    VringFile,
)
from vhost_balloon.protocol.virtqueue import Buffer


@pytest.mark.parametrize("mem_slots", [True, False], ids=["add-mem-reg", "set-mem-table"])
@pytest.mark.parametrize("reply_ack", [True, False], ids=["reply-ack", "no-reply-ack"])
@pytest.mark.parametrize("regions", [1, 3])
async def test_memory_table_variants(
    start_backend: StartBackend, mem_slots: bool, reply_ack: bool, regions: int
) -> None:
    backend = await start_backend()
    options = backend.guest_options(
        memory=384 << 20, regions=regions, configure_mem_slots=mem_slots, reply_ack=reply_ack
    )
    async with MockGuest(options) as guest:
        sent = guest.frontend.sent_requests
        if mem_slots:
            assert sent.count(FrontendRequest.ADD_MEM_REG) == regions
        else:
            assert FrontendRequest.SET_MEM_TABLE in sent
        summary = guest.summary(await guest.run(6))
    assert summary["freed_bytes"] == summary["reported_bytes"] > 0
    assert summary["integrity_ok"]


async def test_removed_region_is_unmapped_and_no_longer_discarded(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    options = backend.guest_options(memory=384 << 20, regions=2)
    async with MockGuest(options) as guest:
        await guest.run(2)
        (session,) = backend.server.sessions.values()
        fds_before = open_fds()
        second = guest.ram.regions[1]
        mapped_at = next(
            m.address
            for m in session.memory_map.regions
            if m.region.guest_phys_addr == second.guest_phys_addr
        )
        assert _mapped(mapped_at)
        reply = await guest.frontend.request(
            FrontendRequest.REM_MEM_REG,
            SingleMemoryRegion(second.desc()),
            fds=[guest.ram.region_fds()[1]],
            need_reply=True,
            expect_reply=True,
        )
        assert reply == bytes(8)
        assert len(session.memory_map) == 1
        # The region's fd and the mapping's own dup are closed, the mapping is gone.
        assert len(open_fds()) == len(fds_before) - 2
        assert not _mapped(mapped_at)
        # A report into the removed region is acknowledged but skipped.
        driver = guest.driver
        index = driver.reporting_queue
        size = driver.layout.block_size
        vq = driver.queue(index)
        vq.add([Buffer(second.guest_phys_addr, size, True)])
        if vq.kick_needed():
            guest.frontend.kick(index)
        await guest.frontend.wait_call(index, 5.0)
        assert len(vq.get_used()) == 1
        assert backend.trace()[-1]["skipped_outside"] == 1
        # Removing it again is refused, and the session goes on.
        reply = await guest.frontend.request(
            FrontendRequest.REM_MEM_REG,
            SingleMemoryRegion(second.desc()),
            fds=[guest.ram.region_fds()[1]],
            need_reply=True,
            expect_reply=True,
        )
        assert reply is not None and reply != bytes(8)


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        return any(int(line.split("-", 1)[0], 16) == address for line in maps)


async def _post_report(guest: MockGuest, entries: int = 4) -> int:
    driver = guest.driver
    index = driver.reporting_queue
    size = driver.layout.block_size
    vq = driver.queue(index)
    head = vq.add([Buffer(b.gpa, size, True) for b in driver.layout.blocks[:entries]])
    if vq.kick_needed():
        guest.frontend.kick(index)
    return head


async def test_a_slow_discard_does_not_stall_other_sessions(
    start_backend: StartBackend, gate: Gate
) -> None:
    backend = await start_backend()
    async with (
        MockGuest(backend.guest_options()) as slow,
        MockGuest(backend.guest_options()) as fast,
    ):
        await _post_report(slow)
        assert await asyncio.to_thread(gate.entered.wait, 5.0)
        # While slow's discard is stuck in its syscall, fast is served in full.
        summary = fast.summary(await fast.run(3))
        assert summary["reports"] == 3
        assert await slow.frontend.get_config(0, 16)  # slow's messages too
        assert slow.driver.queue(slow.driver.reporting_queue).get_used() == []
        gate.opened.set()
        await slow.frontend.wait_call(slow.driver.reporting_queue, 5.0)
        assert len(slow.driver.queue(slow.driver.reporting_queue).get_used()) == 1


async def test_hanging_up_while_a_discard_runs_loses_nothing(
    start_backend: StartBackend, gate: Gate
) -> None:
    backend = await start_backend()
    baseline = open_fds()
    guest = MockGuest(backend.guest_options())
    await guest.start()
    await _post_report(guest)
    assert await asyncio.to_thread(gate.entered.wait, 5.0)
    await guest.close()  # the front-end is gone while the syscall is in flight
    await asyncio.sleep(0.1)
    assert len(backend.server.sessions) == 1  # still waiting for its discard
    gate.opened.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while backend.server.sessions and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert not backend.server.sessions
    assert open_fds() == baseline
    (record,) = backend.trace()
    assert record["discarded_entries"] == 4  # the report was finished, not dropped
    async with MockGuest(backend.guest_options()) as next_guest:
        assert (await next_guest.run(1)).reports


async def test_memory_table_replaced_while_running_keeps_the_queue_position(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    options = backend.guest_options(memory=384 << 20, regions=2)
    async with MockGuest(options) as guest:
        await guest.run(3)
        (session,) = backend.server.sessions.values()
        old_addresses = {m.address for m in session.memory_map.regions}
        table = MemoryTable(tuple(r.desc() for r in guest.ram.regions))
        reply = await guest.frontend.request(
            FrontendRequest.SET_MEM_TABLE,
            table,
            fds=guest.ram.region_fds(),
            need_reply=True,
            expect_reply=True,
        )
        assert reply == bytes(8)
        assert not any(_mapped(address) for address in old_addresses)
        summary = guest.summary(await guest.run(3))
    assert summary["reports"] == 3 and summary["integrity_ok"]
    assert len(backend.trace()) == 6  # nothing processed twice


async def test_a_new_kick_fd_during_a_discard_never_discards_a_report_twice(
    start_backend: StartBackend, gate: Gate
) -> None:
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        driver = guest.driver
        index = driver.reporting_queue
        size = driver.layout.block_size
        vq = driver.queue(index)
        blocks = driver.layout.blocks
        vq.add([Buffer(blocks[0].gpa, size, True)])
        vq.add([Buffer(blocks[1].gpa, size, True)])
        guest.frontend.kick(index)
        assert await asyncio.to_thread(gate.entered.wait, 5.0)
        new_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            request = guest.frontend.request(
                FrontendRequest.SET_VRING_KICK,
                VringFile(index, False),
                fds=[new_kick],
                need_reply=True,
                expect_reply=True,
            )
            reply_task = asyncio.ensure_future(request)
            await asyncio.sleep(0.1)
            assert not reply_task.done()  # it waits for the discard in flight
            gate.opened.set()
            assert await reply_task == bytes(8)
            os.eventfd_write(new_kick, 1)
            await guest.frontend.wait_call(index, 5.0)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            used: list[tuple[int, int]] = []
            while len(used) < 2 and loop.time() < deadline:
                used += vq.get_used()
                await asyncio.sleep(0.01)
        finally:
            os.close(new_kick)
        assert sorted(head for head, _ in used) == [0, 1]
        records = backend.trace()
        assert sorted(r["head"] for r in records) == [0, 1]  # each discarded once
