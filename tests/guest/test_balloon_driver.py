"""The classic balloon driver (guest/balloon.py) against an in-process fake device.

The fake stands in for the front-end and the device behind it at once: it
owns DeviceQueues over the guest's own RAM, answers each kick on the next
loop turn, frees inflated pages with MADV_REMOVE, holds the stats buffer
until told to return it, and keeps the config space. No socket, no
backend: what is checked is the driver's side of the protocol (PFN
arrays, chains of at most 256, `actual` written at offset 4 after every
chain, LIFO deflate, blocks leaving and re-entering the reporting rotation,
the stats buffer's life), plus the pure pieces (layout, feature and queue
arithmetic, encodings).
"""

from __future__ import annotations

import asyncio
import mmap
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import pytest

from vhost_balloon.guest.balloon import (
    ARRAY_PFNS_MAX,
    BALLOON_MAGIC,
    NR_STATS,
    STATS_BYTES,
    BalloonDriver,
    StatTag,
    decode_pfns,
    decode_stats,
    encode_pfns,
    encode_stats,
)
from vhost_balloon.guest.driver import DriverConfig, ReportingDriver, RunResult
from vhost_balloon.guest.errors import DriverError, ReplyTimeoutError, ReportTimeoutError
from vhost_balloon.guest.frontend import FrontendOptions, VhostUserFrontend
from vhost_balloon.guest.layout import PAGE_SIZE, plan_layout
from vhost_balloon.guest.ram import GuestRam
from vhost_balloon.guest.runner import GuestOptions, MockGuest
from vhost_balloon.guest.summary import RunContext, build_summary, format_table
from vhost_balloon.protocol.memory import Region
from vhost_balloon.protocol.virtio import (
    BALLOON_F_DEFLATE_ON_OOM,
    BALLOON_F_MUST_TELL_HOST,
    BALLOON_F_PAGE_POISON,
    BALLOON_F_REPORTING,
    BALLOON_F_STATS_VQ,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    BalloonConfig,
    balloon_queues,
    feature_mask,
    has_feature,
)
from vhost_balloon.protocol.virtqueue import DeviceQueue, RingLayout

MiB = 1 << 20
TODAY = feature_mask(
    F_VERSION_1, BALLOON_F_REPORTING, BALLOON_F_PAGE_POISON, F_INDIRECT_DESC, F_EVENT_IDX
)
ALL = TODAY | feature_mask(BALLOON_F_MUST_TELL_HOST, BALLOON_F_STATS_VQ, BALLOON_F_DEFLATE_ON_OOM)
PAGES_PER_BLOCK = (2 * MiB) // PAGE_SIZE  # order 9


# -- the fake device ------------------------------------------------------------------


@dataclass
class FakeChain:
    queue: int
    pfns: list[int]
    first_page: bytes  # the first PFN's page as the device found it


@dataclass
class FakeDevice:
    """A front-end and device in one object, driven on the test's event loop."""

    ram: GuestRam
    offered: int
    num_queues: int
    silent: set[int] = field(default_factory=set)  # queues never answered
    free_pages: bool = True  # MADV_REMOVE inflated pages, as a discarding device does

    def __post_init__(self) -> None:
        self.options = FrontendOptions(num_queues=self.num_queues)
        self.device_features = self.offered
        self.config = BalloonConfig()
        self.config_changed = asyncio.Event()
        self.config_writes: list[tuple[int, bytes]] = []
        self.chains: list[FakeChain] = []
        self.reports: list[list[int]] = []
        self.stats: list[dict[int, int]] = []
        self.held_stats: int | None = None
        self.acked = 0
        self.stats_index: int | None = None
        self._pending = [0] * self.num_queues
        self._signalled = [asyncio.Event() for _ in range(self.num_queues)]
        self.kicks = [0] * self.num_queues

    # -- what the driver calls ----------------------------------------------------------

    async def start(self, features: int, ram: GuestRam, rings: list[RingLayout]) -> BalloonConfig:
        self.acked = features
        self.stats_index = balloon_queues(features).stats
        self.queues = [
            DeviceQueue(
                ram.memory,
                ring,
                indirect=has_feature(features, F_INDIRECT_DESC),
                event_idx=has_feature(features, F_EVENT_IDX),
            )
            for ring in rings
        ]
        return self.config

    def kick(self, index: int) -> None:
        self.kicks[index] += 1
        asyncio.get_running_loop().call_soon(self._process, index)

    async def wait_call(self, index: int, timeout: float) -> int:
        if not self._pending[index]:
            try:
                await asyncio.wait_for(self._signalled[index].wait(), timeout)
            except TimeoutError:
                raise ReplyTimeoutError(f"queue {index} not signalled in {timeout:g} s") from None
        count, self._pending[index] = self._pending[index], 0
        self._signalled[index].clear()
        return count

    async def get_config(self, offset: int = 0, size: int = BalloonConfig.SIZE) -> bytes:
        return self.config.read(offset, size)

    async def set_config(self, data: bytes, offset: int = 0) -> None:
        self.config_writes.append((offset, data))
        self.config = self.config.write(offset, data)

    async def stop(self) -> list[int]:
        return [queue.next_avail for queue in self.queues]

    # -- the device ---------------------------------------------------------------------

    def _signal(self, index: int) -> None:
        self._pending[index] += 1
        self._signalled[index].set()

    def _process(self, index: int) -> None:
        if index in self.silent:
            return
        queue = self.queues[index]
        while True:
            queue.disable_notifications()
            self._drain(index, queue)
            if not queue.enable_notifications():  # with EVENT_IDX: writes avail_event
                return

    def _drain(self, index: int, queue: DeviceQueue) -> None:
        memory = queue.memory
        while (chain := queue.pop()) is not None:
            if index == self.stats_index:
                (desc,) = chain.descriptors
                assert not desc.writable
                self.stats.append(decode_stats(memory.read(desc.addr, desc.length)))
                self.held_stats = chain.head  # held until the device wants new numbers
                continue
            if index >= 2:  # reporting: device-writable blocks
                self.reports.append([desc.addr for desc in chain.writable])
                queue.push(chain.head, 0)
                self._signal(index)
                continue
            (desc,) = chain.descriptors  # one driver-readable PFN array per chain
            assert not desc.writable
            pfns = decode_pfns(memory.read(desc.addr, desc.length))
            first = memory.read(pfns[0] << 12, PAGE_SIZE) if pfns else b""
            self.chains.append(FakeChain(index, pfns, first))
            if index == 0 and self.free_pages:
                for pfn in pfns:
                    mapping, offset = self.ram.locate(pfn << 12, PAGE_SIZE)
                    mapping.madvise(mmap.MADV_REMOVE, offset, PAGE_SIZE)
            queue.push(chain.head, 0)
            self._signal(index)

    def return_stats(self) -> None:
        assert self.stats_index is not None and self.held_stats is not None
        self.queues[self.stats_index].push(self.held_stats, 0)
        self.held_stats = None
        self._signal(self.stats_index)

    def set_target(self, pages: int) -> None:
        """What the host does: a new num_pages, then CONFIG_CHANGE_MSG."""
        self.config = replace(self.config, num_pages=pages)
        self.config_changed.set()

    def pfns(self, queue: int) -> list[int]:
        return [pfn for chain in self.chains if chain.queue == queue for pfn in chain.pfns]


def small_config(**kwargs: object) -> DriverConfig:
    values: dict[str, object] = {
        "capacity": 4,
        "queue_size": 64,
        "integrity_bytes": 1 * MiB,
        "report_timeout": 2.0,
        "balloon": True,
    }
    values.update(kwargs)
    return DriverConfig(**values)  # type: ignore[arg-type]


@dataclass
class Rig:
    ram: GuestRam
    device: FakeDevice
    driver: ReportingDriver
    balloon: BalloonDriver


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    with GuestRam(64 * MiB) as guest_ram:
        yield guest_ram


async def make_rig(
    ram: GuestRam, *, offered: int = ALL, probe: bool = True, **kwargs: object
) -> Rig:
    config = small_config(**kwargs)
    device = FakeDevice(ram, offered, config.queue_count)
    driver = ReportingDriver(cast(VhostUserFrontend, device), ram, config)
    balloon = BalloonDriver(driver)
    if probe:
        await driver.probe()
        await balloon.start()
    return Rig(ram, device, driver, balloon)


@pytest.fixture
async def rig(ram: GuestRam) -> AsyncIterator[Rig]:
    yield await make_rig(ram)


# -- pure pieces ----------------------------------------------------------------------


def test_pfn_arrays_are_little_endian_u32() -> None:
    assert encode_pfns([1, 0x12345678]) == b"\x01\0\0\0\x78\x56\x34\x12"
    pfns = list(range(1000, 1000 + ARRAY_PFNS_MAX))
    assert decode_pfns(encode_pfns(pfns)) == pfns
    assert len(encode_pfns(pfns)) == 4 * ARRAY_PFNS_MAX
    with pytest.raises(ValueError, match="at most 256"):
        encode_pfns(list(range(ARRAY_PFNS_MAX + 1)))
    with pytest.raises(ValueError):
        decode_pfns(b"\0\0\0")


def test_stat_tags_match_linux_and_entries_are_packed() -> None:
    assert [(tag.name, int(tag)) for tag in StatTag] == [
        ("SWAP_IN", 0),
        ("SWAP_OUT", 1),
        ("MAJFLT", 2),
        ("MINFLT", 3),
        ("MEMFREE", 4),
        ("MEMTOT", 5),
        ("AVAIL", 6),
        ("CACHES", 7),
        ("HTLB_PGALLOC", 8),
        ("HTLB_PGFAIL", 9),
        ("OOM_KILL", 10),
        ("ALLOC_STALL", 11),
        ("ASYNC_SCAN", 12),
        ("DIRECT_SCAN", 13),
        ("ASYNC_RECLAIM", 14),
        ("DIRECT_RECLAIM", 15),
    ]
    assert NR_STATS == 16 and STATS_BYTES == 160
    raw = encode_stats([(StatTag.MEMTOT, 1 << 40), (StatTag.SWAP_IN, 7)])
    assert raw == struct.pack("<HQ", 5, 1 << 40) + struct.pack("<HQ", 0, 7)
    assert len(raw) == 20  # packed: 10 bytes an entry, no padding
    assert decode_stats(raw) == {5: 1 << 40, 0: 7}


@pytest.mark.parametrize("queues", [3, 4])
@pytest.mark.parametrize("queue_size", [1, 64, 1024])
@pytest.mark.parametrize("regions", [1, 2])
def test_scratch_page_lies_between_the_indirect_tables_and_the_blocks(
    queues: int, queue_size: int, regions: int
) -> None:
    table = [Region(0, 64 * MiB, 0, 0)]
    if regions == 2:
        table.append(Region(128 * MiB, 32 * MiB, 0, 64 * MiB))
    capacity = min(queue_size, 32)
    layout = plan_layout(
        table,
        queues=queues,
        queue_size=queue_size,
        capacity=capacity,
        order=9,
        integrity_bytes=1 * MiB,
        min_blocks=1,
    )
    last_table_end = layout.indirect_tables[-1] + 16 * capacity
    assert layout.scratch_gpa % PAGE_SIZE == 0
    assert layout.scratch_size == PAGE_SIZE
    assert last_table_end <= layout.scratch_gpa
    assert max(ring.end for ring in layout.rings) <= layout.scratch_gpa
    # At least one page of slack before the first stamped guard page.
    assert layout.scratch_end + PAGE_SIZE <= layout.reserved_end <= layout.integrity_gpa
    for block in layout.blocks:
        assert not block.gpa < layout.scratch_end <= block.gpa + layout.block_size
        assert block.gpa >= layout.integrity_end or block.region > 0


def test_queue_counts_follow_the_wanted_features() -> None:
    assert DriverConfig().queue_count == 3
    assert not DriverConfig().uses_balloon
    assert DriverConfig(must_tell_host=True, deflate_on_oom=True).queue_count == 3
    assert DriverConfig(stats=True).queue_count == 4
    assert DriverConfig(stats=True, must_tell_host=True).uses_balloon
    wanted = DriverConfig(stats=True, must_tell_host=True, deflate_on_oom=True).wanted_features
    for bit in (BALLOON_F_STATS_VQ, BALLOON_F_MUST_TELL_HOST, BALLOON_F_DEFLATE_ON_OOM):
        assert has_feature(wanted, bit)
    assert DriverConfig().wanted_features & ALL == DriverConfig().wanted_features
    assert not DriverConfig().wanted_features & (ALL & ~TODAY)
    assert balloon_queues(DriverConfig(stats=True).wanted_features).reporting == 3


def test_runner_sizes_the_frontend_for_the_stats_queue() -> None:
    assert GuestOptions("x").frontend_options().num_queues == 3
    assert GuestOptions("x", driver=DriverConfig(stats=True)).frontend_options().num_queues == 4


async def test_default_driver_accepts_no_balloon_feature_even_when_offered(ram: GuestRam) -> None:
    config = small_config(balloon=False)
    device = FakeDevice(ram, ALL, config.queue_count)
    driver = ReportingDriver(cast(VhostUserFrontend, device), ram, config)
    accepted = driver.negotiate(ALL)
    assert accepted == config.wanted_features & TODAY
    assert driver.queues is not None and driver.queues.reporting == 2


async def test_stats_wanted_but_not_offered_is_refused(ram: GuestRam) -> None:
    rig = await make_rig(ram, offered=TODAY, probe=False, stats=True)
    with pytest.raises(DriverError, match="STATS_VQ"):
        rig.driver.negotiate(TODAY)


async def test_optional_balloon_features_are_accepted_only_when_offered(ram: GuestRam) -> None:
    rig = await make_rig(ram, offered=TODAY, must_tell_host=True, deflate_on_oom=True)
    assert not rig.balloon.must_tell_host and not rig.balloon.deflate_on_oom
    other = await make_rig(ram, offered=ALL, must_tell_host=True, deflate_on_oom=True)
    assert other.balloon.must_tell_host and other.balloon.deflate_on_oom
    assert not other.balloon.stats_enabled


async def test_stats_queue_moves_reporting_to_index_3(ram: GuestRam) -> None:
    rig = await make_rig(ram, stats=True)
    assert rig.driver.queues is not None
    assert (rig.driver.queues.stats, rig.driver.queues.reporting) == (2, 3)
    await rig.driver.report()
    assert len(rig.device.reports) == 1


# -- block selection ------------------------------------------------------------------


async def test_reports_skip_held_blocks(rig: Rig) -> None:
    driver = rig.driver
    blocks = driver.layout.blocks
    driver.held_blocks.update(block.gpa for block in blocks[1:3])
    chosen = driver._next_blocks()
    assert [block.gpa for block in chosen] == [blocks[0].gpa, *(b.gpa for b in blocks[3:6])]
    # The next report carries on after them, never twice the same block.
    second = driver._next_blocks()
    assert len({block.gpa for block in second}) == 4
    assert not {block.gpa for block in second} & driver.held_blocks


async def test_too_few_reportable_blocks_is_a_clear_error(rig: Rig) -> None:
    driver = rig.driver
    blocks = driver.layout.blocks
    driver.held_blocks.update(block.gpa for block in blocks[3:])
    with pytest.raises(DriverError, match="ballooned"):
        await driver.report()
    driver.held_blocks.discard(blocks[-1].gpa)
    result = await driver.report()
    assert blocks[-1].gpa in result.gpas


async def test_guard_pages_in_held_blocks_are_not_written(rig: Rig) -> None:
    driver = rig.driver
    size = driver.layout.block_size
    block = driver.layout.blocks[3]
    neighbour = block.gpa + size
    driver.held_blocks.add(neighbour)
    guards = driver._guards([block], 0)
    assert block.gpa - PAGE_SIZE in {gpa for gpa, _ in guards}
    assert neighbour not in {gpa for gpa, _ in guards}


async def test_balloon_takes_blocks_from_the_end_and_skips_blocks_being_reported(
    rig: Rig,
) -> None:
    driver, balloon = rig.driver, rig.balloon
    blocks = driver.layout.blocks
    driver.reporting_blocks = {blocks[-1].gpa}
    rig.device.set_target(PAGES_PER_BLOCK + 1)
    result = await balloon.update()
    assert result.reached
    assert [held.gpa for held in balloon.held_blocks] == [blocks[-2].gpa, blocks[-3].gpa]
    assert driver.held_blocks == {blocks[-2].gpa, blocks[-3].gpa}


# -- inflate, deflate, actual ---------------------------------------------------------


async def test_update_inflates_in_chains_of_256_and_writes_actual_each_time(rig: Rig) -> None:
    device, balloon, driver = rig.device, rig.balloon, rig.driver
    target = 3 * ARRAY_PFNS_MAX + 10
    device.set_target(target)
    allocated = rig.ram.allocated_bytes()
    result = await balloon.update()
    assert (result.inflated, result.deflated, result.chains) == (target, 0, 4)
    assert result.actual == target == result.target and result.reached
    assert [len(chain.pfns) for chain in device.chains] == [256, 256, 256, 10]
    assert device.config_writes == [(4, struct.pack("<I", n)) for n in (256, 512, 768, target)]
    assert device.config.actual == target
    # PFNs are gpa >> 12 of the last block's pages, in order.
    last = driver.layout.blocks[-1].gpa
    assert device.pfns(0)[:3] == [(last >> 12) + i for i in range(3)]
    assert balloon.ballooned_gpas() == [pfn << 12 for pfn in device.pfns(0)]
    assert driver.held_blocks == {block.gpa for block in driver.layout.blocks[-2:]}
    # Each page carried the pattern when the device got it, and is freed now.
    first = device.chains[0]
    assert struct.unpack_from("<QQ", first.first_page) == (first.pfns[0] << 12, BALLOON_MAGIC)
    page = bytearray(PAGE_SIZE)
    rig.ram.pread_into(last, page)
    assert page == bytes(PAGE_SIZE)
    # The inflated pages were written and freed; only the PFN array's page stays.
    assert rig.ram.allocated_bytes() <= allocated + PAGE_SIZE
    # Nothing to do: no chain, no config write.
    again = await balloon.update()
    assert again.chains == 0 and len(device.config_writes) == 4
    # The PFN array lives in the scratch page.
    assert balloon.pfns_gpa == driver.layout.scratch_gpa


async def test_fill_off_inflates_pages_untouched(ram: GuestRam) -> None:
    rig = await make_rig(ram, balloon_fill=False)
    rig.device.free_pages = False
    rig.device.set_target(8)
    await rig.balloon.update()
    assert rig.device.chains[0].first_page == bytes(PAGE_SIZE)
    assert rig.balloon.filled_bytes == 0


async def test_deflate_is_lifo_and_blocks_return_once_empty(rig: Rig) -> None:
    device, balloon, driver = rig.device, rig.balloon, rig.driver
    blocks = driver.layout.blocks
    device.set_target(PAGES_PER_BLOCK + 100)
    await balloon.update()
    inflated = device.pfns(0)
    assert driver.held_blocks == {blocks[-1].gpa, blocks[-2].gpa}

    device.set_target(PAGES_PER_BLOCK + 40)
    result = await balloon.update()
    assert (result.deflated, result.chains, result.actual) == (60, 1, PAGES_PER_BLOCK + 40)
    assert device.pfns(1) == inflated[::-1][:60]
    assert driver.held_blocks == {blocks[-1].gpa, blocks[-2].gpa}

    device.set_target(PAGES_PER_BLOCK - 1)
    result = await balloon.update()
    assert result.deflated == 41 and result.chains == 1
    assert driver.held_blocks == {blocks[-1].gpa}  # the second block is whole again
    assert device.pfns(1) == inflated[::-1][:101]

    device.set_target(0)
    result = await balloon.update()
    assert result.deflated == PAGES_PER_BLOCK - 1 and result.chains == 2
    assert driver.held_blocks == set() and balloon.num_pages == 0
    assert sorted(device.pfns(1)) == sorted(inflated)
    assert device.config.actual == 0
    # Inflating again starts from the last block once more.
    device.set_target(1)
    await balloon.update()
    assert device.pfns(0)[-1] == blocks[-1].gpa >> 12


async def test_out_of_puff_stops_with_every_free_page_ballooned(ram: GuestRam) -> None:
    rig = await make_rig(ram, balloon_fill=False)
    total = len(rig.driver.layout.blocks) * PAGES_PER_BLOCK
    rig.device.set_target(total + 5)
    result = await rig.balloon.update()
    assert result.out_of_puff and not result.reached
    assert result.actual == total == rig.device.config.actual
    assert rig.balloon.alloc_stalls == 1
    with pytest.raises(DriverError, match="ballooned"):
        await rig.driver.report()


async def test_a_silent_device_times_out_with_a_clear_error(ram: GuestRam) -> None:
    rig = await make_rig(ram, report_timeout=0.2)
    rig.device.silent.add(0)
    rig.device.set_target(3)
    with pytest.raises(ReportTimeoutError, match=r"inflate chain 0 \(3 PFNs\) within 0.2 s"):
        await rig.balloon.update()


async def test_reports_and_balloon_share_the_guest(rig: Rig) -> None:
    device, balloon, driver = rig.device, rig.balloon, rig.driver
    device.set_target(3 * PAGES_PER_BLOCK)
    update = asyncio.create_task(balloon.update())
    reports = [await driver.report() for _ in range(6)]
    await update
    held = driver.held_blocks
    assert len(held) == 3
    for report in reports[2:]:  # after the balloon took its blocks
        assert not set(report.gpas) & held
    rotation = len(driver.layout.blocks) - len(held)
    reported = {
        gpa for report in (await driver.run(rotation // 4 + 1)).reports for gpa in report.gpas
    }
    assert not reported & held
    assert driver.verify_integrity_region() and not driver.corrupted_pages
    # No guard stamp landed in a ballooned page: each still reads as freed.
    page = bytearray(PAGE_SIZE)
    for gpa in balloon.ballooned_gpas():
        rig.ram.pread_into(gpa, page)
        assert page == bytes(PAGE_SIZE), hex(gpa)


# -- follow and OOM -------------------------------------------------------------------


async def test_follow_reaches_each_target_the_host_sets(rig: Rig) -> None:
    device, balloon = rig.device, rig.balloon
    stop = asyncio.Event()
    device.config = replace(device.config, num_pages=300)  # set before the guest looks
    task = asyncio.create_task(balloon.follow(stop))

    async def settle(pages: int) -> None:
        for _ in range(200):
            if device.config.actual == pages and balloon.num_pages == pages:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"actual {device.config.actual}, wanted {pages}")

    await settle(300)  # the probe-time check, with no CONFIG_CHANGE_MSG
    device.set_target(1000)
    await settle(1000)
    device.set_target(10)
    await settle(10)
    stop.set()
    updates = await asyncio.wait_for(task, 2.0)
    assert [(u.inflated, u.deflated) for u in updates] == [(300, 0), (700, 0), (0, 990)]


async def test_oom_deflates_256_pages_only_with_deflate_on_oom(ram: GuestRam) -> None:
    rig = await make_rig(ram, deflate_on_oom=True)
    rig.device.set_target(600)
    await rig.balloon.update()
    assert await rig.balloon.oom() == 256
    assert rig.balloon.num_pages == 344 == rig.device.config.actual
    plain = await make_rig(ram, offered=TODAY, deflate_on_oom=True)
    plain.device.set_target(10)
    await plain.balloon.update()
    assert await plain.balloon.oom() == 0
    assert plain.balloon.num_pages == 10 and plain.balloon.oom_kills == 1


# -- stats ------------------------------------------------------------------------------


async def test_stats_buffer_is_primed_held_and_refilled(ram: GuestRam) -> None:
    rig = await make_rig(ram, stats=True)
    device, balloon = rig.device, rig.balloon
    await asyncio.sleep(0)  # the device picks up the kick
    assert len(device.stats) == 1 and device.held_stats is not None
    first = device.stats[0]
    assert sorted(first) == list(range(16))
    assert first[StatTag.MEMTOT] == rig.ram.size
    assert first[StatTag.MEMFREE] == rig.driver.layout.reportable_bytes
    assert balloon.stats_gpa == rig.driver.layout.scratch_gpa + 1024

    stop = asyncio.Event()
    loop_task = asyncio.create_task(balloon.stats_loop(stop))
    device.set_target(100)
    await balloon.update()
    await rig.driver.report()
    device.return_stats()
    for _ in range(200):
        if len(device.stats) == 2:
            break
        await asyncio.sleep(0.005)
    second = device.stats[1]
    assert second[StatTag.MEMFREE] == first[StatTag.MEMFREE] - 100 * PAGE_SIZE
    assert second[StatTag.MINFLT] > first[StatTag.MINFLT]
    assert balloon.stats_returned == 1 and balloon.stats_posted == 2
    stop.set()
    await asyncio.wait_for(loop_task, 2.0)


# -- the mocked guest and its summary ------------------------------------------------


def test_mock_guest_has_a_balloon_only_when_wanted(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "none.sock")
    plain = MockGuest(GuestOptions(socket_path, memory_bytes=96 * MiB))
    try:
        assert plain.balloon is None
        assert "balloon" not in plain.summary(RunResult())
    finally:
        plain.ram.close()
    wanted = MockGuest(
        GuestOptions(socket_path, memory_bytes=96 * MiB, driver=DriverConfig(stats=True))
    )
    try:
        assert wanted.balloon is not None
        assert wanted.frontend.options.num_queues == 4
    finally:
        wanted.ram.close()


async def test_summary_adds_a_balloon_section(rig: Rig) -> None:
    rig.device.set_target(20)
    await rig.balloon.update()
    context = RunContext(
        capacity=4,
        order=9,
        memory_bytes=rig.ram.size,
        regions=1,
        indirect=True,
        event_idx=True,
        features=rig.driver.accepted_features,
        queue_size=64,
    )
    plain = build_summary(RunResult(), context)
    assert "balloon" not in plain
    summary = build_summary(RunResult(), replace(context, balloon=rig.balloon.describe()))
    assert set(summary) - set(plain) == {"balloon"}
    balloon = summary["balloon"]
    assert balloon["ballooned_pages"] == 20 and balloon["actual"] == 20
    assert balloon["inflate_chains"] == 1 and balloon["must_tell_host"] is False
    assert "ballooned" in format_table(summary)
