"""Region table and guest-address translation (protocol/memory.py)."""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from vhost_balloon.protocol.errors import AddressError
from vhost_balloon.protocol.memory import U64_LIMIT, GuestMemory, Region, RegionTable, Space

GIB = 1 << 30
TOP = U64_LIMIT - 1


def two_region_q35_table() -> RegionTable:
    """What QEMU sends for a 4 GiB q35 guest: two regions of one memfd."""
    return RegionTable(
        [
            Region(0, 2 * GIB, 0x7F00_0000_0000, 0),
            Region(4 * GIB, 2 * GIB, 0x7F00_8000_0000, 2 * GIB),
        ]
    )


def test_find_returns_region_and_offset_in_gpa_space() -> None:
    table = two_region_q35_table()
    assert table.find(0x1000, 0x1000) == (0, 0x1000)
    assert table.find(4 * GIB + 0x2000, 0x10) == (1, 0x2000)


def test_find_in_uva_space_uses_userspace_addr() -> None:
    table = two_region_q35_table()
    assert table.find(0x7F00_8000_0010, 8, Space.UVA) == (1, 0x10)
    with pytest.raises(AddressError):
        table.find(0x10, 8, Space.UVA)


def test_find_accepts_a_range_ending_exactly_at_the_region_end() -> None:
    table = two_region_q35_table()
    assert table.find(2 * GIB - 8, 8) == (0, 2 * GIB - 8)


def test_find_refuses_a_range_crossing_the_region_end() -> None:
    table = two_region_q35_table()
    with pytest.raises(AddressError, match="not inside one memory region"):
        table.find(2 * GIB - 8, 9)


def test_find_refuses_a_range_spanning_two_adjacent_regions() -> None:
    table = RegionTable([Region(0, 0x1000, 0x10000, 0), Region(0x1000, 0x1000, 0x11000, 0x1000)])
    assert table.find(0xFF0, 0x10) == (0, 0xFF0)
    assert table.find(0x1000, 0x10) == (1, 0)
    with pytest.raises(AddressError):
        table.find(0xFF0, 0x20)


def test_find_refuses_holes_between_regions() -> None:
    table = two_region_q35_table()
    with pytest.raises(AddressError):
        table.find(3 * GIB, 1)


def test_find_refuses_addresses_below_the_first_region() -> None:
    table = RegionTable([Region(0x10000, 0x1000, 0x10000, 0)])
    with pytest.raises(AddressError):
        table.find(0xFFFF, 1)


@pytest.mark.parametrize(("addr", "length"), [(-1, 1), (0, -1), (TOP, 2), (U64_LIMIT, 1)])
def test_find_refuses_negative_or_wrapping_ranges(addr: int, length: int) -> None:
    table = RegionTable([Region(TOP - 0xFFF, 0x1000, 0, 0)])
    with pytest.raises(AddressError):
        table.find(addr, length)


def test_region_may_end_exactly_at_the_top_of_the_address_space() -> None:
    table = RegionTable([Region(U64_LIMIT - 0x1000, 0x1000, 0, 0)])
    assert table.find(TOP, 1) == (0, 0xFFF)


def test_empty_table_finds_nothing() -> None:
    with pytest.raises(AddressError):
        RegionTable([]).find(0, 1)


@pytest.mark.parametrize("size", [0, -1])
def test_region_of_non_positive_size_is_refused(size: int) -> None:
    with pytest.raises(AddressError, match="size"):
        RegionTable([Region(0, size, 0, 0)])


@pytest.mark.parametrize(
    "region",
    [
        Region(U64_LIMIT - 0x1000, 0x2000, 0, 0),
        Region(0, 0x2000, U64_LIMIT - 0x1000, 0),
        Region(0, 0x2000, 0, U64_LIMIT - 0x1000),
        Region(-0x1000, 0x2000, 0, 0),
    ],
)
def test_region_wrapping_64_bits_in_any_space_is_refused(region: Region) -> None:
    with pytest.raises(AddressError, match="wraps"):
        RegionTable([region])


def test_overlapping_regions_in_gpa_space_are_refused() -> None:
    with pytest.raises(AddressError, match="overlap in guest-physical"):
        RegionTable([Region(0, 0x2000, 0x10000, 0), Region(0x1000, 0x2000, 0x20000, 0)])


def test_overlapping_regions_in_uva_space_are_refused() -> None:
    with pytest.raises(AddressError, match="overlap in front-end virtual"):
        RegionTable([Region(0, 0x2000, 0x10000, 0), Region(0x10000, 0x2000, 0x11000, 0)])


def test_identical_regions_are_refused() -> None:
    region = Region(0, 0x1000, 0x10000, 0)
    with pytest.raises(AddressError):
        RegionTable([region, region])


def test_gpa_to_uva_translates_through_the_right_region() -> None:
    table = two_region_q35_table()
    assert table.gpa_to_uva(4 * GIB + 5) == 0x7F00_8000_0005
    with pytest.raises(AddressError):
        table.gpa_to_uva(3 * GIB)


def test_file_offset_adds_mmap_offset() -> None:
    region = two_region_q35_table().regions[1]
    assert region.file_offset(0x1000) == 2 * GIB + 0x1000


# --- find() against a brute-force model -------------------------------------------


@st.composite
def region_tables(draw: st.DrawFn) -> list[Region]:
    """1..5 disjoint regions (in both spaces) in shuffled order, small or huge."""
    count = draw(st.integers(1, 5))
    scale = draw(st.sampled_from([1, 0x1000, 1 << 40]))
    gpa = draw(st.integers(0, 4)) * scale
    uvas = draw(st.permutations(range(count)))
    regions = []
    for i in range(count):
        size = draw(st.integers(1, 4)) * scale
        regions.append(Region(gpa, size, (1 << 47) + uvas[i] * (5 * scale), 0))
        gpa += size + draw(st.integers(0, 2)) * scale
    assume(gpa <= U64_LIMIT)
    return draw(st.permutations(regions))


def model_find(regions: list[Region], addr: int, length: int, space: Space) -> set[int]:
    """Every region index that fully contains [addr, addr+length) and holds addr
    (a zero-length range at a region's end is in no region)."""
    return {
        i
        for i, r in enumerate(regions)
        if r.start(space) <= addr < r.start(space) + r.size
        and addr + length <= r.start(space) + r.size
    }


@given(
    region_tables(),
    st.integers(0, 40),
    st.integers(0, 9),
    st.integers(-2, 2),
    st.sampled_from(list(Space)),
)
@example([Region(0, 1, 0, 0)], 0, 1, 0, Space.GPA)
def test_find_never_returns_a_range_outside_a_region(
    regions: list[Region], addr_units: int, length_units: int, skew: int, space: Space
) -> None:
    scale = min(r.size for r in regions)
    base = min(r.start(space) for r in regions)
    addr = max(0, base + addr_units * scale // 2 + skew)
    length = max(0, length_units * scale // 2 + skew)
    table = RegionTable(regions)
    expected = model_find(regions, addr, length, space)
    try:
        index, offset = table.find(addr, length, space)
    except AddressError:
        assert not expected
        return
    assert index in expected
    region = regions[index]
    assert offset == addr - region.start(space)
    assert offset >= 0
    assert offset + length <= region.size


@given(
    st.integers(0, 0x3000),
    st.integers(1, 0x3000),
    st.integers(0, 0x3000),
    st.integers(1, 0x3000),
)
def test_regions_overlapping_in_gpa_space_are_always_refused(
    a: int, a_size: int, b: int, b_size: int
) -> None:
    overlap = a < b + b_size and b < a + a_size
    regions = [Region(a, a_size, 0x100000, 0), Region(b, b_size, 0x200000, 0)]
    if overlap:
        with pytest.raises(AddressError, match="overlap"):
            RegionTable(regions)
    else:
        assert len(RegionTable(regions)) == 2


# --- GuestMemory ------------------------------------------------------------------


def small_memory() -> tuple[GuestMemory, bytearray, bytearray]:
    first, second = bytearray(0x1000), bytearray(0x1000)
    table = RegionTable([Region(0, 0x1000, 0x10000, 0), Region(0x4000, 0x1000, 0x20000, 0)])
    return GuestMemory(table, [first, second]), first, second


def test_guest_memory_reads_and_writes_the_right_buffer() -> None:
    memory, first, second = small_memory()
    memory.write(0x4010, b"abc")
    assert second[0x10:0x13] == b"abc"
    assert bytes(first) == bytes(0x1000)
    assert memory.read(0x4010, 3) == b"abc"
    assert memory.read(0x20010, 3, Space.UVA) == b"abc"


def test_guest_memory_refuses_access_across_a_region_end() -> None:
    memory, _, _ = small_memory()
    with pytest.raises(AddressError):
        memory.read(0xFFF, 2)
    with pytest.raises(AddressError):
        memory.write(0xFFF, b"ab")


def test_guest_memory_needs_one_large_enough_buffer_per_region() -> None:
    table = RegionTable([Region(0, 0x1000, 0x10000, 0)])
    with pytest.raises(ValueError, match="one buffer per region"):
        GuestMemory(table, [])
    with pytest.raises(ValueError, match="smaller"):
        GuestMemory(table, [bytearray(0xFFF)])
