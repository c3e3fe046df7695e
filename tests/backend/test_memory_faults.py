"""Guest memory that can vanish under the mapping, and eventfds whose flags
the front-end owns: copies that fail instead of faulting, reads that cannot
block."""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterator

import pytest

from vhost_balloon.backend.libc import buffer_address, read_without_fault, write_without_fault
from vhost_balloon.backend.vhost.mapping import GuardedRegion, MappedRegion
from vhost_balloon.backend.vhost.vring import read_eventfd, signal_eventfd
from vhost_balloon.protocol.errors import MemoryFault
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable, Space
from vhost_balloon.protocol.vhost_user import MemoryRegionDesc
from vhost_balloon.protocol.virtqueue import Buffer, DeviceQueue, DriverQueue, RingLayout

SIZE = 1 << 20
LAYOUT = RingLayout(64, 0x0, 0x1000, 0x2000)


@pytest.fixture
def ram() -> Iterator[tuple[int, mmap.mmap]]:
    """An unsealed memfd, mapped shared: what a front-end could truncate."""
    fd = os.memfd_create("faults")
    os.ftruncate(fd, SIZE)
    mapping = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED)
    try:
        yield fd, mapping
    finally:
        mapping.close()
        os.close(fd)


def test_copies_read_and_write_the_mapping(ram: tuple[int, mmap.mmap]) -> None:
    _, mapping = ram
    address = buffer_address(mapping)
    write_without_fault(address + 4096, b"pattern")
    assert mapping[4096:4103] == b"pattern"
    mapping[8192:8195] = b"abc"
    assert read_without_fault(address + 8192, 3) == b"abc"


def test_a_truncated_page_fails_the_copy_instead_of_faulting(ram: tuple[int, mmap.mmap]) -> None:
    fd, mapping = ram
    region = GuardedRegion(buffer_address(mapping), SIZE)
    os.ftruncate(fd, 4096)  # the first page stays
    assert region.read(0, 8) == bytes(8)
    with pytest.raises(MemoryFault, match="offset 0x1000"):
        region.read(4096, 2)
    with pytest.raises(MemoryFault):
        region.write(SIZE - 2, b"xx")
    with pytest.raises(MemoryFault):  # a copy that starts whole and runs past the end
        region.read(4000, 200)


def test_a_closed_guarded_region_refuses_like_a_released_view(ram: tuple[int, mmap.mmap]) -> None:
    _, mapping = ram
    region = GuardedRegion(buffer_address(mapping), SIZE)
    with pytest.raises(ValueError, match="outside"):
        region.read(SIZE - 1, 2)
    region.close()
    with pytest.raises(ValueError, match="unmapped"):
        region.read(0, 2)


def test_only_files_that_can_shrink_are_guarded(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "ram")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, SIZE)
    plain_file = MappedRegion(MemoryRegionDesc(0, SIZE, 1 << 40, 0), fd)
    try:
        assert plain_file.guarded is not None and plain_file.ring_bytes is plain_file.guarded
    finally:
        plain_file.close()


def _chains(driver: DriverQueue) -> list[int]:
    return [
        driver.add([Buffer(0x10000, 4096, True), Buffer(0x20000, 4096, True)]),
        driver.add(
            [Buffer(0x30000 + i * 4096, 4096, True) for i in range(8)], indirect_table=0x4000
        ),
        driver.add([Buffer(0x40000, 100, False), Buffer(0x50000, 8, True)]),
    ]


def test_a_device_queue_over_copies_sees_what_a_plain_one_sees(ram: tuple[int, mmap.mmap]) -> None:
    _, mapping = ram
    table = RegionTable([Region(0, SIZE, 1 << 40, 0)])
    guest = GuestMemory(table, [mapping])
    results = []
    for guarded in (False, True):
        mapping[:0x8000] = bytes(0x8000)
        driver = DriverQueue(guest, LAYOUT, event_idx=guarded)
        heads = _chains(driver)
        buffer = GuardedRegion(buffer_address(mapping), SIZE) if guarded else mapping
        device = DeviceQueue(
            GuestMemory(table, [buffer]),
            LAYOUT,
            ring_space=Space.GPA,
            indirect=True,
            event_idx=guarded,
        )
        chains = []
        while (chain := device.pop()) is not None:
            chains.append(chain)
            device.push(chain.head, 8)
        notify = device.needs_notify()
        device.disable_notifications()
        assert device.enable_notifications() is False
        used = driver.get_used()
        assert [head for head, _ in used] == heads
        results.append((chains, used, notify))
    assert results[0][:2] == results[1][:2]


def test_a_device_queue_whose_ram_went_away_raises_memory_fault(ram: tuple[int, mmap.mmap]) -> None:
    fd, mapping = ram
    table = RegionTable([Region(0, SIZE, 1 << 40, 0)])
    driver = DriverQueue(GuestMemory(table, [mapping]), LAYOUT)
    _chains(driver)
    device = DeviceQueue(
        GuestMemory(table, [GuardedRegion(buffer_address(mapping), SIZE)]), LAYOUT, indirect=True
    )
    os.ftruncate(fd, 0)
    with pytest.raises(MemoryFault):
        device.pop()
    with pytest.raises(MemoryFault):
        device.push(0, 0)


def _must_return(action: object, timeout: float = 2.0) -> BaseException | None:
    """Run `action` on a thread; fail (rather than hang) if it blocks."""
    assert callable(action)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            action()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the eventfd call blocked"
    return outcome[0]


def test_reading_an_empty_eventfd_never_blocks_whatever_its_flags() -> None:
    fd = os.eventfd(0)  # blocking: as if the front-end cleared O_NONBLOCK just now
    try:
        assert os.get_blocking(fd)
        assert isinstance(_must_return(lambda: read_eventfd(fd)), BlockingIOError)
        assert os.get_blocking(fd)  # nothing depended on the flag
        os.eventfd_write(fd, 5)
        assert _must_return(lambda: read_eventfd(fd)) is None
        assert isinstance(_must_return(lambda: read_eventfd(fd)), BlockingIOError)
    finally:
        os.close(fd)


def test_signalling_a_full_blocking_eventfd_returns() -> None:
    fd = os.eventfd(0)
    try:
        os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
        os.set_blocking(fd, True)
        assert _must_return(lambda: signal_eventfd(fd)) is None
        assert os.eventfd_read(fd) == 0xFFFF_FFFF_FFFF_FFFE
    finally:
        os.close(fd)
