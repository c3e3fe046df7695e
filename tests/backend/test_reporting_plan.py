"""Which entries of a report may be discarded (invariant 1), without a socket."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_balloon.backend.balloon.report_plan import plan_report
from vhost_balloon.backend.vhost.mapping import MappedRegion, MappingError, MemoryMap
from vhost_balloon.protocol.errors import AddressError
from vhost_balloon.protocol.vhost_user import MemoryRegionDesc
from vhost_balloon.protocol.virtqueue import DESC_F_WRITE, Chain, Descriptor

MiB = 1 << 20
GPA = 1 << 30  # the region's guest-physical base
FILE_OFFSET = 16 * MiB  # the region starts this far into its file


@pytest.fixture
def memory_map() -> Iterator[MemoryMap]:
    fd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, FILE_OFFSET + 64 * MiB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mapped = MappedRegion(MemoryRegionDesc(GPA, 64 * MiB, 0x7F0000000000, FILE_OFFSET), fd)
    table = MemoryMap([mapped])
    yield table
    table.close()


def chain(*entries: tuple[int, int], writable: bool = True) -> Chain:
    flags = DESC_F_WRITE if writable else 0
    return Chain(0, tuple(Descriptor(addr, length, flags) for addr, length in entries), False)


def test_targets_carry_the_file_offset_and_the_mapping_address(memory_map: MemoryMap) -> None:
    plan = plan_report(chain((GPA + 2 * MiB, 2 * MiB)), memory_map, discard=True)
    (target,) = plan.targets
    mapped = memory_map.regions[0]
    assert target.file_offset == FILE_OFFSET + 2 * MiB
    assert target.address == mapped.address + FILE_OFFSET + 2 * MiB
    assert plan.skipped == 0


def test_huge_page_granularity_skips_entries_smaller_than_a_huge_page(
    memory_map: MemoryMap,
) -> None:
    memory_map.regions[0].granularity = 2 * MiB  # as on hugetlbfs with 2 MiB pages
    plan = plan_report(
        chain((GPA, 2 * MiB), (GPA + 4 * MiB, 4096), (GPA + 6 * MiB + 4096, 2 * MiB)),
        memory_map,
        discard=True,
    )
    assert [t.gpa for t in plan.targets] == [GPA]
    assert plan.skipped_unaligned == 2


def test_entries_crossing_the_region_end_are_never_split(memory_map: MemoryMap) -> None:
    plan = plan_report(
        chain((GPA + 62 * MiB, 4 * MiB), (GPA - 4096, 8192)), memory_map, discard=True
    )
    assert plan.targets == []
    assert plan.skipped_outside == 2


def test_counting_only_plans_no_discard(memory_map: MemoryMap) -> None:
    plan = plan_report(chain((GPA, 2 * MiB)), memory_map, discard=False)
    assert plan.targets == [] and plan.entries == 1 and plan.skipped == 0


def test_readable_descriptors_are_not_entries(memory_map: MemoryMap) -> None:
    plan = plan_report(chain((GPA, 2 * MiB), writable=False), memory_map, discard=True)
    assert plan.entries == 0 and plan.targets == [] and plan.skipped == 0


def test_no_memory_table_skips_everything() -> None:
    plan = plan_report(chain((GPA, 2 * MiB)), MemoryMap(), discard=True)
    assert plan.targets == [] and plan.skipped_outside == 1


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_region_past_the_end_of_its_file_is_refused_and_its_fd_closed() -> None:
    fd = os.memfd_create("short", os.MFD_CLOEXEC)
    os.ftruncate(fd, MiB)
    with pytest.raises(MappingError, match="file has"):
        MappedRegion(MemoryRegionDesc(0, 2 * MiB, 0x7F0000000000, 0), fd)
    assert not _is_open(fd)


def test_region_wrapping_64_bits_is_refused_and_its_fd_closed() -> None:
    fd = os.memfd_create("wrap", os.MFD_CLOEXEC)
    with pytest.raises(AddressError):
        MappedRegion(MemoryRegionDesc((1 << 64) - 4096, 8192, 0, 0), fd)
    assert not _is_open(fd)


def test_memfd_granularity_is_the_page_size(memory_map: MemoryMap) -> None:
    assert memory_map.regions[0].granularity == os.sysconf("SC_PAGE_SIZE")


def test_unsealed_memfd_is_refused_unless_allowed() -> None:
    def unsealed() -> int:
        fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 * MiB)
        return fd

    fd = unsealed()
    with pytest.raises(MappingError, match="F_SEAL_SHRINK"):
        MappedRegion(MemoryRegionDesc(0, 2 * MiB, 0x7F0000000000, 0), fd)
    assert not _is_open(fd)
    allowed = MappedRegion(
        MemoryRegionDesc(0, 2 * MiB, 0x7F0000000000, 0), unsealed(), allow_unsealed=True
    )
    assert allowed.sealable and not allowed.sealed_against_shrink
    allowed.close()


def test_a_file_that_cannot_be_sealed_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(2 * MiB))
    mapped = MappedRegion(
        MemoryRegionDesc(0, 2 * MiB, 0x7F0000000000, 0), os.open(path, os.O_RDWR | os.O_CLOEXEC)
    )
    assert not mapped.sealable
    mapped.close()


# -- the seal rule: exactly F_SEAL_SHRINK, nothing more, nothing less ----------

SEALS = {
    "shrink": (fcntl.F_SEAL_SHRINK, True),
    "shrink+grow (QEMU's default)": (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, True),
    "shrink+seal": (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL, True),
    "grow": (fcntl.F_SEAL_GROW, False),
    "seal": (fcntl.F_SEAL_SEAL, False),
    "none": (0, False),
}


@pytest.mark.parametrize("seals, accepted", SEALS.values(), ids=SEALS.keys())
def test_a_memfd_is_accepted_exactly_when_sealed_against_shrinking(
    seals: int, accepted: bool
) -> None:
    fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2 * MiB)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    desc = MemoryRegionDesc(0, 2 * MiB, 0x7F0000000000, 0)
    if not accepted:
        with pytest.raises(MappingError, match="F_SEAL_SHRINK"):
            MappedRegion(desc, fd)
        assert not _is_open(fd)
        return
    mapped = MappedRegion(desc, fd)
    assert mapped.sealable and mapped.sealed_against_shrink
    mapped.close()


# -- the region cache of plan_report -------------------------------------------

NEXT_GPA = GPA + 64 * MiB  # a second region, in another file, right after the first


@pytest.fixture
def two_regions(memory_map: MemoryMap) -> Iterator[MemoryMap]:
    fd = os.memfd_create("ram2", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 64 * MiB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    memory_map.add(MappedRegion(MemoryRegionDesc(NEXT_GPA, 64 * MiB, 0x7E0000000000, 0), fd))
    yield memory_map


def test_the_cached_region_never_takes_a_range_crossing_its_end(two_regions: MemoryMap) -> None:
    """The first entry caches region 1; the next starts inside it and ends in
    region 2, which are different files: it must be skipped, not discarded
    through region 1's file past its end."""
    plan = plan_report(
        chain((GPA, 2 * MiB), (NEXT_GPA - 2 * MiB, 4 * MiB), (GPA + 2 * MiB, 2 * MiB)),
        two_regions,
        discard=True,
    )
    assert [t.gpa for t in plan.targets] == [GPA, GPA + 2 * MiB]
    assert plan.skipped_outside == 1


def test_the_cached_region_never_takes_a_range_before_its_start(memory_map: MemoryMap) -> None:
    plan = plan_report(
        chain((GPA + 2 * MiB, 2 * MiB), (GPA - 2 * MiB, 2 * MiB)), memory_map, discard=True
    )
    assert [t.gpa for t in plan.targets] == [GPA + 2 * MiB]
    assert plan.skipped_outside == 1


def test_entries_alternating_between_regions_use_each_regions_file(two_regions: MemoryMap) -> None:
    first, second = two_regions.regions
    plan = plan_report(
        chain(
            (GPA, 2 * MiB),
            (NEXT_GPA, 2 * MiB),
            (GPA + 4 * MiB, 2 * MiB),
            (NEXT_GPA + 4 * MiB, 2 * MiB),
        ),
        two_regions,
        discard=True,
    )
    assert [(t.fd, t.file_offset) for t in plan.targets] == [
        (first.fd, FILE_OFFSET),
        (second.fd, 0),
        (first.fd, FILE_OFFSET + 4 * MiB),
        (second.fd, 4 * MiB),
    ]
    assert set(plan.files) == {first.identity, second.identity}


# -- alignment at every granularity ---------------------------------------------

GRANULARITIES = [4096, 64 * 1024, 2 * MiB, 1 << 30]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_only_entries_aligned_to_the_granularity_in_start_and_length_are_discarded(
    granularity: int,
) -> None:
    size = 4 * granularity
    fd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)  # sparse: nothing is allocated
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    base = 1 << 40
    table = MemoryMap([MappedRegion(MemoryRegionDesc(base, size, 0x7D0000000000, 0), fd)])
    table.regions[0].granularity = granularity  # as hugetlbfs reports for its page size
    half = granularity // 2
    try:
        plan = plan_report(
            chain(
                (base, granularity),  # aligned: discarded
                (base + granularity + half, granularity),  # start off by half
                (base + granularity + 512, granularity),  # start off by a sector
                (base + 2 * granularity, half),  # short length
                (base + 2 * granularity, granularity + 512),  # long length
                (base + 3 * granularity, granularity),  # aligned: discarded
            ),
            table,
            discard=True,
        )
    finally:
        table.close()
    assert [t.gpa for t in plan.targets] == [base, base + 3 * granularity]
    assert plan.skipped_unaligned == 4


def test_alignment_is_judged_by_the_file_offset_not_the_guest_address() -> None:
    """A region whose file offset is 4 KiB off its guest address: an entry
    aligned in guest-physical space is not aligned in the file."""
    fd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8 * MiB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    table = MemoryMap([MappedRegion(MemoryRegionDesc(GPA, 4 * MiB, 0x7D0000000000, 4096), fd)])
    table.regions[0].granularity = 2 * MiB
    try:
        plan = plan_report(
            chain((GPA, 2 * MiB), (GPA + 2 * MiB - 4096, 2 * MiB)), table, discard=True
        )
    finally:
        table.close()
    assert [t.file_offset for t in plan.targets] == [2 * MiB]
    assert plan.skipped_unaligned == 1
