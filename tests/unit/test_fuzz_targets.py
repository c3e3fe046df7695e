"""hypothesis drives the fuzz entry points (fuzz_targets.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fuzz_targets import (
    RING_MEMORY,
    RING_PARAMS,
    fuzz_header,
    fuzz_request,
    fuzz_ring,
    main,
)
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable
from vhost_balloon.protocol.vhost_user import (
    FLAG_NEED_REPLY,
    HEADER,
    REQUEST_SPECS,
    VERSION,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    VringFile,
    encode_reply,
    encode_request,
)
from vhost_balloon.protocol.virtqueue import Buffer, DriverQueue, RingLayout

requests = st.sampled_from(list(FrontendRequest))


@settings(max_examples=300)
@given(st.binary(max_size=40))
def test_fuzz_header_survives_arbitrary_bytes(data: bytes) -> None:
    fuzz_header(data)


@given(requests, st.binary(max_size=64))
def test_fuzz_header_accepts_well_formed_headers_and_replies(
    request_: FrontendRequest, body: bytes
) -> None:
    header = fuzz_header(encode_reply(request_, body))
    assert header is not None
    assert header.request == request_


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_fuzz_request_survives_arbitrary_bytes(data: bytes) -> None:
    fuzz_request(data)


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """fd count + header + payload with sizes near what each request accepts."""
    request_ = draw(requests)
    low, high = REQUEST_SPECS[request_].sizes
    size = draw(st.integers(max(0, low - 1), min(high + 1, 300)))
    flags = draw(st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY]))
    payload = draw(st.binary(min_size=size, max_size=size))
    nfds = draw(st.integers(0, 9))
    return bytes([nfds]) + HEADER.pack(request_, flags, size) + payload


@settings(max_examples=300)
@given(plausible_frames())
def test_fuzz_request_survives_plausible_frames(data: bytes) -> None:
    fuzz_request(data)


@pytest.mark.parametrize(
    ("request_", "payload", "nfds"),
    [
        (FrontendRequest.GET_FEATURES, None, 0),
        (FrontendRequest.SET_VRING_KICK, VringFile(2, no_fd=False), 1),
        (FrontendRequest.SET_VRING_CALL, VringFile(1, no_fd=True), 0),
        (
            FrontendRequest.SET_MEM_TABLE,
            MemoryTable((MemoryRegionDesc(0, 1 << 30, 1 << 40, 0),) * 2),
            2,
        ),
    ],
)
def test_fuzz_request_returns_the_request_for_valid_frames(
    request_: FrontendRequest, payload: VringFile | MemoryTable | None, nfds: int
) -> None:
    decoded = fuzz_request(bytes([nfds]) + encode_request(request_, payload))
    assert decoded is not None
    assert decoded.request is request_


@settings(max_examples=200)
@given(st.binary(max_size=RING_PARAMS + 0x300))
def test_fuzz_ring_survives_arbitrary_bytes(data: bytes) -> None:
    fuzz_ring(data)


def legal_ring_image(size_code: int, chain_lengths: list[int], indirect: list[bool]) -> bytes:
    """Bytes fuzz_ring parses into exactly the chains a driver added."""
    ram = bytearray(RING_MEMORY)
    memory = GuestMemory(RegionTable([Region(0, RING_MEMORY, 1 << 40, 0)]), [ram])
    size = 1 << size_code
    driver = DriverQueue(memory, RingLayout.packed_at(0, size))
    table = RING_MEMORY // 2
    for length, use_table in zip(chain_lengths, indirect, strict=False):
        buffers = [Buffer(0x100000 * k, 4096, k > 0) for k in range(length)]
        if driver.free_descriptors < (1 if use_table else length):
            continue
        if use_table:
            driver.add(buffers, indirect_table=table)
            table += 16 * length
        else:
            driver.add(buffers)
    params = bytes([size_code, 1, 0, 0])  # INDIRECT_DESC on, next_avail 0
    return params + bytes(ram)


@settings(max_examples=100)
@given(
    st.integers(0, 4),
    st.lists(st.integers(1, 4), min_size=1, max_size=16),
    st.lists(st.booleans(), min_size=16, max_size=16),
)
def test_fuzz_ring_pops_every_chain_of_a_legal_ring(
    size_code: int, chain_lengths: list[int], indirect: list[bool]
) -> None:
    size = 1 << size_code
    chain_lengths = [min(n, size) for n in chain_lengths[:size]]
    image = legal_ring_image(size_code, chain_lengths, indirect)
    avail_idx = int.from_bytes(image[RING_PARAMS + 16 * size + 2 :][:2], "little")
    chains = fuzz_ring(image)
    assert len(chains) == avail_idx > 0


@settings(max_examples=200)
@given(
    st.integers(0, 4),
    st.lists(st.integers(1, 4), min_size=1, max_size=16),
    st.lists(st.booleans(), min_size=16, max_size=16),
    st.lists(st.tuples(st.integers(0, 0x400), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_fuzz_ring_survives_corrupted_legal_rings(
    size_code: int,
    chain_lengths: list[int],
    indirect: list[bool],
    corruption: list[tuple[int, int]],
) -> None:
    image = bytearray(legal_ring_image(size_code, chain_lengths[: 1 << size_code], indirect))
    for offset, value in corruption:
        image[RING_PARAMS + offset] = value
    fuzz_ring(bytes(image))


def test_fuzz_main_runs_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fuzz_targets.py", "50", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("header", "request", "ring"):
        assert f"fuzz_{name}: 50 random inputs, seed 1: ok" in out
