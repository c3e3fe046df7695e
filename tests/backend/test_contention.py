"""BQL stand-in and mmap_lock contention: parsing, lock behaviour, thread lifecycle.

Behaviour only; how much the contention slows a discard is measured in
benchmarks/mmap_contention.py, never asserted here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from vhost_balloon.backend.latency.contention import (
    BigLock,
    BqlContention,
    BqlSpec,
    ContentionSpecError,
    MmapContention,
    MmapSpec,
    parse_bql,
    parse_mmap_contention,
)
from vhost_balloon.backend.latency.delays import parse_delay

MiB = 1 << 20


def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def thread_names(prefix: str) -> set[str]:
    return {thread.name for thread in threading.enumerate() if thread.name.startswith(prefix)}


@pytest.fixture
def lock() -> Iterator[BigLock]:
    yield BigLock()


# ------------------------------------------------------------------ parsing


def test_parse_bql_defaults_to_one_thread() -> None:
    spec = parse_bql("const:200us@500")
    assert (spec.rate, spec.threads, spec.spec) == (500.0, 1, "const:200us@500")
    assert spec.hold.kind == "const"
    assert spec.hold.mean_ns() == pytest.approx(200_000)
    assert spec.utilisation == pytest.approx(0.1)


def test_parse_bql_threads_follow_the_rate() -> None:
    spec = parse_bql("exp:1ms@100,threads=2")
    assert (spec.hold.kind, spec.rate, spec.threads) == ("exp", 100.0, 2)


def test_parse_bql_hold_model_may_contain_commas() -> None:
    spec = parse_bql("lognormal:median=2ms,sigma=0.5@50.5,threads=3")
    assert spec.hold.kind == "lognormal"
    assert spec.hold.spec == "lognormal:median=2ms,sigma=0.5"
    assert (spec.rate, spec.threads) == (50.5, 3)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("const:200us", "HOLD_MODEL@RATE"),
        ("@500", "HOLD_MODEL@RATE"),
        ("bogus:1ms@500", "hold model"),
        ("const:1ms@fast", "rate 'fast'"),
        ("const:1ms@0", "rate '0'"),
        ("const:1ms@-3", "rate '-3'"),
        ("const:1ms@inf", "rate 'inf'"),
        ("const:1ms@", "rate ''"),
        ("const:1ms@10,threads=0", "threads"),
        ("const:1ms@10,threads=65", "threads"),
        ("const:1ms@10,threads=two", "'two'"),
        ("const:1ms@10,thread=2", "unknown option 'thread=2'"),
        ("const:1ms@10,threads=1,threads=2", "threads= given twice"),
    ],
)
def test_parse_bql_names_the_bad_part(spec: str, named: str) -> None:
    with pytest.raises(ContentionSpecError, match="--bql") as raised:
        parse_bql(spec)
    assert named in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_parse_mmap_contention() -> None:
    spec = parse_mmap_contention("2")
    assert (spec.threads, spec.size, spec.spec) == (2, 64 * MiB, "2")
    assert parse_mmap_contention("4,size=128M").size == 128 * MiB
    assert parse_mmap_contention("1,size=512k").size == 512 << 10
    plenty = 1 << 40  # what the host has is not this test's business
    assert parse_mmap_contention("64,size=1G", available=lambda: plenty).size == 1 << 30
    assert parse_mmap_contention("1,size=5000").size == 8192  # rounded up to pages


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("0", "thread count '0'"),
        ("65", "thread count '65'"),
        ("x", "thread count 'x'"),
        ("", "thread count ''"),
        ("2,size=64T", "size '64T'"),
        ("2,size=", "size ''"),
        ("2,size=100", "at least one page"),
        ("2,sz=1M", "unknown option 'sz=1M'"),
        ("2,size=1M,size=2M", "size= given twice"),
    ],
)
def test_parse_mmap_contention_names_the_bad_part(spec: str, named: str) -> None:
    with pytest.raises(ContentionSpecError, match="--mmap-contention") as raised:
        parse_mmap_contention(spec)
    assert named in str(raised.value)


# ------------------------------------------------------------------ BigLock


def test_acquire_of_a_free_lock_waits_about_nothing(lock: BigLock) -> None:
    waited = lock.acquire_blocking()
    assert 0 <= waited < 50_000_000
    assert lock.locked()
    lock.release()
    assert not lock.locked()


def test_acquire_waits_for_the_holder_and_measures_the_wait(lock: BigLock) -> None:
    lock.acquire_blocking()
    threading.Timer(0.05, lock.release).start()
    waited = lock.acquire_blocking()  # another thread's release, as the BQL threads do
    assert waited >= 40_000_000  # measured, not assumed
    lock.release()


def test_acquire_until_gives_up_when_stopped(lock: BigLock) -> None:
    lock.acquire_blocking()
    stop = threading.Event()
    threading.Timer(0.02, stop.set).start()
    assert lock.acquire_until(stop) is None
    lock.release()
    assert lock.acquire_until(stop) is None  # stopped means stopped, even if free
    assert lock.acquire_until(threading.Event()) is not None
    lock.release()


# ---------------------------------------------------------- BqlContention


def test_bql_threads_take_the_lock_and_stop(lock: BigLock) -> None:
    contention = BqlContention(lock, parse_bql("const:1ms@300,threads=3"), seed=7)
    contention.start()
    try:
        assert contention.running
        assert thread_names("bql-") >= {"bql-0", "bql-1", "bql-2"}
        assert wait_for(lambda: contention.acquisitions > 0)
        first = contention.acquisitions
        time.sleep(0.3)
        assert contention.acquisitions > first
        assert contention.held_ns > 0
        with pytest.raises(RuntimeError, match="already running"):
            contention.start()
    finally:
        contention.stop()
    assert not contention.running
    assert not thread_names("bql-")
    assert not lock.locked()
    contention.stop()  # idempotent


def test_bql_stop_interrupts_a_long_hold(lock: BigLock) -> None:
    # Short gaps so the 10 s hold starts at once; stop must cut it short.
    # Beyond what parse_bql accepts (utilisation 10000): built directly.
    spec = BqlSpec(hold=parse_delay("const:10s"), rate=1000.0, threads=2, spec="const:10s@1000")
    contention = BqlContention(lock, spec, seed=1)
    contention.start()
    try:
        assert wait_for(lock.locked)
    finally:
        begin = time.monotonic()
        contention.stop(timeout=3.0)  # raises TimeoutError if a thread is stuck
    assert time.monotonic() - begin < 3.0
    assert not contention.running
    assert not thread_names("bql-")
    assert not lock.locked()
    assert contention.acquisitions == 1  # the other thread was waiting for the lock


async def test_report_path_waits_behind_bql_threads_and_loop_keeps_running(
    lock: BigLock,
) -> None:
    contention = BqlContention(lock, parse_bql("const:20ms@40"), seed=3)
    contention.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.002)

    def report_phases() -> list[int]:  # as a queue thread takes the lock
        waits = []
        for _ in range(10):
            waits.append(lock.acquire_blocking())
            lock.release()
            time.sleep(0.01)
        return waits

    ticking = asyncio.create_task(ticker())
    try:
        waits = await asyncio.to_thread(report_phases)
        assert all(wait >= 0 for wait in waits)
        assert ticks > 10
    finally:
        ticking.cancel()
        contention.stop()
    assert not lock.locked()


# --------------------------------------------------------- MmapContention


def test_mmap_contention_starts_iterates_and_stops() -> None:
    contention = MmapContention(parse_mmap_contention("2,size=4M"))
    contention.start()
    try:
        assert thread_names("mmap-contention-") >= {"mmap-contention-0", "mmap-contention-1"}
        assert wait_for(lambda: contention.iterations > 2)
    finally:
        contention.stop()
    assert contention.iterations > 0
    assert contention.failures == 0
    assert not contention.running
    assert not thread_names("mmap-contention-")
    contention.stop()  # idempotent


def test_mmap_contention_touches_pages_where_populate_is_missing() -> None:
    contention = MmapContention(parse_mmap_contention("1,size=1M"))
    contention._populate_with_madvise = False  # as on a kernel < 5.14
    contention.start()
    try:
        assert wait_for(lambda: contention.iterations > 0)
    finally:
        contention.stop()
    assert contention.failures == 0


def test_mmap_contention_backs_off_when_mmap_fails() -> None:
    # A mapping larger than the address space: every mmap returns MAP_FAILED.
    # Beyond what parse_mmap_contention accepts: built directly so mmap fails.
    contention = MmapContention(MmapSpec(threads=1, size=1 << 50, spec="1,size=1048576G"))
    contention.start()
    try:
        assert wait_for(lambda: contention.failures > 0)
        assert contention.running
    finally:
        contention.stop()
    assert contention.iterations == 0


def test_mmap_contention_size_is_capped() -> None:
    with pytest.raises(ContentionSpecError, match="at most 1024M"):
        parse_mmap_contention("1,size=2G")
