"""Inflate and deflate chains: PFNs read, checked, coalesced, and discarded
only where every page of a discard granule is ballooned.

Each test names the wrong behaviour it catches.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator

import pytest

from tests.backend.device_rig import FIRST_PAGE, PFN_ARRAY, reporting_rig
from vhost_balloon.backend.balloon.ballooned import (
    MAX_CHAIN_BYTES,
    BadChain,
    BalloonedPages,
    coalesce,
    read_pfns,
)
from vhost_balloon.backend.balloon.records import BalloonRecord
from vhost_balloon.backend.vhost.mapping import MappedRegion, MemoryMap
from vhost_balloon.protocol.vhost_user import MemoryRegionDesc
from vhost_balloon.protocol.virtqueue import DESC_F_WRITE, Buffer, Chain, Descriptor

MiB = 1 << 20
PAGE = 4096
HUGE = 2 * MiB


@pytest.fixture
def two_regions() -> Iterator[MemoryMap]:
    """16 MiB at GPA 0 and 16 MiB right after it, in two memfds."""
    regions = []
    for index in range(2):
        fd = os.memfd_create(f"r{index}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 16 * MiB)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        desc = MemoryRegionDesc(index * 16 * MiB, 16 * MiB, 0x7F0000000000 + index * 16 * MiB, 0)
        regions.append(MappedRegion(desc, fd))
    memory_map = MemoryMap(regions)
    yield memory_map
    memory_map.close()


def _pfns(start_gpa: int, pages: int) -> list[int]:
    return list(range(start_gpa // PAGE, start_gpa // PAGE + pages))


def test_contiguous_pfns_become_one_discard_per_run_in_any_order(two_regions: MemoryMap) -> None:
    # Catches: one syscall per page (QEMU's way: 256 a chain), or runs built
    # from the chain's order instead of the pages' (Linux sends them unsorted).
    pages = BalloonedPages()
    pfns = _pfns(MiB, 8) + _pfns(4 * MiB, 4)
    plan = pages.inflate(list(reversed(pfns)), two_regions)
    assert plan.pages == 12 and pages.count == 12
    assert [(t.gpa, t.length) for t in plan.targets] == [(MiB, 8 * PAGE), (4 * MiB, 4 * PAGE)]
    assert plan.ranges == [(MiB, 8 * PAGE), (4 * MiB, 4 * PAGE)]
    assert [t.file_offset for t in plan.targets] == [MiB, 4 * MiB]


def test_a_run_across_two_regions_is_split_at_the_boundary(two_regions: MemoryMap) -> None:
    # Catches: one range that reaches past its region's end (a discard in the
    # wrong file, or one refused by the kernel and lost).
    plan = BalloonedPages().inflate(_pfns(16 * MiB - 2 * PAGE, 4), two_regions)
    regions = two_regions.regions
    assert [(t.gpa, t.length, t.fd) for t in plan.targets] == [
        (16 * MiB - 2 * PAGE, 2 * PAGE, regions[0].fd),
        (16 * MiB, 2 * PAGE, regions[1].fd),
    ]
    assert plan.targets[1].file_offset == 0


def test_pfns_outside_ram_repeated_or_inflated_twice_are_counted_not_discarded(
    two_regions: MemoryMap,
) -> None:
    # Catches: a PFN beyond guest RAM discarded (or crashing the chain), a
    # page discarded twice, a duplicate counted as a ballooned page.
    pages = BalloonedPages()
    beyond = (32 * MiB) // PAGE
    plan = pages.inflate([10, 11, 10, beyond, 0xFFFFFFFF], two_regions)
    assert (plan.pfns, plan.pages, plan.duplicates, plan.skipped_outside) == (5, 2, 1, 2)
    assert [(t.gpa, t.length) for t in plan.targets] == [(10 * PAGE, 2 * PAGE)]
    again = pages.inflate([11, 12], two_regions)
    assert (again.pages, again.duplicates) == (1, 1)
    assert [(t.gpa, t.length) for t in again.targets] == [(12 * PAGE, PAGE)]
    assert pages.count == 3


def test_deflate_gives_back_only_what_was_inflated(two_regions: MemoryMap) -> None:
    # Catches: a deflate of never-inflated pages counted as given back (the
    # ballooned count goes negative or wrong), anything discarded on deflate.
    pages = BalloonedPages()
    pages.inflate(_pfns(0, 4), two_regions)
    plan = pages.deflate([1, 2, 2, 100, (64 * MiB) // PAGE], two_regions)
    assert (plan.pages, plan.duplicates, plan.unknown, plan.skipped_outside) == (2, 1, 1, 1)
    assert plan.targets == [] and plan.files == {}
    assert plan.ranges == [(PAGE, 2 * PAGE)]
    assert pages.count == 2 and 0 in pages and 1 not in pages and 3 in pages


def test_a_huge_page_is_discarded_only_once_every_piece_is_ballooned(
    two_regions: MemoryMap,
) -> None:
    # Catches: a huge page punched while part of it is still the guest's (its
    # data lost), or never punched because its pieces came in separate chains
    # (QEMU forgets a partial huge page at each chain: 1 MiB chains never free one).
    two_regions.regions[0].granularity = HUGE  # as on hugetlbfs
    pages = BalloonedPages()
    first = pages.inflate(_pfns(HUGE, 256), two_regions)  # half of it, 1 MiB: one Linux chain
    assert first.targets == [] and first.partial_granules == 1
    assert pages.partial_granules == 1
    second = pages.inflate(_pfns(HUGE + MiB, 256), two_regions)
    assert [(t.gpa, t.length) for t in second.targets] == [(HUGE, HUGE)]
    assert pages.partial_granules == 0
    # One piece given back: the huge page is partial again (the guest's touch
    # refaults it whole), and whole again when the piece returns.
    pages.deflate([HUGE // PAGE + 7], two_regions)
    assert pages.partial_granules == 1
    back = pages.inflate([HUGE // PAGE + 7], two_regions)
    assert [(t.gpa, t.length) for t in back.targets] == [(HUGE, HUGE)]
    pages.deflate(_pfns(HUGE, 512), two_regions)
    assert pages.partial_granules == 0 and pages.count == 0


def test_adjacent_whole_huge_pages_are_one_discard(two_regions: MemoryMap) -> None:
    two_regions.regions[0].granularity = HUGE
    plan = BalloonedPages().inflate(_pfns(2 * HUGE, 1024), two_regions)
    assert [(t.gpa, t.length) for t in plan.targets] == [(2 * HUGE, 2 * HUGE)]


def _chain(*descriptors: tuple[int, int, int]) -> Chain:
    return Chain(0, tuple(Descriptor(*d) for d in descriptors), False)


def test_read_pfns_reads_every_readable_buffer_in_order(two_regions: MemoryMap) -> None:
    memory = two_regions.memory
    memory.write(0x1000, struct.pack("<3I", 7, 8, 9))
    memory.write(0x2000, struct.pack("<I", 1))
    assert read_pfns(_chain((0x1000, 12, 0), (0x2000, 4, 0)), memory) == [7, 8, 9, 1]


@pytest.mark.parametrize(
    ("descriptors", "reason"),
    [
        (((0x1000, 8, DESC_F_WRITE),), "device-writable"),
        (((0x1000, 6, 0),), "not a whole number of PFNs"),
        (((40 * MiB, 8, 0),), "outside guest RAM"),
        (((0, MAX_CHAIN_BYTES, 0), (MAX_CHAIN_BYTES, 4, 0)), "more than"),
    ],
    ids=["writable", "odd-length", "outside-ram", "too-long"],
)
def test_a_chain_that_is_not_a_pfn_array_is_refused_whole(
    two_regions: MemoryMap, descriptors: tuple[tuple[int, int, int], ...], reason: str
) -> None:
    # Catches: a malformed chain half-used (some of its PFNs ballooned), or
    # one that raises something the queue thread treats as a broken ring.
    with pytest.raises(BadChain, match=reason):
        read_pfns(_chain(*descriptors), two_regions.memory)


def test_coalesce() -> None:
    assert coalesce([]) == []
    assert coalesce([5, 3, 4, 9]) == [(3, 3), (9, 1)]


def _region_map(gpa: int, mmap_offset: int = 0) -> MemoryMap:
    fd = os.memfd_create("far", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, mmap_offset + 16 * MiB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return MemoryMap(
        [MappedRegion(MemoryRegionDesc(gpa, 16 * MiB, 0x7F0000000000, mmap_offset), fd)]
    )


def test_a_region_not_page_aligned_in_its_file_is_never_discarded() -> None:
    # Catches: a front-end's region whose GPA-to-file shift is not a whole
    # page: a discard of a ballooned page would cut into its neighbour.
    memory_map = _region_map(0x800)
    try:
        memory_map.regions[0].granularity = HUGE
        plan = BalloonedPages().inflate(_pfns(0x200800 - 0x800, 512), memory_map)
        assert plan.targets == [] and plan.skipped_unaligned == 512 and plan.pages == 0
    finally:
        memory_map.close()


def test_the_bitmap_costs_what_is_ballooned_not_where_it_lies() -> None:
    # Catches: a bitmap sized by the highest PFN (32 MiB for one page at 1 TiB).
    memory_map = _region_map(1 << 40)
    try:
        pages = BalloonedPages()
        pages.inflate([(1 << 40) // PAGE + 3], memory_map)
        assert pages.count == 1 and (1 << 40) // PAGE + 3 in pages
        assert sum(len(chunk) for chunk in pages._chunks.values()) == 32 * 1024
        pages.deflate([(1 << 40) // PAGE + 3], memory_map)
        assert pages._chunks == {}
    finally:
        memory_map.close()


def test_a_chain_of_many_runs_keeps_its_record_small() -> None:
    # Catches: a record holding every range of a 262144-PFN chain (32 MiB of
    # objects, a 4 MiB trace line, a trace queue sized for small records).
    with reporting_rig(kind="inflate") as rig:
        pfns = [FIRST_PAGE // PAGE + 2 * i for i in range(200)]  # every other page
        view = rig.memory_map.regions[0].view
        view[PFN_ARRAY : PFN_ARRAY + 800] = struct.pack("<200I", *pfns)
        rig.driver.add([Buffer(PFN_ARRAY, 800, False)])
        rig.device.process_queue(rig.handle, 0)
        (record,) = rig.records
    assert isinstance(record, BalloonRecord)
    assert record.pages == 200 and record.ranges_total == 200 and len(record.ranges) == 64
    assert record.discarded_entries == 200
