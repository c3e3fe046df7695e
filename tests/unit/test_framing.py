"""The sans-I/O vhost-user framer (protocol/framing.py): bytes and fds in, frames out.

No sockets here: fds are plain integers the reader only carries, and each
"receive" is a call to `receive_data` with the bytes and fds it brought.
"""

from __future__ import annotations

import array
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhost_balloon.protocol.errors import MessageError
from vhost_balloon.protocol.framing import (
    ANCILLARY_SIZE,
    Frame,
    FrameReader,
    fds_from_ancillary,
    fds_to_ancillary,
)
from vhost_balloon.protocol.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    VERSION,
    FrontendRequest,
    Header,
    decode_header,
    encode_frame,
)

TOO_MANY_FDS = f"message header: more than {MAX_FDS_PER_MESSAGE} fds in one message"

# One message as a peer sends it: its frame bytes and the fds of its sendmsg.
messages = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF_FFFF),
        st.sampled_from([VERSION, VERSION | FLAG_REPLY, VERSION | FLAG_NEED_REPLY]),
        st.binary(max_size=64),
        st.lists(st.integers(3, 1 << 20), max_size=MAX_FDS_PER_MESSAGE),
    ).map(lambda m: (encode_frame(m[0], m[2], flags=m[1]), m[3])),
    min_size=1,
    max_size=6,
)


def _frames(reader: FrameReader) -> list[Frame]:
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_one_frame_with_its_fds() -> None:
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_VRING_KICK, b"\x00" * 8)
    reader.receive_data(data, [7])
    frame = reader.next_frame()
    assert frame == Frame(Header(FrontendRequest.SET_VRING_KICK, VERSION, 8), data, [7])
    assert frame.payload == b"\x00" * 8
    assert reader.next_frame() is None
    assert reader.buffered == 0 and reader.pending_fds == () and reader.header is None


def test_an_empty_payload_is_a_frame_as_soon_as_the_header_is_there() -> None:
    reader = FrameReader()
    reader.receive_data(encode_frame(FrontendRequest.GET_FEATURES)[:11])
    assert reader.next_frame() is None
    assert reader.bytes_needed == 1
    reader.receive_data(encode_frame(FrontendRequest.GET_FEATURES)[11:])
    frame = reader.next_frame()
    assert frame is not None and frame.payload == b"" and frame.fds == []


def test_bytes_needed_is_the_rest_of_the_header_then_the_rest_of_the_frame() -> None:
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_VRING_ADDR, bytes(40))
    assert reader.bytes_needed == HEADER_SIZE
    reader.receive_data(data[:5])
    assert reader.next_frame() is None
    assert reader.bytes_needed == HEADER_SIZE - 5 and reader.header is None
    reader.receive_data(data[5:HEADER_SIZE])
    assert reader.next_frame() is None
    assert reader.header == Header(FrontendRequest.SET_VRING_ADDR, VERSION, 40)
    assert reader.bytes_needed == 40
    reader.receive_data(data[HEADER_SIZE:-1])
    assert reader.next_frame() is None
    assert reader.bytes_needed == 1 and reader.buffered == len(data) - 1
    reader.receive_data(data[-1:])
    assert reader.next_frame() is not None
    assert reader.bytes_needed == HEADER_SIZE and reader.header is None


@settings(max_examples=300)
@given(messages, st.data())
def test_reads_of_at_most_bytes_needed_give_each_frame_its_own_fds(
    sent: list[tuple[bytes, list[int]]], data: st.DataObject
) -> None:
    """The back-end's way: fds come with a message's first byte, reads stop at the frame."""
    reader = FrameReader()
    got: list[Frame] = []
    for frame_bytes, fds in sent:
        offset = 0
        while (frame := reader.next_frame()) is None:
            size = data.draw(st.integers(1, reader.bytes_needed))
            reader.receive_data(frame_bytes[offset : offset + size], fds if offset == 0 else ())
            offset += size
        assert offset == len(frame_bytes)
        got.append(frame)
    assert [(f.data, f.fds) for f in got] == sent
    assert [f.header for f in got] == [Header(*HEADER.unpack(b[:HEADER_SIZE])) for b, _ in sent]
    assert reader.buffered == 0 and reader.pending_fds == ()


@settings(max_examples=300)
@given(messages, st.data())
def test_any_split_of_the_stream_gives_the_same_frames(
    sent: list[tuple[bytes, list[int]]], data: st.DataObject
) -> None:
    """The guest's way: large reads; a frame takes every fd received before it completes.

    As on Linux, a message's fds arrive with its first byte, and a receive
    that brings fds ends at the end of that message (unix_stream_read_generic
    stops after the skb that carried them).
    """
    stream = b"".join(frame_bytes for frame_bytes, _ in sent)
    starts, ends, position = {}, set(), 0
    for frame_bytes, fds in sent:
        starts[position] = fds
        position += len(frame_bytes)
        if fds:
            ends.add(position)
    drawn = data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=10))
    cuts = sorted((drawn | ends) - {len(stream)})
    reader = FrameReader()
    got: list[Frame] = []
    received: list[int] = []  # fds received since the last frame was handed out
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        fds = [fd for at, fds in starts.items() if start <= at < end for fd in fds]
        reader.receive_data(stream[start:end], fds)
        received += fds
        for frame in _frames(reader):
            assert frame.fds == received
            received = []
            got.append(frame)
    assert [f.data for f in got] == [frame_bytes for frame_bytes, _ in sent]
    assert [fd for f in got for fd in f.fds] == [fd for _, fds in sent for fd in fds]
    assert reader.buffered == 0 and reader.pending_fds == ()


def test_fds_that_came_with_a_later_frame_go_with_the_frame_completed_first() -> None:
    reader = FrameReader()
    first = encode_frame(FrontendRequest.SET_OWNER)
    second = encode_frame(FrontendRequest.SET_VRING_CALL, bytes(8))
    reader.receive_data(first + second, [4, 5])
    one, two = _frames(reader)
    assert (one.data, one.fds) == (first, [4, 5])
    assert (two.data, two.fds) == (second, [])


def test_fds_arriving_with_the_first_chunk_wait_for_the_frame() -> None:
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_MEM_TABLE, bytes(40))
    reader.receive_data(data[:1], [9, 10])
    assert reader.next_frame() is None
    assert reader.pending_fds == (9, 10)
    reader.receive_data(data[1:20])
    assert reader.next_frame() is None
    reader.receive_data(data[20:])
    frame = reader.next_frame()
    assert frame is not None and frame.fds == [9, 10]
    assert not reader.pending_fds


@pytest.mark.parametrize("size", [MAX_PAYLOAD_SIZE + 1, 0xFFFF_FFFF])
def test_an_oversized_frame_is_refused_at_its_header(size: int) -> None:
    reader = FrameReader()
    reader.receive_data(HEADER.pack(FrontendRequest.SET_CONFIG, VERSION, size)[:-1], [3])
    assert reader.next_frame() is None  # not decided before the 12th byte
    reader.receive_data(HEADER.pack(FrontendRequest.SET_CONFIG, VERSION, size)[-1:], [4])
    expected = f"SET_CONFIG: payload size {size} exceeds {MAX_PAYLOAD_SIZE}"
    with pytest.raises(MessageError, match=expected):
        reader.next_frame()
    # Nothing consumed: asking again says the same, and the fds are still the caller's to take.
    with pytest.raises(MessageError, match=expected):
        reader.next_frame()
    assert reader.header is None
    assert reader.take_fds() == [3, 4]
    assert reader.pending_fds == ()


def test_the_largest_payload_is_accepted() -> None:
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_CONFIG, bytes(MAX_PAYLOAD_SIZE))
    reader.receive_data(data)
    frame = reader.next_frame()
    assert frame is not None and len(frame.payload) == MAX_PAYLOAD_SIZE


u32 = st.integers(0, 0xFFFF_FFFF)


@given(
    u32,
    st.one_of(st.sampled_from([VERSION, VERSION | FLAG_REPLY | FLAG_NEED_REPLY]), u32),
    st.one_of(st.integers(0, MAX_PAYLOAD_SIZE + 1), u32),
)
def test_a_header_is_refused_exactly_when_decode_header_refuses_it(
    request: int, flags: int, size: int
) -> None:
    header = HEADER.pack(request, flags, size)
    reader = FrameReader()
    reader.receive_data(header)
    try:
        expected = decode_header(header)
    except MessageError as error:
        with pytest.raises(MessageError) as raised:
            reader.next_frame()
        assert str(raised.value) == str(error)
        return
    frame = reader.next_frame()
    if size == 0:
        assert frame is not None and frame.header == expected
    else:
        assert frame is None and reader.header == expected
        assert reader.bytes_needed == size


def test_a_bad_version_is_refused() -> None:
    reader = FrameReader()
    reader.receive_data(HEADER.pack(FrontendRequest.GET_FEATURES, 0x2, 0))
    with pytest.raises(MessageError, match="unsupported version 2"):
        reader.next_frame()


@given(messages, st.data())
def test_a_truncated_frame_never_comes_out(
    sent: list[tuple[bytes, list[int]]], data: st.DataObject
) -> None:
    stream = b"".join(frame_bytes for frame_bytes, _ in sent)
    cut = data.draw(st.integers(0, len(stream) - 1))
    reader = FrameReader()
    reader.receive_data(stream[:cut])
    whole, end = 0, 0
    for frame_bytes, _ in sent:
        if end + len(frame_bytes) > cut:
            break
        end += len(frame_bytes)
        whole += 1
    assert len(_frames(reader)) == whole
    assert reader.buffered == cut - end
    assert reader.bytes_needed > 0  # the end of the stream would cut this frame short
    partial = sent[whole][0]
    if cut - end >= HEADER_SIZE:
        assert reader.header is not None and reader.header.size == len(partial) - HEADER_SIZE
        assert reader.bytes_needed == len(partial) - (cut - end)
    else:
        assert reader.header is None
        assert reader.bytes_needed == HEADER_SIZE - (cut - end)


def test_empty_data_adds_nothing() -> None:
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_OWNER)
    reader.receive_data(data[:3])
    reader.receive_data(b"")
    assert reader.buffered == 3 and reader.next_frame() is None
    reader.receive_data(data[3:])
    assert reader.next_frame() is not None


def test_truncated_ancillary_data_is_too_many_fds_and_the_fds_are_kept() -> None:
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_MEM_TABLE, bytes(40))
    with pytest.raises(MessageError) as raised:
        reader.receive_data(data, list(range(10, 18)), fds_truncated=True)
    assert str(raised.value) == TOO_MANY_FDS
    assert raised.value.request is None
    assert reader.take_fds() == list(range(10, 18))  # for the caller to close


def test_more_than_the_limit_in_one_receive_is_too_many_fds() -> None:
    reader = FrameReader()
    with pytest.raises(MessageError, match=TOO_MANY_FDS):
        reader.receive_data(b"\x01", list(range(10, 11 + MAX_FDS_PER_MESSAGE)))
    assert reader.pending_fds == tuple(range(10, 11 + MAX_FDS_PER_MESSAGE))


def test_the_limit_itself_is_accepted() -> None:
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_MEM_TABLE, bytes(40))
    reader.receive_data(data, list(range(10, 10 + MAX_FDS_PER_MESSAGE)))
    frame = reader.next_frame()
    assert frame is not None and frame.fds == list(range(10, 10 + MAX_FDS_PER_MESSAGE))


def test_the_limit_is_per_receive_a_frame_may_collect_more() -> None:
    """Header and payload sent with fds each: the reader passes them all on (the
    request's own fd rule, REQUEST_SPECS, is what refuses them)."""
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_MEM_TABLE, bytes(40))
    reader.receive_data(data[:HEADER_SIZE], list(range(10, 18)))
    assert reader.next_frame() is None
    reader.receive_data(data[HEADER_SIZE:], list(range(20, 28)))
    frame = reader.next_frame()
    assert frame is not None and len(frame.fds) == 2 * MAX_FDS_PER_MESSAGE


def test_discard_data_drops_the_bytes_and_keeps_the_fds() -> None:
    reader = FrameReader()
    data = encode_frame(FrontendRequest.SET_VRING_ADDR, bytes(40))
    reader.receive_data(data[:20], [6])
    assert reader.next_frame() is None and reader.header is not None
    reader.discard_data()
    assert reader.buffered == 0 and reader.header is None
    assert reader.pending_fds == (6,)
    reader.receive_data(encode_frame(FrontendRequest.SET_OWNER))
    frame = reader.next_frame()
    assert frame is not None and frame.header.request == FrontendRequest.SET_OWNER
    assert frame.fds == [6]


def test_take_fds_hands_them_over_once() -> None:
    reader = FrameReader()
    reader.receive_data(b"\x01\x00", [3, 4])
    assert reader.take_fds() == [3, 4]
    assert reader.take_fds() == []
    assert reader.buffered == 2


# --------------------------------------------------------------- ancillary items


@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=MAX_FDS_PER_MESSAGE))
def test_ancillary_items_round_trip(fds: list[int]) -> None:
    ancillary = fds_to_ancillary(fds)
    assert (ancillary == []) == (not fds)
    assert fds_from_ancillary(ancillary) == fds


def test_ancillary_parsing_skips_other_items_and_partial_ints() -> None:
    fd_bytes = array.array("i", [5, 6]).tobytes()
    ancillary = [
        (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, b"\x00" * 12),
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_bytes + b"\x07\x00"),
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [8]).tobytes()),
    ]
    assert fds_from_ancillary(ancillary) == [5, 6, 8]


def test_the_ancillary_buffer_holds_exactly_the_fd_limit() -> None:
    size = array.array("i").itemsize
    assert socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * size) == ANCILLARY_SIZE
    assert socket.CMSG_LEN((MAX_FDS_PER_MESSAGE + 1) * size) > ANCILLARY_SIZE
