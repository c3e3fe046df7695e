"""The seed corpus of each fuzz target: inputs that reach deep into its code
(a whole vhost-user init sequence, valid inflate and stats chains), written
to tests/fuzz/corpus/TARGET/ by `python -m tests.fuzz.seeds`. The fuzzer
starts from them; the suite runs them (tests/backend/test_fuzz_corpus.py).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

from tests.fuzz.targets import REQUESTS, SESSION_RAM
from vhost_balloon.protocol.vhost_user import (
    U64,
    FrontendRequest,
    MemoryRegionDesc,
    MemoryTable,
    VringAddr,
    VringFile,
    VringState,
)

CORPUS = Path(__file__).resolve().parent / "corpus"
UVA = 0x7F0000000000
R = FrontendRequest
EVENTFD, MEMFD = 1, 2


def _message(
    request: FrontendRequest, payload: bytes = b"", fds: int = 0, reply: bool = False
) -> bytes:
    return bytes([REQUESTS.index(request), 1 if reply else 0, fds, len(payload)]) + payload


def session_init(queue: int = 2) -> bytes:
    """What QEMU sends to start one queue: features, memory, the ring, its fds."""
    features = (1 << 32) | (1 << 5) | (1 << 30)  # VERSION_1, REPORTING, PROTOCOL_FEATURES
    table = MemoryTable((MemoryRegionDesc(0, SESSION_RAM, UVA, 0),)).encode()
    return b"".join(
        [
            _message(R.GET_FEATURES),
            _message(R.SET_FEATURES, U64(features).encode()),
            _message(R.GET_PROTOCOL_FEATURES),
            _message(R.SET_PROTOCOL_FEATURES, U64(0x1 | 0x8).encode()),  # MQ, REPLY_ACK
            _message(R.SET_OWNER),
            _message(R.SET_MEM_TABLE, table, MEMFD, reply=True),
            _message(R.SET_VRING_NUM, VringState(queue, 64).encode()),
            _message(
                R.SET_VRING_ADDR, VringAddr(queue, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0).encode()
            ),
            _message(R.SET_VRING_BASE, VringState(queue, 0).encode()),
            _message(R.SET_VRING_CALL, VringFile(queue, False).encode(), EVENTFD),
            _message(R.SET_VRING_KICK, VringFile(queue, False).encode(), EVENTFD),
            _message(R.SET_VRING_ENABLE, VringState(queue, 1).encode()),
            _message(R.GET_VRING_BASE, VringState(queue, 0).encode()),
        ]
    )


def balloon_seed(pfns: list[int], flags: int = 0) -> bytes:
    array = struct.pack(f"<{len(pfns)}I", *pfns)
    descriptors = bytes([1]) + struct.pack("<II", 0, len(array)) + bytes([flags])
    return descriptors.ljust(40, b"\0") + array


def stats_seed(pairs: list[tuple[int, int]]) -> bytes:
    data = b"".join(struct.pack("<HQ", tag, value) for tag, value in pairs)
    return (bytes([1]) + struct.pack("<II", 0, len(data)) + b"\0").ljust(40, b"\0") + data


SEEDS: dict[str, list[bytes]] = {
    "session": [session_init(2), session_init(0), session_init(1)[:60]],
    "balloon": [
        balloon_seed(list(range(256))),
        balloon_seed([1, 1, 2, 5000, 0xFFFFFFFF]),
        bytes([0x81]) + balloon_seed(list(range(512)))[1:],  # huge pages
    ],
    "stats": [
        stats_seed(
            [(tag, tag * 1000) for tag in (0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 8, 9, 4, 5, 6, 7)]
        ),
        stats_seed([(16, 1), (0xFFFF, 2), (4, 3)]),
    ],
}


def write() -> None:
    for target, seeds in SEEDS.items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (directory / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)


if __name__ == "__main__":
    write()
    sys.exit(0)
