"""Properties of the split-ring parser and of the driver/device round trip.

The device side is checked against a small reference model written from the
virtio 1.x rules (not from the implementation): whatever bytes a guest puts
in the descriptor table, the avail ring and indirect tables, DeviceQueue.pop()
returns exactly the chain the model accepts, or raises QueueError exactly
when the model refuses, and never anything else, and never hangs.
"""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.ringkit import (
    GUEST_SIZE,
    INDIRECT_AREA,
    RawRing,
    make_memory,
    start_driver_at,
    time_limit,
    u16_at,
)
from vhost_balloon.protocol.errors import QueueError
from vhost_balloon.protocol.memory import GuestMemory, load
from vhost_balloon.protocol.virtqueue import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    USED_ELEM,
    Buffer,
    Chain,
    Descriptor,
    DeviceQueue,
    DriverQueue,
    RingLayout,
)

W, N, IND = DESC_F_WRITE, DESC_F_NEXT, DESC_F_INDIRECT
U64_LIMIT = 1 << 64
TABLE_STRIDE = 0x400  # room for 64 descriptors per indirect table
TABLES = [INDIRECT_AREA + k * TABLE_STRIDE for k in range(4)]
TABLE_ENTRIES = TABLE_STRIDE // DESC_SIZE

# --- reference model ------------------------------------------------------------

REFUSED = "refused"
ModelChain = tuple[int, list[tuple[int, int, int]], bool]


def model_pop(
    buf: bytearray, layout: RingLayout, next_avail: int, indirect_ok: bool
) -> ModelChain | str | None:
    """The chain at `next_avail` as the virtio spec defines it, None, or REFUSED.

    Guest memory is one region at guest-physical 0 spanning `buf`.
    """
    size = layout.size
    pending = (u16_at(buf, layout.avail + 2) - next_avail) & 0xFFFF
    if pending > size:
        return REFUSED
    if pending == 0:
        return None
    head = u16_at(buf, layout.avail + 4 + 2 * (next_avail % size))
    if head >= size:
        return REFUSED
    table, entries, index, indirect = layout.desc, size, head, False
    addr, length, flags, _ = DESC.unpack_from(buf, layout.desc + DESC_SIZE * head)
    if flags & IND:
        if not indirect_ok or flags & N:
            return REFUSED
        if length == 0 or length % DESC_SIZE or length > DESC_SIZE * size:
            return REFUSED
        if addr + length > len(buf):
            return REFUSED
        table, entries, index, indirect = addr, length // DESC_SIZE, 0, True
    visited: set[int] = set()
    out: list[tuple[int, int, int]] = []
    writable_seen = False
    while True:
        if index in visited:
            return REFUSED  # a loop: the chain would never end
        visited.add(index)
        addr, length, flags, nxt = DESC.unpack_from(buf, table + DESC_SIZE * index)
        if flags & IND:
            if indirect or not indirect_ok or flags & N:
                return REFUSED  # nested, not negotiated, or with NEXT
            if length == 0 or length % DESC_SIZE or length > DESC_SIZE * size:
                return REFUSED
            if addr + length > len(buf):
                return REFUSED
            # direct descriptors followed by one indirect table (virtio 2.7.5.3.2)
            table, entries, index, indirect = addr, length // DESC_SIZE, 0, True
            visited = set()
            continue
        if addr + length > U64_LIMIT:
            return REFUSED
        if flags & W:
            writable_seen = True
        elif writable_seen:
            return REFUSED
        out.append((addr, length, flags))
        if not flags & N:
            return head, out, indirect
        if nxt >= entries:
            return REFUSED
        index = nxt


def as_model(chain: Chain) -> ModelChain:
    return chain.head, [(d.addr, d.length, d.flags) for d in chain.descriptors], chain.indirect


def pop_or_error(device: DeviceQueue) -> ModelChain | str | None:
    try:
        chain = device.pop()
    except QueueError:
        return REFUSED
    return None if chain is None else as_model(chain)


def assert_legal(chain: Chain, size: int) -> None:
    assert 0 <= chain.head < size
    assert chain.descriptors
    limit = 2 * size if chain.indirect else size  # direct part + one table
    assert len(chain.descriptors) <= limit
    writable_seen = False
    for pos, desc in enumerate(chain.descriptors):
        assert not desc.flags & IND
        assert desc.addr >= 0 and desc.addr + desc.length <= U64_LIMIT
        assert bool(desc.flags & N) is (pos < len(chain.descriptors) - 1)
        assert not (writable_seen and not desc.writable)
        writable_seen |= desc.writable


# --- hostile rings ------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)


def indices(count: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, count + 1), u16)


addresses = st.one_of(
    st.sampled_from(TABLES),
    st.integers(0, GUEST_SIZE + 0x100),
    st.integers(0, U64_LIMIT - 1),
    st.sampled_from([U64_LIMIT - 1, U64_LIMIT - DESC_SIZE, GUEST_SIZE - DESC_SIZE]),
)
lengths = st.one_of(
    st.integers(1, 8).map(lambda n: n * DESC_SIZE),
    st.integers(0, 0x40),
    st.integers(0, 0xFFFF_FFFF),
)
flag_values = st.one_of(
    st.sampled_from([0, N, W, N | W, IND, IND | N, IND | W]),
    u16,
)


def descriptors(count: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    return st.tuples(addresses, lengths, flag_values, indices(count))


Desc = tuple[int, int, int, int]


@st.composite
def descriptor_tables(
    draw: st.DrawFn, count: int, indirect_tables: list[tuple[int, int]]
) -> list[Desc]:
    """`count` descriptors, mostly well formed, some fields hostile.

    Well formed: linear NEXT chains, readable before writable, some entries
    pointing at one of `indirect_tables` ((address, entries) pairs).
    """
    first_writable = draw(st.integers(0, count))
    out: list[Desc] = []
    for index in range(count):
        desc: Desc
        if indirect_tables and draw(st.integers(0, 3)) == 0:
            table, entries = draw(st.sampled_from(indirect_tables))
            if draw(st.integers(0, 7)) == 0:  # a table (partly) outside guest memory
                end = draw(st.sampled_from([GUEST_SIZE + DESC_SIZE, 1 << 32, U64_LIMIT]))
                table = end - DESC_SIZE * draw(st.integers(1, entries))
            desc = (table, DESC_SIZE * entries, IND, 0)
        else:
            flags = (W if index >= first_writable else 0) | (N if draw(st.integers(0, 3)) else 0)
            addr, length = draw(st.integers(0, 1 << 40)), draw(st.integers(0, 1 << 16))
            desc = (addr, length, flags, (index + 1) % count)
        if draw(st.integers(0, 5)) == 0:  # break one field
            field = draw(st.integers(0, 4))
            if field == 4:  # make addr + len cross 2^64
                length = draw(st.integers(2, 0xFFFF_FFFF))
                desc = (U64_LIMIT - draw(st.integers(1, length - 1)), length, *desc[2:])
            else:
                bad = draw(descriptors(count))[field]
                desc = (*desc[:field], bad, *desc[field + 1 :])  # type: ignore[assignment]
        out.append(desc)
    return out


def mostly(draw: st.DrawFn, benign: st.SearchStrategy[int], hostile: st.SearchStrategy[int]) -> int:
    return draw(hostile) if draw(st.integers(0, 7)) == 0 else draw(benign)


@st.composite
def hostile_rings(draw: st.DrawFn) -> tuple[GuestMemory, bytearray, RingLayout, int, bool]:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    layout = RingLayout.packed_at(0, size)
    memory, buf = make_memory()
    ring = RawRing(memory, buf, layout)
    next_avail = draw(st.one_of(u16, st.sampled_from([0, 0xFFFE, 0xFFFF])))
    pending = mostly(draw, st.integers(0, size), u16)
    for slot in range(size):
        ring.set_avail_entry(slot, mostly(draw, st.integers(0, size - 1), indices(size)))
    ring.set_avail_idx(next_avail + pending)
    tables = [(table, draw(st.integers(1, 8))) for table in TABLES[: draw(st.integers(0, 4))]]
    for table, entries in tables:
        nested = tables if draw(st.integers(0, 7)) == 0 else []
        for index, desc in enumerate(draw(descriptor_tables(entries, nested))):
            ring.set_desc(index, *desc, table=table)
    for index, desc in enumerate(draw(descriptor_tables(size, tables))):
        ring.set_desc(index, *desc)
    return memory, buf, layout, next_avail, draw(st.integers(0, 3)) > 0


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_rings())
def test_pop_agrees_with_the_reference_model_on_hostile_rings(
    ring: tuple[GuestMemory, bytearray, RingLayout, int, bool],
) -> None:
    memory, buf, layout, next_avail, indirect_ok = ring
    device = DeviceQueue(memory, layout, indirect=indirect_ok, next_avail=next_avail)
    with time_limit(5):
        for _ in range(layout.size + 2):
            expected = model_pop(buf, layout, device.next_avail, indirect_ok)
            before = device.next_avail
            try:
                chain = device.pop()
            except QueueError as error:
                event(f"refused: {error.kind.name}")
                assert expected == REFUSED, f"model accepts, device refused: {error}"
                assert device.next_avail == before  # nothing consumed
                return
            if chain is None:
                assert expected is None
                return
            event("indirect chain" if chain.indirect else "direct chain")
            assert_legal(chain, layout.size)
            assert as_model(chain) == expected
            assert device.next_avail == (before + 1) & 0xFFFF


@settings(max_examples=300)
@given(
    st.sampled_from([1, 2, 4, 8, 16]),
    u16,
    st.booleans(),
    st.binary(min_size=0, max_size=0x300),
    st.binary(max_size=0x100),
)
def test_pop_over_arbitrary_ring_bytes_returns_legal_chains_or_queue_error(
    size: int, next_avail: int, indirect_ok: bool, ring_bytes: bytes, table_bytes: bytes
) -> None:
    """Raw bytes over desc table + avail ring (+ an indirect area), nothing structured."""
    memory, buf = make_memory()
    layout = RingLayout.packed_at(0, size)
    raw = ring_bytes[: layout.used]
    buf[: len(raw)] = raw
    buf[INDIRECT_AREA : INDIRECT_AREA + len(table_bytes)] = table_bytes
    device = DeviceQueue(memory, layout, indirect=indirect_ok, next_avail=next_avail)
    with time_limit(5):
        for _ in range(size + 2):
            try:
                chain = device.pop()
            except QueueError:
                return
            if chain is None:
                return
            assert_legal(chain, size)


BIG_QUEUE = 4096  # an indirect table may be as long as the queue, no longer
BIG_TABLE = 0x20000


def test_walking_an_indirect_table_as_long_as_the_queue_terminates() -> None:
    """4096 entries chained in a loop-free line: long, bounded, legal."""
    memory, buf = make_memory(BIG_TABLE + DESC_SIZE * BIG_QUEUE)
    layout = RingLayout.packed_at(0, BIG_QUEUE)
    assert layout.end <= BIG_TABLE
    ring = RawRing(memory, buf, layout)
    for index in range(BIG_QUEUE):
        last = index == BIG_QUEUE - 1
        ring.set_desc(index, 0, 1, W | (0 if last else N), index + 1, table=BIG_TABLE)
    ring.set_desc(0, BIG_TABLE, DESC_SIZE * BIG_QUEUE, IND)
    ring.make_available(0)
    with time_limit(5):
        chain = DeviceQueue(memory, layout, indirect=True).pop()
    assert chain is not None
    assert len(chain.descriptors) == BIG_QUEUE


def test_an_indirect_table_longer_than_the_queue_is_refused() -> None:
    memory, buf = make_memory(0x2000 + DESC_SIZE * 3)
    layout = RingLayout.packed_at(0, 2)
    ring = RawRing(memory, buf, layout)
    ring.set_desc(0, 0x2000, DESC_SIZE * 3, IND)
    ring.make_available(0)
    device = DeviceQueue(memory, layout, indirect=True)
    assert pop_or_error(device) == REFUSED


def test_looping_an_indirect_table_as_long_as_the_queue_is_refused_in_bounded_time() -> None:
    memory, buf = make_memory(BIG_TABLE + DESC_SIZE * BIG_QUEUE)
    layout = RingLayout.packed_at(0, BIG_QUEUE)
    ring = RawRing(memory, buf, layout)
    for index in range(BIG_QUEUE):
        ring.set_desc(index, 0, 1, N, (index + 1) % BIG_QUEUE, table=BIG_TABLE)
    ring.set_desc(0, BIG_TABLE, DESC_SIZE * BIG_QUEUE, IND)
    ring.make_available(0)
    device = DeviceQueue(memory, layout, indirect=True)
    with time_limit(5):
        assert pop_or_error(device) == REFUSED


# --- driver -> device round trip ---------------------------------------------------


@st.composite
def buffers(draw: st.DrawFn, max_len: int) -> list[Buffer]:
    """1..max_len buffers, device-readable ones first (as a driver must)."""
    total = draw(st.integers(1, max_len))
    readable = draw(st.integers(0, total))
    out = []
    for pos in range(total):
        length = draw(st.integers(0, 0xFFFF_FFFF))
        addr = draw(st.integers(0, U64_LIMIT - 1 - length))
        out.append(Buffer(addr, length, writable=pos >= readable))
    return out


def expected_descriptors(chain: list[Buffer]) -> tuple[Descriptor, ...]:
    return tuple(
        Descriptor(b.addr, b.length, (W if b.writable else 0) | (N if pos < len(chain) - 1 else 0))
        for pos, b in enumerate(chain)
    )


starts = st.one_of(st.just(0), st.integers(0xFFF0, 0xFFFF), u16)


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([1, 2, 4, 8, 16]),
    starts,
    st.booleans(),
    st.data(),
)
def test_chains_added_by_the_driver_pop_back_identically_and_come_back_used(
    size: int, start: int, event_idx: bool, data: st.DataObject
) -> None:
    memory, _ = make_memory()
    layout = RingLayout.packed_at(0, size)
    driver = DriverQueue(memory, layout, event_idx=event_idx)
    start_driver_at(driver, start)
    device = DeviceQueue(memory, layout, indirect=True, event_idx=event_idx, next_avail=start)
    free_tables = [INDIRECT_AREA + k * TABLE_STRIDE for k in range(size)]
    table_of: dict[int, int] = {}
    popped_not_used: list[Chain] = []
    total_popped = 0
    for _round in range(data.draw(st.integers(1, 6), label="rounds")):
        added: list[tuple[int, tuple[Descriptor, ...], bool]] = []
        for _ in range(data.draw(st.integers(0, size + 2), label="chains")):
            indirect = data.draw(st.booleans(), label="indirect")
            chain = data.draw(buffers(size), label="buffers")  # no chain longer than the queue
            if indirect:
                if not free_tables or driver.free_descriptors < 1:
                    continue  # the driver would wait for used buffers
                table = free_tables.pop()
                head = driver.add(chain, indirect_table=table)
                table_of[head] = table
            else:
                if driver.free_descriptors < len(chain):
                    continue
                head = driver.add(chain)
            added.append((head, expected_descriptors(chain), indirect))
        popped = list(iter(device.pop, None))
        assert [(c.head, c.descriptors, c.indirect) for c in popped] == added
        total_popped += len(popped)
        assert device.next_avail == driver.avail_idx == (start + total_popped) & 0xFFFF
        popped_not_used += popped
        # the device completes some of what it holds, in any order
        order = data.draw(st.permutations(range(len(popped_not_used))), label="order")
        done = order[: data.draw(st.integers(0, len(order)), label="complete")]
        pushed = []
        for k in done:
            length = data.draw(st.integers(0, 0xFFFF_FFFF), label="used len")
            device.push(popped_not_used[k].head, length)
            pushed.append((popped_not_used[k].head, length))
        popped_not_used = [c for k, c in enumerate(popped_not_used) if k not in set(done)]
        assert driver.get_used() == pushed
        for head, _ in pushed:
            if head in table_of:
                free_tables.append(table_of.pop(head))
        assert driver.in_flight == len(popped_not_used)


def test_indices_wrap_from_65535_to_0_on_both_rings() -> None:
    memory, buf = make_memory()
    layout = RingLayout.packed_at(0, 4)
    driver = DriverQueue(memory, layout)
    start_driver_at(driver, 0xFFFE)
    device = DeviceQueue(memory, layout, next_avail=0xFFFE)
    ring = RawRing(memory, buf, layout)
    heads = [driver.add([Buffer(0x1000 * k, 8, True)]) for k in range(4)]
    assert driver.avail_idx == 2
    assert u16_at(buf, layout.avail + 2) == 2
    chains = list(iter(device.pop, None))
    assert [c.head for c in chains] == heads
    assert [c.descriptors[0].addr for c in chains] == [0, 0x1000, 0x2000, 0x3000]
    assert device.next_avail == 2
    for chain in chains:
        device.push(chain.head, 0)
    assert ring.used_idx() == 2
    # slots 0xFFFE % 4 == 2, 3, then 0, 1
    assert [ring.used_elem(slot)[0] for slot in (2, 3, 0, 1)] == heads
    assert driver.get_used() == [(h, 0) for h in heads]
    assert driver.last_used == 2


def test_simulated_start_matches_a_driver_that_really_wrapped() -> None:
    """start_driver_at() leaves the state a real 65536+ round run leaves."""
    memory, buf = make_memory()
    layout = RingLayout.packed_at(0, 1)
    driver = DriverQueue(memory, layout)
    device = DeviceQueue(memory, layout)
    rounds = 0x10000 + 3
    for _ in range(rounds):
        driver.add([Buffer(0x1000, 8, True)])
        chain = device.pop()
        assert chain is not None
        device.push(chain.head, 0)
        assert len(driver.get_used()) == 1
        driver.kick_needed()
    assert (driver.avail_idx, driver.last_used, device.next_avail, device.next_used) == (3, 3, 3, 3)

    other_memory, other_buf = make_memory()
    simulated = DriverQueue(other_memory, layout)
    start_driver_at(simulated, rounds)
    assert (simulated.avail_idx, simulated.last_used) == (driver.avail_idx, driver.last_used)
    for offset in (layout.avail + 2, layout.used + 2):
        assert u16_at(other_buf, offset) == u16_at(buf, offset)
    assert driver.kick_needed() is simulated.kick_needed()


def test_descriptors_are_recycled_after_used() -> None:
    memory, _ = make_memory()
    layout = RingLayout.packed_at(0, 4)
    driver = DriverQueue(memory, layout)
    device = DeviceQueue(memory, layout)
    rng = random.Random(7)
    for _ in range(50):
        count = rng.randint(1, 4)
        head = driver.add([Buffer(rng.randrange(1 << 40), 8, True) for _ in range(count)])
        assert driver.free_descriptors == 4 - count
        chain = device.pop()
        assert chain is not None
        assert chain.head == head
        assert len(chain.descriptors) == count
        device.push(head, 0)
        driver.get_used()
        assert driver.free_descriptors == 4


def test_driver_refuses_a_chain_it_has_no_descriptors_for() -> None:
    memory, _ = make_memory()
    driver = DriverQueue(memory, RingLayout.packed_at(0, 2))
    try:
        driver.add([Buffer(0, 1, True)] * 3)
    except ValueError as error:
        assert "3 descriptors needed" in str(error)
    else:
        raise AssertionError("a 3-buffer chain fitted in a 2-entry queue")
    head = driver.add([Buffer(0, 1, True)] * 3, indirect_table=INDIRECT_AREA)
    entry = load(struct.Struct("<QIHH"), memory.buffers[0], DESC_SIZE * head)
    assert entry == (INDIRECT_AREA, 3 * DESC_SIZE, IND, 0)


@settings(max_examples=150)
@given(
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 8),
    u16,
    st.lists(st.tuples(st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF)), max_size=8),
)
def test_driver_get_used_over_a_hostile_used_ring_returns_only_in_flight_heads(
    size: int, chains: int, used_idx: int, elems: list[tuple[int, int]]
) -> None:
    """The mocked guest parses the used ring too: a bad device gets a QueueError."""
    memory, buf = make_memory()
    layout = RingLayout.packed_at(0, size)
    driver = DriverQueue(memory, layout)
    in_flight = {driver.add([Buffer(0x1000, 8, True)]) for _ in range(min(chains, size))}
    ring = RawRing(memory, buf, layout)
    for slot, (head, length) in enumerate(elems[:size]):
        USED_ELEM.pack_into(buf, layout.used + 4 + USED_ELEM.size * slot, head, length)
    ring.set_used_idx(used_idx)
    try:
        used = driver.get_used()
    except QueueError:
        return
    heads = [head for head, _ in used]
    assert len(heads) == len(set(heads)) == used_idx
    assert set(heads) <= in_flight
    assert driver.in_flight == len(in_flight) - len(heads)
