"""Ring fields the other side writes concurrently are never seen torn or zeroed.

The guest reads used.idx while the device writes it, and the device reads
avail.idx and used_event while the driver writes them. struct's pack_into
zeroes its destination before packing, and unpack_from and bytes slices read
the two bytes separately: a reader in another process could then see 0, or
a value with one byte old and one new (found by benchmarks/load.py: a
mocked guest saw used.idx 0 and called its ring corrupted). These tests run
the writer in a forked process on a shared mapping, as the two sides are.
"""

from __future__ import annotations

import itertools
import mmap
import os
import time
from collections.abc import Callable

import pytest

from vhost_balloon.protocol.memory import load_index, store, store_index
from vhost_balloon.protocol.virtqueue import U16

SECONDS = 0.5
OFFSET = 2  # where used.idx sits in the used ring


def _in_child(body: Callable[[], None]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            body()
        finally:
            os._exit(0)
    return pid


def _reads_until(shared: mmap.mmap, deadline: float) -> list[int]:
    values: list[int] = []
    while time.monotonic() < deadline:
        values.extend(load_index(shared, OFFSET) for _ in range(1000))
    return values


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to race")
def test_an_index_that_only_grows_is_never_seen_going_back() -> None:
    shared = mmap.mmap(-1, mmap.PAGESIZE)
    deadline = time.monotonic() + SECONDS

    def writer() -> None:
        # One pass up to 0xFFFF, no wrap: any decrease seen is a torn read.
        # Each value stays a while, so the pass lasts about the test.
        per_value = max(1, int(SECONDS * 2e6 / 0x10000))
        for value in range(1, 0x10000):
            for _ in range(per_value):
                store_index(shared, OFFSET, value)

    pid = _in_child(writer)
    try:
        values = _reads_until(shared, deadline)
    finally:
        os.waitpid(pid, 0)
    assert len(values) > 10_000
    backwards = [(a, b) for a, b in itertools.pairwise(values) if b < a]
    assert backwards == []  # a torn read goes back (by up to 255), a zeroed one to 0
    assert len(set(values)) > 100  # the writer did run meanwhile


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to race")
def test_rewriting_a_field_with_its_own_value_never_shows_anything_else() -> None:
    shared = mmap.mmap(-1, mmap.PAGESIZE)
    store_index(shared, OFFSET, 0x1234)
    deadline = time.monotonic() + SECONDS

    def writer() -> None:
        while time.monotonic() < deadline + 0.1:
            for _ in range(1000):
                store(U16, shared, OFFSET, 0x1234)  # every other field goes through store()
                store_index(shared, OFFSET, 0x1234)

    pid = _in_child(writer)
    try:
        values = _reads_until(shared, deadline)
    finally:
        os.waitpid(pid, 0)
    assert len(values) > 10_000 and set(values) == {0x1234}


def test_index_fields_are_little_endian_and_wrap() -> None:
    buffer = bytearray(8)
    store_index(buffer, 4, 0x1_0203)
    assert buffer[4:6] == b"\x03\x02" and load_index(buffer, 4) == 0x0203
    assert load_index(bytes(buffer), 4) == 0x0203
