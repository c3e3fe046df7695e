"""Every malformed split-ring state is a QueueError of its own kind.

The rings are written byte by byte (RawRing), as a broken or hostile guest
could, and parsed by the production DeviceQueue.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.unit.ringkit import GUEST_SIZE, INDIRECT_AREA, UVA_BASE, RawRing, make_memory, raw_ring
from vhost_balloon.protocol.errors import QueueError, QueueErrorKind
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable, Space
from vhost_balloon.protocol.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    MAX_INDIRECT_ENTRIES,
    MAX_QUEUE_SIZE,
    Buffer,
    Chain,
    Descriptor,
    DeviceQueue,
    DriverQueue,
    RingLayout,
)

W, N, IND = DESC_F_WRITE, DESC_F_NEXT, DESC_F_INDIRECT
DATA = 0x1000
TOP = (1 << 64) - 1


def pop_error(ring: RawRing, *, indirect: bool = False, next_avail: int = 0) -> QueueError:
    device = ring.device(indirect=indirect, next_avail=next_avail)
    with pytest.raises(QueueError) as info:
        device.pop()
    return info.value


# --- the legal baseline these cases break ------------------------------------------


def test_well_formed_direct_chain_pops() -> None:
    ring = raw_ring(8)
    ring.set_chain(2, [(DATA, 16, 0), (DATA + 16, 32, W), (DATA + 48, 8, W)])
    ring.make_available(2)
    chain = ring.device().pop()
    assert chain == Chain(
        head=2,
        descriptors=(
            Descriptor(DATA, 16, N),
            Descriptor(DATA + 16, 32, W | N),
            Descriptor(DATA + 48, 8, W),
        ),
        indirect=False,
    )
    assert chain.readable == (Descriptor(DATA, 16, N),)
    assert [d.length for d in chain.writable] == [32, 8]


def test_well_formed_indirect_chain_pops() -> None:
    ring = raw_ring(8)
    ring.set_chain(0, [(DATA, 4096, W), (DATA + 4096, 4096, W)], table=INDIRECT_AREA)
    ring.set_desc(5, INDIRECT_AREA, 2 * DESC_SIZE, IND)
    ring.make_available(5)
    chain = ring.device(indirect=True).pop()
    assert chain is not None
    assert chain.head == 5
    assert chain.indirect
    assert [(d.addr, d.length) for d in chain.descriptors] == [(DATA, 4096), (DATA + 4096, 4096)]


def test_empty_ring_pops_nothing() -> None:
    ring = raw_ring(8)
    assert ring.device().pop() is None


def test_chain_as_long_as_the_queue_is_accepted() -> None:
    ring = raw_ring(4)
    ring.set_chain(0, [(DATA + i, 1, W) for i in range(4)])
    ring.make_available(0)
    chain = ring.device().pop()
    assert chain is not None
    assert len(chain.descriptors) == 4


def test_avail_idx_exactly_queue_size_ahead_is_accepted() -> None:
    ring = raw_ring(4)
    for head in range(4):
        ring.set_desc(head, DATA, 1, W)
    ring.make_available(0, 1, 2, 3)
    device = ring.device()
    assert [c.head for c in iter(device.pop, None)] == [0, 1, 2, 3]


def test_write_only_flag_on_an_indirect_descriptor_is_ignored() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, DATA, 8, W, table=INDIRECT_AREA)
    ring.set_desc(0, INDIRECT_AREA, DESC_SIZE, IND | W)
    ring.make_available(0)
    chain = ring.device(indirect=True).pop()
    assert chain is not None
    assert chain.descriptors == (Descriptor(DATA, 8, W),)


def test_descriptor_ending_exactly_at_2_pow_64_is_accepted() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, TOP - 15, 16, W)
    ring.make_available(0)
    chain = ring.device().pop()
    assert chain is not None
    assert chain.descriptors[0].addr == TOP - 15


# --- one example per malformed state ---------------------------------------------


def test_head_index_at_queue_size_is_refused() -> None:
    ring = raw_ring(8)
    ring.make_available(8)
    assert pop_error(ring).kind is QueueErrorKind.HEAD_OUT_OF_RANGE


def test_head_index_0xffff_is_refused() -> None:
    ring = raw_ring(8)
    ring.make_available(0xFFFF)
    assert pop_error(ring).kind is QueueErrorKind.HEAD_OUT_OF_RANGE


def test_next_index_at_queue_size_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, DATA, 8, N, nxt=8)
    ring.make_available(0)
    assert pop_error(ring).kind is QueueErrorKind.NEXT_OUT_OF_RANGE


def test_next_index_beyond_an_indirect_table_is_refused() -> None:
    ring = raw_ring(8)
    # a 2-entry table whose first entry points at entry 2
    ring.set_desc(0, DATA, 8, N | W, nxt=2, table=INDIRECT_AREA)
    ring.set_desc(2, DATA, 8, W, table=INDIRECT_AREA)  # exists in memory, not in the table
    ring.set_desc(0, INDIRECT_AREA, 2 * DESC_SIZE, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.NEXT_OUT_OF_RANGE


def test_descriptor_pointing_at_itself_is_a_loop() -> None:
    ring = raw_ring(8)
    ring.set_desc(3, DATA, 8, N, nxt=3)
    ring.make_available(3)
    assert pop_error(ring).kind is QueueErrorKind.LOOP


def test_two_descriptor_cycle_is_a_loop() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, DATA, 8, N, nxt=1)
    ring.set_desc(1, DATA, 8, N, nxt=0)
    ring.make_available(0)
    assert pop_error(ring).kind is QueueErrorKind.LOOP


def test_chain_longer_than_the_queue_is_refused() -> None:
    ring = raw_ring(4)
    for index in range(4):  # 0 -> 1 -> 2 -> 3 -> 0 -> ...: never ends within 4
        ring.set_desc(index, DATA, 8, N | W, nxt=(index + 1) % 4)
    ring.make_available(0)
    assert pop_error(ring).kind is QueueErrorKind.LOOP


def test_loop_inside_an_indirect_table_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, DATA, 8, N, nxt=1, table=INDIRECT_AREA)
    ring.set_desc(1, DATA, 8, N, nxt=0, table=INDIRECT_AREA)
    ring.set_desc(0, INDIRECT_AREA, 2 * DESC_SIZE, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.LOOP


def test_indirect_descriptor_inside_an_indirect_table_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, INDIRECT_AREA + 0x100, DESC_SIZE, IND, table=INDIRECT_AREA)
    ring.set_desc(0, DATA, 8, W, table=INDIRECT_AREA + 0x100)
    ring.set_desc(0, INDIRECT_AREA, DESC_SIZE, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.NESTED_INDIRECT


def test_indirect_table_that_points_at_itself_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, INDIRECT_AREA, DESC_SIZE, IND, table=INDIRECT_AREA)
    ring.set_desc(0, INDIRECT_AREA, DESC_SIZE, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.NESTED_INDIRECT


def test_indirect_descriptor_after_a_direct_one_is_accepted() -> None:
    """virtio 1.x 2.7.5.3.2: the device MUST handle direct descriptors followed
    by one INDIRECT descriptor (Linux never builds such a chain)."""
    ring = raw_ring(8)
    ring.set_desc(0, DATA, 8, 0, table=INDIRECT_AREA)
    ring.set_desc(0, DATA, 8, N, nxt=1)
    ring.set_desc(1, INDIRECT_AREA, DESC_SIZE, IND)
    ring.make_available(0)
    chain = ring.device(indirect=True).pop()
    assert chain is not None and chain.indirect
    assert [(d.addr, d.length) for d in chain.descriptors] == [(DATA, 8), (DATA, 8)]


def test_indirect_descriptor_with_next_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, DATA, 8, W, table=INDIRECT_AREA)
    ring.set_desc(0, INDIRECT_AREA, DESC_SIZE, IND | N, nxt=1)
    ring.set_desc(1, DATA, 8, W)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.INDIRECT_WITH_NEXT


def test_indirect_descriptor_without_indirect_desc_negotiated_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, DATA, 8, W, table=INDIRECT_AREA)
    ring.set_desc(0, INDIRECT_AREA, DESC_SIZE, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=False).kind is QueueErrorKind.INDIRECT_NOT_NEGOTIATED


@pytest.mark.parametrize(
    "length", [0, 1, 8, DESC_SIZE + 1, 3 * DESC_SIZE - 1, DESC_SIZE * (MAX_INDIRECT_ENTRIES + 1)]
)
def test_indirect_table_length_zero_or_not_a_multiple_of_16_is_refused(length: int) -> None:
    ring = raw_ring(8)
    ring.set_desc(0, INDIRECT_AREA, length, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.INDIRECT_BAD_LENGTH


@pytest.mark.parametrize(("next_avail", "ahead"), [(0, 9), (0, 0xFFFF), (0xFFFE, 9), (7, 100)])
def test_avail_idx_more_than_queue_size_ahead_is_refused(next_avail: int, ahead: int) -> None:
    ring = raw_ring(8)
    ring.set_avail_idx(next_avail + ahead)
    assert pop_error(ring, next_avail=next_avail).kind is QueueErrorKind.AVAIL_AHEAD


def test_avail_idx_behind_next_avail_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_avail_idx(4)  # the device already consumed 5: the guest went backwards
    assert pop_error(ring, next_avail=5).kind is QueueErrorKind.AVAIL_AHEAD


@pytest.mark.parametrize(
    "layout",
    [
        RingLayout(8, desc=GUEST_SIZE, avail=0x200, used=0x300),
        RingLayout(8, desc=0, avail=GUEST_SIZE - 20, used=0x300),
        RingLayout(8, desc=0, avail=0x200, used=GUEST_SIZE - 8),
        RingLayout(8, desc=GUEST_SIZE - 0x40, avail=0x200, used=0x300),
        RingLayout(8, desc=(1 << 64) - 0x80, avail=0x200, used=0x300),
    ],
)
def test_ring_outside_guest_memory_is_refused(layout: RingLayout) -> None:
    memory, _ = make_memory()
    with pytest.raises(QueueError) as info:
        DeviceQueue(memory, layout)
    assert info.value.kind is QueueErrorKind.ADDRESS
    with pytest.raises(QueueError) as info:
        DriverQueue(memory, layout)
    assert info.value.kind is QueueErrorKind.ADDRESS


def test_ring_addresses_are_translated_in_the_space_they_were_given_in() -> None:
    memory, buf = make_memory()
    uva_layout = RingLayout.packed_at(UVA_BASE, 8)
    device = DeviceQueue(memory, uva_layout, ring_space=Space.UVA)
    assert device.pop() is None
    with pytest.raises(QueueError) as info:
        DeviceQueue(memory, uva_layout)  # front-end addresses are not GPAs
    assert info.value.kind is QueueErrorKind.ADDRESS
    # and the same bytes are parsed through either space
    ring = RawRing(memory, buf, RingLayout.packed_at(0, 8))
    ring.set_desc(1, DATA, 8, W)
    ring.make_available(1)
    chain = device.pop()
    assert chain is not None
    assert chain.head == 1


def test_ring_straddling_two_regions_is_refused() -> None:
    table = RegionTable([Region(0, 0x100, 0x10000, 0), Region(0x100, 0x1000, 0x10100, 0x100)])
    memory = GuestMemory(table, [bytearray(0x100), bytearray(0x1000)])
    with pytest.raises(QueueError) as info:
        DeviceQueue(memory, RingLayout.packed_at(0xC0, 8))
    assert info.value.kind is QueueErrorKind.ADDRESS


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (GUEST_SIZE, DESC_SIZE),  # just past the end
        (GUEST_SIZE - DESC_SIZE, 2 * DESC_SIZE),  # crosses the end
        (0x4000_0000, DESC_SIZE),  # far away
    ],
)
def test_indirect_table_outside_guest_memory_is_refused(addr: int, length: int) -> None:
    ring = raw_ring(8)
    ring.set_desc(0, addr, length, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.ADDRESS


def test_descriptor_whose_end_overflows_64_bits_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, TOP - 15, 17, W)
    ring.make_available(0)
    assert pop_error(ring).kind is QueueErrorKind.OVERFLOW


def test_descriptor_overflowing_64_bits_inside_an_indirect_table_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, TOP, 0xFFFF_FFFF, W, table=INDIRECT_AREA)
    ring.set_desc(0, INDIRECT_AREA, DESC_SIZE, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.OVERFLOW


def test_indirect_table_whose_end_overflows_64_bits_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, TOP - 15, 2 * DESC_SIZE, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.OVERFLOW


def test_readable_descriptor_after_a_writable_one_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_chain(0, [(DATA, 8, W), (DATA + 8, 8, 0)])
    ring.make_available(0)
    assert pop_error(ring).kind is QueueErrorKind.READ_AFTER_WRITE


def test_readable_after_writable_inside_an_indirect_table_is_refused() -> None:
    ring = raw_ring(8)
    ring.set_chain(0, [(DATA, 8, 0), (DATA, 8, W), (DATA, 8, 0)], table=INDIRECT_AREA)
    ring.set_desc(0, INDIRECT_AREA, 3 * DESC_SIZE, IND)
    ring.make_available(0)
    assert pop_error(ring, indirect=True).kind is QueueErrorKind.READ_AFTER_WRITE


@pytest.mark.parametrize("size", [0, 3, 6, 100, 2 * MAX_QUEUE_SIZE, -8])
def test_queue_size_not_a_power_of_two_up_to_32768_is_refused(size: int) -> None:
    memory, _ = make_memory()
    layout = RingLayout(size, desc=0, avail=0x1000, used=0x2000)
    for queue in (DeviceQueue, DriverQueue):
        with pytest.raises(QueueError) as info:
            queue(memory, layout)
        assert info.value.kind is QueueErrorKind.BAD_LAYOUT


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [(8, 0x1000, 0x2000), (0, 0x1001, 0x2000), (0, 0x1000, 0x2002), (0x10, 0x1000, 0x2001)],
)
def test_misaligned_ring_parts_are_refused(desc: int, avail: int, used: int) -> None:
    memory, _ = make_memory()
    with pytest.raises(QueueError) as info:
        DeviceQueue(memory, RingLayout(8, desc, avail, used))
    assert info.value.kind is QueueErrorKind.BAD_LAYOUT


def test_minimal_alignments_are_accepted() -> None:
    memory, _ = make_memory()
    DeviceQueue(memory, RingLayout(8, desc=0x10, avail=0x1002, used=0x2004))
    big, _ = make_memory(1 << 20)
    assert DeviceQueue(big, RingLayout.packed_at(0, MAX_QUEUE_SIZE)).size == MAX_QUEUE_SIZE


def test_used_entry_the_driver_never_added_is_refused() -> None:
    memory, _ = make_memory()
    layout = RingLayout.packed_at(0, 8)
    driver = DriverQueue(memory, layout)
    device = DeviceQueue(memory, layout)
    driver.add([Buffer(DATA, 8, True)])
    assert device.pop() is not None
    device.push(5, 0)  # head 5 was never made available
    with pytest.raises(QueueError) as info:
        driver.get_used()
    assert info.value.kind is QueueErrorKind.USED_OVERRUN


def test_more_used_entries_than_in_flight_are_refused() -> None:
    memory, _ = make_memory()
    layout = RingLayout.packed_at(0, 8)
    driver = DriverQueue(memory, layout)
    device = DeviceQueue(memory, layout)
    head = driver.add([Buffer(DATA, 8, True)])
    device.push(head, 0)
    device.push(head, 0)
    with pytest.raises(QueueError) as info:
        driver.get_used()
    assert info.value.kind is QueueErrorKind.USED_OVERRUN


# --- a broken queue stays broken, and every kind is covered ------------------------


def test_pop_after_an_error_raises_again_without_advancing() -> None:
    ring = raw_ring(8)
    ring.set_desc(0, DATA, 8, N, nxt=0)
    ring.make_available(0)
    device = ring.device()
    for _ in range(2):
        with pytest.raises(QueueError):
            device.pop()
        assert device.next_avail == 0


EXAMPLES: dict[QueueErrorKind, Callable[[], None]] = {
    QueueErrorKind.HEAD_OUT_OF_RANGE: test_head_index_at_queue_size_is_refused,
    QueueErrorKind.NEXT_OUT_OF_RANGE: test_next_index_at_queue_size_is_refused,
    QueueErrorKind.LOOP: test_chain_longer_than_the_queue_is_refused,
    QueueErrorKind.NESTED_INDIRECT: test_indirect_descriptor_inside_an_indirect_table_is_refused,
    QueueErrorKind.INDIRECT_WITH_NEXT: test_indirect_descriptor_with_next_is_refused,
    QueueErrorKind.INDIRECT_NOT_NEGOTIATED: (
        test_indirect_descriptor_without_indirect_desc_negotiated_is_refused
    ),
    QueueErrorKind.INDIRECT_BAD_LENGTH: lambda: (
        test_indirect_table_length_zero_or_not_a_multiple_of_16_is_refused(0)
    ),
    QueueErrorKind.AVAIL_AHEAD: lambda: test_avail_idx_more_than_queue_size_ahead_is_refused(0, 9),
    QueueErrorKind.ADDRESS: lambda: test_indirect_table_outside_guest_memory_is_refused(
        GUEST_SIZE, DESC_SIZE
    ),
    QueueErrorKind.OVERFLOW: test_descriptor_whose_end_overflows_64_bits_is_refused,
    QueueErrorKind.READ_AFTER_WRITE: test_readable_descriptor_after_a_writable_one_is_refused,
    QueueErrorKind.BAD_LAYOUT: lambda: test_queue_size_not_a_power_of_two_up_to_32768_is_refused(3),
    QueueErrorKind.USED_OVERRUN: test_used_entry_the_driver_never_added_is_refused,
}


@pytest.mark.parametrize("kind", list(QueueErrorKind), ids=lambda k: k.name)
def test_every_queue_error_kind_has_an_example(kind: QueueErrorKind) -> None:
    assert kind in EXAMPLES, f"no malformed-ring example raises {kind.name}"
    EXAMPLES[kind]()
