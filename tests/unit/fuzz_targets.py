"""Fuzz entry points, one per parser of untrusted input.

Each target takes arbitrary bytes, swallows only the typed error that parser
is allowed to raise, and asserts what must hold when parsing succeeds; any
other exception (struct.error, IndexError, an AssertionError, ...) is a bug.
hypothesis drives them in test_fuzz_targets.py; a coverage-guided fuzzer can
drive them too, for example with atheris (not a project dependency):

    import atheris
    from tests.unit import fuzz_targets
    atheris.Setup(sys.argv, fuzz_targets.fuzz_ring); atheris.Fuzz()

Run directly for a quick random-bytes smoke run:

    .venv/bin/python -m tests.unit.fuzz_targets [iterations] [seed]
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable

from vhost_balloon.protocol.errors import MessageError, QueueError
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable
from vhost_balloon.protocol.vhost_user import (
    FLAG_REPLY,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    REQUEST_SPECS,
    VERSION,
    VERSION_MASK,
    Header,
    Request,
    accepted_fd_counts,
    decode_header,
    decode_reply,
    decode_request,
    encode_frame,
)
from vhost_balloon.protocol.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    Chain,
    DeviceQueue,
    RingLayout,
)

RING_MEMORY = 0x2000  # bytes of fake guest RAM the ring target parses
RING_PARAMS = 4  # leading bytes that choose size, features and next_avail


def fuzz_header(data: bytes) -> Header | None:
    """decode_header over the first 12 bytes, decode_reply over all of them."""
    header: Header | None
    try:
        header = decode_header(data[:HEADER_SIZE])
    except MessageError:
        header = None
    if header is not None:
        assert header.flags & VERSION_MASK == VERSION
        assert not header.flags & ~KNOWN_FLAGS
        assert header.size <= MAX_PAYLOAD_SIZE
    expected = header.request if header is not None else 0
    try:
        reply, body = decode_reply(expected, data)
    except MessageError:
        pass
    else:
        assert reply.flags == VERSION | FLAG_REPLY
        assert reply.request == expected
        assert len(body) == reply.size
    return header


def fuzz_request(data: bytes) -> Request | None:
    """One front-end frame: byte 0 is the fd count, then header and payload.

    The payload handed to decode_request is what a reader would collect: up
    to the declared size, possibly short if the data ends early.
    """
    if not data:
        return None
    nfds = data[0] % (MAX_FDS_PER_MESSAGE + 2)
    frame = data[1:]
    try:
        header = decode_header(frame[:HEADER_SIZE])
        payload = frame[HEADER_SIZE : HEADER_SIZE + header.size]
        request = decode_request(header, payload, nfds)
    except MessageError:
        return None
    low, high = REQUEST_SPECS[request.request].sizes
    assert low <= len(payload) <= high
    assert nfds in accepted_fd_counts(request.request, request.payload)
    # What was accepted survives a re-encode: the front-end side of the codec
    # produces a frame the back-end side decodes to the same payload.
    again = encode_frame(request.request, request.payload.encode(), flags=header.flags)
    redecoded = decode_request(decode_header(again[:HEADER_SIZE]), again[HEADER_SIZE:], nfds)
    assert redecoded.payload == request.payload
    assert redecoded.expects_reply is request.expects_reply
    return request


def check_chain(chain: Chain, queue_size: int) -> None:
    """What every chain DeviceQueue.pop() returns must satisfy."""
    assert 0 <= chain.head < queue_size
    assert 1 <= len(chain.descriptors) <= (2 * queue_size if chain.indirect else queue_size)
    writable_seen = False
    for pos, desc in enumerate(chain.descriptors):
        assert not desc.flags & DESC_F_INDIRECT
        assert bool(desc.flags & DESC_F_NEXT) is (pos < len(chain.descriptors) - 1)
        assert desc.addr >= 0 and desc.addr + desc.length <= 1 << 64
        assert desc.writable or not writable_seen
        writable_seen = writable_seen or desc.writable


def fuzz_ring(data: bytes) -> list[Chain]:
    """A split ring whose guest memory is `data`: pop everything, push it back.

    data[0] picks the queue size (1..16), data[1] the features (bit 0
    INDIRECT_DESC, bit 1 EVENT_IDX), data[2:4] next_avail (as after
    SET_VRING_BASE); the rest is guest RAM from GPA 0, zero-filled to
    RING_MEMORY bytes, with the rings packed at 0.
    """
    params = data[:RING_PARAMS].ljust(RING_PARAMS, b"\0")
    size = 1 << (params[0] % 5)
    indirect, event_idx = bool(params[1] & 1), bool(params[1] & 2)
    next_avail = int.from_bytes(params[2:4], "little")
    ram = bytearray(data[RING_PARAMS : RING_PARAMS + RING_MEMORY].ljust(RING_MEMORY, b"\0"))
    memory = GuestMemory(RegionTable([Region(0, RING_MEMORY, 1 << 40, 0)]), [ram])
    device = DeviceQueue(
        memory,
        RingLayout.packed_at(0, size),
        indirect=indirect,
        event_idx=event_idx,
        next_avail=next_avail,
    )
    popped: list[Chain] = []
    try:
        for _ in range(size + 1):  # at most `size` chains can be available
            device.disable_notifications()
            chain = device.pop()
            if chain is None:
                if not device.enable_notifications():
                    break
                continue
            check_chain(chain, size)
            popped.append(chain)
            device.push(chain.head, 0)
            device.needs_notify()
        else:
            raise AssertionError(f"popped more than {size} chains from a {size}-entry ring")
    except QueueError:
        pass
    return popped


TARGETS: dict[str, Callable[[bytes], object]] = {
    "header": fuzz_header,
    "request": fuzz_request,
    "ring": fuzz_ring,
}


def main(argv: list[str]) -> int:
    iterations = int(argv[1]) if len(argv) > 1 else 10_000
    seed = int(argv[2]) if len(argv) > 2 else random.randrange(1 << 32)
    rng = random.Random(seed)
    for name, target in TARGETS.items():
        for _ in range(iterations):
            target(rng.randbytes(rng.randrange(0, 2 * RING_MEMORY if name == "ring" else 300)))
        print(f"fuzz_{name}: {iterations} random inputs, seed {seed}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
