"""vhost-user header, request and reply codec (protocol/vhost_user.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vhost_balloon.protocol.errors import MessageError
from vhost_balloon.protocol.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    REQUEST_SPECS,
    U64,
    VERSION,
    VERSION_MASK,
    BackendRequest,
    ConfigPayload,
    DeviceStatePayload,
    Empty,
    FdRule,
    FrontendRequest,
    Header,
    LogPayload,
    MemoryRegionDesc,
    MemoryTable,
    Payload,
    ProtocolFeature,
    RawPayload,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
    check_reply,
    decode_header,
    decode_reply,
    decode_request,
    encode_backend_request,
    encode_frame,
    encode_reply,
    encode_request,
    expected_fd_count,
    protocol_feature_mask,
)

ALL_REQUESTS = list(FrontendRequest)
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)


def header_for(request: int, payload: bytes, flags: int = VERSION) -> Header:
    return decode_header(HEADER.pack(request, flags, len(payload)))


def valid_payload(request: FrontendRequest) -> bytes:
    """The smallest payload each request accepts (zeros where that is legal)."""
    if request is FrontendRequest.SET_MEM_TABLE:
        return MemoryTable((MemoryRegionDesc(0, 0x1000, 0x7F00_0000_0000, 0),)).encode()
    low, _ = REQUEST_SPECS[request].sizes
    return bytes(low)


def fds_for(request: FrontendRequest, payload: bytes) -> int:
    decoded = REQUEST_SPECS[request].decode(payload)
    return expected_fd_count(request, decoded)


def decode_ok(request: FrontendRequest, payload: bytes, *, flags: int = VERSION) -> Request:
    return decode_request(header_for(request, payload, flags), payload, fds_for(request, payload))


# --- header ------------------------------------------------------------------


def test_header_round_trips_request_flags_and_size() -> None:
    header = decode_header(HEADER.pack(FrontendRequest.SET_FEATURES, VERSION | FLAG_NEED_REPLY, 8))
    assert header == Header(FrontendRequest.SET_FEATURES, VERSION | FLAG_NEED_REPLY, 8)
    assert header.need_reply
    assert not header.is_reply


def test_header_is_native_endian() -> None:
    raw = struct.pack("=III", 5, 1, 40)
    assert decode_header(raw) == Header(5, 1, 40)


@pytest.mark.parametrize("length", [0, 1, 11, 13, 24])
def test_header_of_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(MessageError, match="truncated header"):
        decode_header(bytes(length))


@pytest.mark.parametrize("version", [0, 2, 3])
def test_header_with_bad_version_is_refused(version: int) -> None:
    with pytest.raises(MessageError, match="version") as info:
        decode_header(HEADER.pack(FrontendRequest.GET_FEATURES, version, 0))
    assert info.value.request == FrontendRequest.GET_FEATURES


@pytest.mark.parametrize("flag", [0x10, 0x20, 0x100, 0x8000_0000])
def test_header_with_unknown_flag_bits_is_refused(flag: int) -> None:
    with pytest.raises(MessageError, match="unknown flag"):
        decode_header(HEADER.pack(FrontendRequest.GET_FEATURES, VERSION | flag, 0))


def test_header_size_up_to_max_payload_is_accepted() -> None:
    assert decode_header(HEADER.pack(1, VERSION, MAX_PAYLOAD_SIZE)).size == MAX_PAYLOAD_SIZE


@pytest.mark.parametrize("size", [MAX_PAYLOAD_SIZE + 1, 0xFFFF_FFFF])
def test_header_size_above_max_payload_is_refused(size: int) -> None:
    with pytest.raises(MessageError, match="exceeds"):
        decode_header(HEADER.pack(FrontendRequest.SET_MEM_TABLE, VERSION, size))


@given(st.binary(max_size=32))
@example(b"")
@example(HEADER.pack(1, VERSION, 0))
def test_decode_header_raises_only_message_error_on_any_bytes(data: bytes) -> None:
    try:
        header = decode_header(data)
    except MessageError:
        return
    assert len(data) == HEADER_SIZE
    assert header.flags & VERSION_MASK == VERSION
    assert header.flags & ~KNOWN_FLAGS == 0
    assert header.size <= MAX_PAYLOAD_SIZE
    assert HEADER.pack(header.request, header.flags, header.size) == data


@given(u32, u32, u32)
def test_decode_header_accepts_exactly_the_valid_headers(
    request: int, flags: int, size: int
) -> None:
    valid = (
        flags & VERSION_MASK == VERSION and not flags & ~KNOWN_FLAGS and size <= MAX_PAYLOAD_SIZE
    )
    try:
        header = decode_header(HEADER.pack(request, flags, size))
    except MessageError as error:
        assert not valid
        assert error.request == request
    else:
        assert valid
        assert header == Header(request, flags, size)


# --- request table -------------------------------------------------------------


def test_frontend_requests_are_numbered_1_to_43() -> None:
    assert [r.value for r in FrontendRequest] == list(range(1, 44))


def test_every_frontend_request_has_a_spec() -> None:
    assert set(REQUEST_SPECS) == set(FrontendRequest)


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.name)
def test_spec_sizes_fit_in_a_frame(request_: FrontendRequest) -> None:
    low, high = REQUEST_SPECS[request_].sizes
    assert 0 <= low <= high <= MAX_PAYLOAD_SIZE


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.name)
def test_smallest_valid_payload_decodes(request_: FrontendRequest) -> None:
    payload = valid_payload(request_)
    decoded = decode_ok(request_, payload)
    assert decoded.request is request_
    assert decoded.header.size == len(payload)


@pytest.mark.parametrize(
    "request_",
    [r for r in ALL_REQUESTS if REQUEST_SPECS[r].sizes[1] < MAX_PAYLOAD_SIZE],
    ids=lambda r: r.name,
)
def test_payload_one_byte_too_long_is_refused_naming_the_request(
    request_: FrontendRequest,
) -> None:
    _, high = REQUEST_SPECS[request_].sizes
    payload = bytes(high + 1)
    with pytest.raises(MessageError) as info:
        decode_request(header_for(request_, payload), payload, 0)
    assert info.value.request == request_
    assert request_.name in str(info.value)


@pytest.mark.parametrize(
    "request_",
    [r for r in ALL_REQUESTS if REQUEST_SPECS[r].sizes[0] > 0],
    ids=lambda r: r.name,
)
def test_payload_one_byte_too_short_is_refused_naming_the_request(
    request_: FrontendRequest,
) -> None:
    low, _ = REQUEST_SPECS[request_].sizes
    payload = bytes(low - 1)
    with pytest.raises(MessageError) as info:
        decode_request(header_for(request_, payload), payload, 0)
    assert info.value.request == request_
    assert request_.name in str(info.value)


@pytest.mark.parametrize(
    ("request_", "size"),
    [
        (FrontendRequest.SET_FEATURES, 4),
        (FrontendRequest.SET_VRING_ADDR, 32),
        (FrontendRequest.SET_VRING_NUM, 16),
        (FrontendRequest.GET_FEATURES, 8),
        (FrontendRequest.SET_VRING_CALL, 4),
        (FrontendRequest.ADD_MEM_REG, 32),
    ],
)
def test_wrong_size_of_common_requests_is_refused(request_: FrontendRequest, size: int) -> None:
    payload = bytes(size)
    with pytest.raises(MessageError, match=request_.name):
        decode_request(header_for(request_, payload), payload, 0)


def test_payload_shorter_than_declared_is_refused() -> None:
    header = header_for(FrontendRequest.SET_FEATURES, bytes(8))
    with pytest.raises(MessageError, match="declared 8"):
        decode_request(header, bytes(4), 0)


def test_unknown_request_is_refused() -> None:
    for number in (0, 44, 0xFFFF_FFFF):
        with pytest.raises(MessageError, match="unknown request") as info:
            decode_request(header_for(number, b""), b"", 0)
        assert info.value.request == number


def test_reply_where_request_expected_is_refused() -> None:
    header = header_for(FrontendRequest.GET_FEATURES, b"", VERSION | FLAG_REPLY)
    with pytest.raises(MessageError, match="reply"):
        decode_request(header, b"", 0)


# --- file descriptors ----------------------------------------------------------

FD_CARRIERS = {
    FrontendRequest.SET_LOG_BASE,
    FrontendRequest.SET_LOG_FD,
    FrontendRequest.SET_BACKEND_REQ_FD,
    FrontendRequest.SET_INFLIGHT_FD,
    FrontendRequest.GPU_SET_SOCKET,
    FrontendRequest.ADD_MEM_REG,
    FrontendRequest.SET_DEVICE_STATE_FD,
}
# QEMU's send_remove_regions sends REM_MEM_REG without an fd; others send one.
OPTIONAL_FD_CARRIERS = {FrontendRequest.REM_MEM_REG}
VRING_FD_CARRIERS = {
    FrontendRequest.SET_VRING_KICK,
    FrontendRequest.SET_VRING_CALL,
    FrontendRequest.SET_VRING_ERR,
}


def test_fd_rules_match_what_the_front_end_sends() -> None:
    for request_ in ALL_REQUESTS:
        rule = REQUEST_SPECS[request_].fds
        if request_ in FD_CARRIERS:
            assert rule is FdRule.ONE, request_
        elif request_ in OPTIONAL_FD_CARRIERS:
            assert rule is FdRule.ONE_OR_NONE, request_
        elif request_ in VRING_FD_CARRIERS:
            assert rule is FdRule.VRING, request_
        elif request_ is FrontendRequest.SET_MEM_TABLE:
            assert rule is FdRule.PER_REGION
        else:
            assert rule is FdRule.NONE, request_


WRONG_FD_COUNTS = [
    pytest.param(request_, wrong, id=f"{request_.name}-{wrong}")
    for request_ in ALL_REQUESTS
    for wrong in {0, 1, 2, MAX_FDS_PER_MESSAGE}
    - {fds_for(request_, valid_payload(request_))}
    - ({0} if request_ in OPTIONAL_FD_CARRIERS else set())
]


def test_rem_mem_reg_may_come_with_or_without_its_fd() -> None:
    payload = valid_payload(FrontendRequest.REM_MEM_REG)
    header = header_for(FrontendRequest.REM_MEM_REG, payload)
    for nfds in (0, 1):
        assert decode_request(header, payload, nfds).request is FrontendRequest.REM_MEM_REG


@pytest.mark.parametrize(("request_", "nfds"), WRONG_FD_COUNTS)
def test_wrong_fd_count_is_refused(request_: FrontendRequest, nfds: int) -> None:
    payload = valid_payload(request_)
    with pytest.raises(MessageError, match="fd") as info:
        decode_request(header_for(request_, payload), payload, nfds)
    assert info.value.request == request_


@pytest.mark.parametrize("request_", sorted(VRING_FD_CARRIERS), ids=lambda r: r.name)
def test_vring_fd_requests_carry_no_fd_when_the_no_fd_bit_is_set(
    request_: FrontendRequest,
) -> None:
    with_fd = VringFile(3, no_fd=False).encode()
    without_fd = VringFile(3, no_fd=True).encode()
    assert decode_request(header_for(request_, with_fd), with_fd, 1).payload == VringFile(3, False)
    assert decode_request(header_for(request_, without_fd), without_fd, 0).payload == VringFile(
        3, True
    )
    with pytest.raises(MessageError):
        decode_request(header_for(request_, without_fd), without_fd, 1)
    with pytest.raises(MessageError):
        decode_request(header_for(request_, with_fd), with_fd, 0)


@pytest.mark.parametrize("nregions", range(1, MAX_MEM_REGIONS + 1))
def test_mem_table_needs_one_fd_per_region(nregions: int) -> None:
    table = MemoryTable(
        tuple(
            MemoryRegionDesc(i << 32, 0x1000, 0x7F00_0000_0000 + (i << 32), 0)
            for i in range(nregions)
        )
    )
    payload = table.encode()
    header = header_for(FrontendRequest.SET_MEM_TABLE, payload)
    assert decode_request(header, payload, nregions).payload == table
    for nfds in (nregions - 1, nregions + 1):
        with pytest.raises(MessageError, match="SET_MEM_TABLE"):
            decode_request(header, payload, nfds)


# --- replies -------------------------------------------------------------------

ALWAYS_REPLY = {
    FrontendRequest.GET_FEATURES,
    FrontendRequest.GET_VRING_BASE,
    FrontendRequest.GET_PROTOCOL_FEATURES,
    FrontendRequest.GET_QUEUE_NUM,
    FrontendRequest.GET_CONFIG,
    FrontendRequest.CREATE_CRYPTO_SESSION,
    FrontendRequest.POSTCOPY_ADVISE,
    FrontendRequest.POSTCOPY_END,
    FrontendRequest.GET_INFLIGHT_FD,
    FrontendRequest.GET_MAX_MEM_SLOTS,
    FrontendRequest.GET_STATUS,
    FrontendRequest.GET_SHARED_OBJECT,
    FrontendRequest.SET_DEVICE_STATE_FD,
    FrontendRequest.CHECK_DEVICE_STATE,
}


def test_get_requests_and_device_state_requests_always_reply() -> None:
    assert {r for r in ALL_REQUESTS if REQUEST_SPECS[r].always_replies} == ALWAYS_REPLY


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: r.name)
def test_expects_reply_follows_need_reply_for_set_requests(request_: FrontendRequest) -> None:
    payload = valid_payload(request_)
    plain = decode_ok(request_, payload)
    flagged = decode_ok(request_, payload, flags=VERSION | FLAG_NEED_REPLY)
    assert flagged.expects_reply
    assert plain.expects_reply is (request_ in ALWAYS_REPLY)


def test_encode_request_sets_need_reply_only_when_asked() -> None:
    plain = decode_header(encode_request(FrontendRequest.SET_OWNER)[:HEADER_SIZE])
    asked = decode_header(encode_request(FrontendRequest.SET_OWNER, need_reply=True)[:HEADER_SIZE])
    assert plain.flags == VERSION
    assert asked.flags == VERSION | FLAG_NEED_REPLY


def test_encode_reply_uses_flags_0x5() -> None:
    frame = encode_reply(FrontendRequest.GET_FEATURES, U64(1 << 32).encode())
    assert HEADER.unpack_from(frame) == (FrontendRequest.GET_FEATURES, 0x5, 8)


def test_decode_reply_accepts_a_well_formed_reply() -> None:
    body = U64(0).encode()
    header, payload = decode_reply(
        FrontendRequest.SET_MEM_TABLE, encode_reply(FrontendRequest.SET_MEM_TABLE, body)
    )
    assert header == Header(FrontendRequest.SET_MEM_TABLE, 0x5, 8)
    assert payload == body


@pytest.mark.parametrize(
    "flags", [0x1, 0x4, 0x5 | FLAG_NEED_REPLY, 0x1 | FLAG_NEED_REPLY, 0x6, 0x7, 0x5 | 0x10]
)
def test_decode_reply_refuses_flags_other_than_0x5(flags: int) -> None:
    frame = encode_frame(FrontendRequest.GET_FEATURES, bytes(8), flags=flags)
    with pytest.raises(MessageError):
        decode_reply(FrontendRequest.GET_FEATURES, frame)


def test_decode_reply_refuses_a_reply_to_another_request() -> None:
    frame = encode_reply(FrontendRequest.GET_PROTOCOL_FEATURES, bytes(8))
    with pytest.raises(MessageError, match="expected 1"):
        decode_reply(FrontendRequest.GET_FEATURES, frame)


@pytest.mark.parametrize("cut", [0, 5, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 7])
def test_decode_reply_refuses_truncated_frames(cut: int) -> None:
    frame = encode_reply(FrontendRequest.GET_FEATURES, bytes(8))
    with pytest.raises(MessageError):
        decode_reply(FrontendRequest.GET_FEATURES, frame[:cut])


def test_decode_reply_refuses_trailing_bytes() -> None:
    frame = encode_reply(FrontendRequest.GET_FEATURES, bytes(8)) + b"\0"
    with pytest.raises(MessageError, match="declares 8"):
        decode_reply(FrontendRequest.GET_FEATURES, frame)


@given(u32, st.binary(max_size=64))
def test_decode_reply_raises_only_message_error(expected: int, data: bytes) -> None:
    try:
        header, body = decode_reply(expected, data)
    except MessageError:
        return
    assert header.flags == VERSION | FLAG_REPLY
    assert header.request == expected
    assert len(body) == header.size == len(data) - HEADER_SIZE


@given(st.sampled_from(ALL_REQUESTS), st.binary(max_size=MAX_PAYLOAD_SIZE // 4))
def test_encode_reply_then_decode_reply_round_trips(request_: FrontendRequest, body: bytes) -> None:
    assert decode_reply(request_, encode_reply(request_, body)) == (
        Header(request_, VERSION | FLAG_REPLY, len(body)),
        body,
    )


def test_backend_request_frames_carry_version_and_need_reply() -> None:
    frame = encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
    assert HEADER.unpack(frame) == (2, VERSION | FLAG_NEED_REPLY, 0)


def test_protocol_feature_mask_sets_the_named_bits() -> None:
    mask = protocol_feature_mask(ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG)
    assert mask == 0x208


# --- decode_request over arbitrary input ----------------------------------------

request_numbers = st.one_of(st.integers(0, 45), u32)
flag_values = st.one_of(
    st.sampled_from([VERSION, VERSION | FLAG_NEED_REPLY, VERSION | FLAG_REPLY]), u32
)


@settings(max_examples=300)
@given(
    request_numbers,
    flag_values,
    st.binary(max_size=300),
    st.integers(0, MAX_FDS_PER_MESSAGE + 1),
    st.integers(-2, 2),
)
def test_decode_request_raises_only_message_error(
    request: int, flags: int, payload: bytes, nfds: int, size_skew: int
) -> None:
    """Whatever the frame, decoding either yields a typed request or a MessageError."""
    declared = max(0, len(payload) + size_skew)
    try:
        header = decode_header(HEADER.pack(request, flags, declared))
        decoded = decode_request(header, payload, nfds)
    except MessageError:
        return
    spec = REQUEST_SPECS[decoded.request]
    low, high = spec.sizes
    assert low <= len(payload) <= high
    assert len(payload) == header.size
    assert expected_fd_count(decoded.request, decoded.payload) == nfds
    assert not header.is_reply


@st.composite
def frames_for_known_requests(draw: st.DrawFn) -> tuple[FrontendRequest, bytes, int]:
    request_ = draw(st.sampled_from(ALL_REQUESTS))
    low, high = REQUEST_SPECS[request_].sizes
    size = draw(st.integers(max(0, low - 2), min(high + 2, 300)))
    payload = draw(st.binary(min_size=size, max_size=size))
    if request_ is FrontendRequest.SET_MEM_TABLE and size >= 8 and draw(st.booleans()):
        # make the region count plausible so the decoder gets past it
        payload = struct.pack("=II", draw(st.integers(0, 9)), 0) + payload[8:]
    is_config = request_ in (FrontendRequest.GET_CONFIG, FrontendRequest.SET_CONFIG)
    if is_config and size >= 12 and draw(st.booleans()):
        # make the config size field agree with the data that follows
        payload = payload[:4] + struct.pack("=I", size - 12) + payload[8:]
    nfds = draw(st.integers(0, MAX_MEM_REGIONS + 1))
    return request_, payload, nfds


@settings(max_examples=400)
@given(frames_for_known_requests())
def test_decode_request_near_accepted_sizes_raises_only_message_error(
    frame: tuple[FrontendRequest, bytes, int],
) -> None:
    request_, payload, nfds = frame
    try:
        decoded = decode_request(header_for(request_, payload), payload, nfds)
    except MessageError as error:
        assert error.request == request_
        return
    # What was accepted re-encodes to something that decodes to the same thing.
    again = decoded.payload.encode()
    redecoded = decode_request(header_for(request_, again), again, nfds)
    assert redecoded.payload == decoded.payload


# --- payload classes --------------------------------------------------------------

regions = st.builds(MemoryRegionDesc, u64, u64, u64, u64)
payloads: dict[type, st.SearchStrategy[Payload]] = {
    U64: st.builds(U64, u64),
    VringState: st.builds(VringState, u32, u32),
    VringAddr: st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    VringFile: st.builds(VringFile, u8, st.booleans()),
    MemoryTable: st.builds(
        MemoryTable, st.lists(regions, min_size=1, max_size=MAX_MEM_REGIONS).map(tuple)
    ),
    SingleMemoryRegion: st.builds(SingleMemoryRegion, regions),
    ConfigPayload: st.builds(
        lambda offset, flags, data: ConfigPayload(offset, len(data), flags, data),
        u32,
        u32,
        st.binary(max_size=ConfigPayload.MAX_DATA),
    ),
    LogPayload: st.builds(LogPayload, u64, u64),
    DeviceStatePayload: st.builds(DeviceStatePayload, u32, u32),
    Empty: st.just(Empty()),
    RawPayload: st.builds(RawPayload, st.binary(max_size=64)),
}


def test_every_payload_class_has_a_round_trip_strategy() -> None:
    assert set(payloads) == set(Payload.__args__)


@pytest.mark.parametrize("cls", list(payloads), ids=lambda c: c.__name__)
def test_payload_encode_then_decode_round_trips(cls: type) -> None:
    @settings(max_examples=60)
    @given(payloads[cls])
    def round_trip(payload: Payload) -> None:
        assert type(payload).decode(payload.encode()) == payload

    round_trip()


FIXED_FORMATS: list[type[U64 | VringState | VringAddr | LogPayload | DeviceStatePayload]] = [
    U64,
    VringState,
    VringAddr,
    LogPayload,
    DeviceStatePayload,
]


@pytest.mark.parametrize("cls", FIXED_FORMATS, ids=lambda c: c.__name__)
def test_fixed_format_payload_decode_then_encode_is_identity(cls: type[U64]) -> None:
    @settings(max_examples=60)
    @given(st.binary(min_size=cls.FORMAT.size, max_size=cls.FORMAT.size))
    def identity(data: bytes) -> None:
        assert cls.decode(data).encode() == data

    identity()


@given(st.binary(min_size=32, max_size=32))
def test_memory_region_desc_decode_then_encode_is_identity(data: bytes) -> None:
    assert MemoryRegionDesc.decode(data).encode() == data


def test_vring_addr_order_is_index_flags_desc_used_avail_log() -> None:
    raw = struct.pack("=IIQQQQ", 1, 2, 0x1000, 0x2000, 0x3000, 0x4000)
    assert VringAddr.decode(raw) == VringAddr(
        1, 2, desc=0x1000, used=0x2000, avail=0x3000, log=0x4000
    )


@given(u64)
def test_vring_file_takes_index_from_bits_0_to_7_and_no_fd_from_bit_8(value: int) -> None:
    decoded = VringFile.decode(struct.pack("=Q", value))
    assert decoded.index == value & 0xFF
    assert decoded.no_fd is bool(value & 0x100)


def test_single_memory_region_skips_8_bytes_of_padding() -> None:
    region = MemoryRegionDesc(0x1000, 0x2000, 0x3000, 0x4000)
    raw = b"\xff" * 8 + region.encode()
    assert SingleMemoryRegion.decode(raw) == SingleMemoryRegion(region)
    assert SingleMemoryRegion(region).encode() == bytes(8) + region.encode()


@pytest.mark.parametrize("count", [0, MAX_MEM_REGIONS + 1, 0xFFFF_FFFF])
def test_mem_table_with_bad_region_count_is_refused(count: int) -> None:
    payload = struct.pack("=II", count, 0) + bytes(32 * MAX_MEM_REGIONS)
    with pytest.raises(MessageError, match="regions") as info:
        decode_request(header_for(FrontendRequest.SET_MEM_TABLE, payload), payload, 1)
    assert info.value.request == FrontendRequest.SET_MEM_TABLE


def test_mem_table_declaring_more_regions_than_it_holds_is_refused() -> None:
    payload = struct.pack("=II", 2, 0) + MemoryRegionDesc(0, 1, 2, 3).encode()
    with pytest.raises(MessageError, match="2 regions need 72 bytes"):
        decode_request(header_for(FrontendRequest.SET_MEM_TABLE, payload), payload, 2)


def test_mem_table_decoder_refuses_less_than_8_bytes() -> None:
    with pytest.raises(MessageError):
        MemoryTable.decode(b"\x01\0\0")


@pytest.mark.parametrize("request_", [FrontendRequest.GET_CONFIG, FrontendRequest.SET_CONFIG])
def test_config_payload_size_field_must_match_its_data_naming_the_request(
    request_: FrontendRequest,
) -> None:
    payload = struct.pack("=III", 0, 8, 0) + bytes(4)
    with pytest.raises(MessageError, match="does not match") as info:
        decode_request(header_for(request_, payload), payload, 0)
    assert info.value.request == request_
    assert request_.name in str(info.value)


def test_config_payload_decoder_refuses_less_than_12_bytes() -> None:
    with pytest.raises(MessageError):
        ConfigPayload.decode(bytes(11))


def test_config_payload_carries_offset_size_flags_and_data() -> None:
    payload = struct.pack("=III", 4, 4, 1) + b"\x01\x02\x03\x04"
    decoded = decode_ok(FrontendRequest.SET_CONFIG, payload).payload
    assert decoded == ConfigPayload(offset=4, size=4, flags=1, data=b"\x01\x02\x03\x04")


@given(st.sampled_from(ALL_REQUESTS), st.booleans())
def test_encode_request_frames_decode_back(request_: FrontendRequest, need_reply: bool) -> None:
    payload = REQUEST_SPECS[request_].decode(valid_payload(request_))
    frame = encode_request(request_, payload, need_reply=need_reply)
    header = decode_header(frame[:HEADER_SIZE])
    decoded = decode_request(header, frame[HEADER_SIZE:], expected_fd_count(request_, payload))
    assert decoded.request is request_
    assert decoded.payload == payload
    assert header.need_reply is need_reply


@given(
    st.one_of(st.integers(-5, 50), st.integers(-(1 << 70), 1 << 70)),
    st.integers(-(1 << 40), 1 << 40),
    st.one_of(st.integers(-5, 300), st.integers(-(1 << 70), 1 << 70)),
    st.binary(max_size=300),
    st.integers(-3, 20),
)
def test_decode_request_with_an_unvalidated_header_raises_only_message_error(
    request: int, flags: int, size: int, payload: bytes, nfds: int
) -> None:
    """Even a Header that never went through decode_header cannot crash it."""
    try:
        decoded = decode_request(Header(request, flags, size), payload, nfds)
    except MessageError:
        return
    assert decoded.header.size == len(payload)


@given(u32, st.sampled_from([0x1, 0x4, 0x5, 0x9, 0xD]), st.booleans(), st.integers(0, 64))
def test_check_reply_accepts_only_flags_0x5_for_the_expected_request(
    request: int, flags: int, same_request: bool, size: int
) -> None:
    header = Header(request, flags, size)
    expected = request if same_request else request ^ 1
    if flags == VERSION | FLAG_REPLY and request == expected:
        check_reply(header, expected)
    else:
        with pytest.raises(MessageError):
            check_reply(header, expected)
