"""Real contention inside the backend process: a BQL stand-in and mmap_lock churn.

QEMU's big lock (BQL) is held by vCPU, I/O and timer threads; a device
backend that needs it waits behind them. `BigLock` is that lock for this
process and `BqlContention` is the other holders: N daemon threads taking it
at Poisson arrivals and holding it for a sampled time. The report path takes
the same lock, so what it waited is measured, not assumed.

`MmapContention` is real kernel contention: threads that map, populate,
mprotect and unmap anonymous memory in a loop, so this process's mmap_lock is
repeatedly held for write (mmap, mprotect, munmap) and for a long read
(MADV_POPULATE_WRITE). A discard that needs mmap_lock queues behind them:
MADV_REMOVE always; MADV_DONTNEED only on kernels that have not moved it to
the per-VMA lock. fallocate(PUNCH_HOLE) never takes it and is the control
(benchmarks/mmap_contention.py measures all three).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import mmap
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vhost_balloon.backend import libc
from vhost_balloon.backend.latency.delays import (
    DelayModel,
    DelaySpecError,
    format_ns,
    parse_delay,
    with_absolute_replay_path,
)
from vhost_balloon.backend.libc import precise_sleeps_for_this_thread

LOG = logging.getLogger("vhost_balloon")

MAX_THREADS = 64
# Offered load of the BQL stand-in (mean hold x rate). Above 1 it cannot be
# served at all: the threads fall behind, the achieved rate is not the one
# asked for, and a report waits for the lock without bound. Near 1 the wait
# grows as load / (1 - load) (queueing), so at 0.9 a report may already wait
# about nine mean holds: past that the setting measures the backlog, not latency.
MAX_BQL_UTILISATION = 0.9
MIN_BQL_RATE = 1 / 86_400  # at least one acquisition a day: a finite, sleepable gap
# Each acquisition costs the threads some microseconds of interpreter time
# under the GIL: beyond this the schedule cannot be kept, only the CPU burnt.
MAX_BQL_RATE = 100_000.0
_POLL_S = 0.05  # how often a lock waiter looks at its stop/abandon flag
_BACKOFF_S = 0.01  # after a failed mmap or populate (e.g. ENOMEM)


class ContentionSpecError(ValueError):
    """A --bql or --mmap-contention value that cannot be used; says which part and why."""


# ---------------------------------------------------------------- BQL stand-in


@dataclass(frozen=True)
class BqlSpec:
    hold: DelayModel
    rate: float  # acquisitions per second, in total over all threads
    threads: int
    spec: str

    @property
    def utilisation(self) -> float:
        """Offered lock load (mean hold x rate); >= 1 means the lock saturates."""
        return self.hold.mean_ns() * self.rate / 1e9


_BQL_FORMAT = "HOLD_MODEL@RATE[,threads=N], e.g. const:200us@500 or exp:1ms@100,threads=2"


def parse_bql(spec: str, *, allow_relative: bool = True) -> BqlSpec:
    """Parse `HOLD_MODEL@RATE[,threads=N]`; RATE is the total over the threads.

    The hold model may itself contain commas ("lognormal:median=2ms,sigma=0.5")
    or an '@' (a replay file's path), so the split is at the LAST '@' and
    options are read only after the rate. A lock the threads cannot serve
    (utilisation over MAX_BQL_UTILISATION) is refused here, not found out
    after a run; `allow_relative` is parse_delay's, for the hold model.
    """
    hold_text, at, tail = spec.rpartition("@")
    if not at or not hold_text:
        raise ContentionSpecError(f"--bql {spec!r}: expected {_BQL_FORMAT}")
    try:
        hold = parse_delay(hold_text, allow_relative=allow_relative)
    except DelaySpecError as error:
        raise ContentionSpecError(f"--bql {spec!r}: bad hold model: {error}") from None
    rate_text, *options = tail.split(",")
    rate = _rate(spec, rate_text)
    settings = _options(f"--bql {spec!r}", options, {"threads"})
    threads = _thread_count(f"--bql {spec!r}: bad threads=", settings.get("threads", "1"))
    bql = BqlSpec(hold=hold, rate=rate, threads=threads, spec=spec)
    if not bql.utilisation <= MAX_BQL_UTILISATION:
        raise ContentionSpecError(
            f"--bql {spec!r}: the lock would be held {bql.utilisation:.3g} of the time "
            f"(mean hold {format_ns(round(hold.mean_ns()))} x {rate:g}/s); at most "
            f"{MAX_BQL_UTILISATION:g}, beyond which reports wait for a backlog that only "
            "grows: lower the hold or the rate"
        )
    return bql


def with_absolute_hold_path(spec: str, directory: Path) -> str:
    """A --bql spec with a relative replay path in its hold model made
    absolute against `directory`; any other spec unchanged."""
    hold_text, at, tail = spec.rpartition("@")
    if not at:
        return spec
    return f"{with_absolute_replay_path(hold_text, directory)}@{tail}"


def _rate(spec: str, text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise ContentionSpecError(
            f"--bql {spec!r}: bad rate {text!r}: expected acquisitions per second "
            f"(a number > 0) after '@', in {_BQL_FORMAT}"
        )
    if not MIN_BQL_RATE <= rate <= MAX_BQL_RATE:
        raise ContentionSpecError(
            f"--bql {spec!r}: rate {text!r} is out of range: at least one acquisition "
            f"a day ({MIN_BQL_RATE:.3g}/s) and at most {MAX_BQL_RATE:g}/s"
        )
    return rate


class BigLock:
    """Process-wide lock; background threads and the queue threads take it.

    A plain `threading.Lock`: unfair like QEMU's BQL mutex. A queue thread
    waits for it in the report's phase, and the wait is measured.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def release(self) -> None:
        self._lock.release()

    def acquire_blocking(self) -> int:
        """Take the lock from a thread; returns ns waited."""
        start = time.monotonic_ns()
        self._lock.acquire()
        return time.monotonic_ns() - start

    def acquire_until(self, stop: threading.Event) -> int | None:
        """Wait for the lock unless `stop` is set first; ns waited, or None if stopped.

        The timed acquire wakes as soon as the lock is free; the timeout only
        bounds how late a stop is noticed.
        """
        start = time.monotonic_ns()
        while not stop.is_set():
            if self._lock.acquire(timeout=_POLL_S):
                return time.monotonic_ns() - start
        return None

    def locked(self) -> bool:
        return self._lock.locked()


class BqlContention:
    """N daemon threads that take the BigLock at RATE/s in total and hold it.

    Each thread is an independent Poisson source at RATE/N (their sum is
    Poisson at RATE): exponential gaps from a `random.Random` seeded by
    (seed, thread), holds from the hold model's (seed, "bql-hold-i") stream.
    Arrivals are scheduled on the clock, not after each release, so holds
    and waits do not lower the rate while the lock keeps up; a thread that
    falls behind (mean hold x RATE near or above 1) takes it again at once
    but keeps at most one arrival pending, so there is no unbounded backlog
    and the achieved rate drops. Holds overshoot the sampled value by the
    timer wakeup (tens of us); `held_ns` is what was really held, and the
    achieved rate is `acquisitions` over the run time.
    """

    def __init__(self, lock: BigLock, spec: BqlSpec, seed: int) -> None:
        self._lock = lock
        self._spec = spec
        self._seed = seed
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        # One slot per thread, written only by that thread: no lock needed.
        self._acquisitions = [0] * spec.threads
        self._held_ns = [0] * spec.threads
        self.failure = Failure()

    def start(self) -> None:
        if self.running:
            raise RuntimeError("BQL contention is already running")
        self._stop = threading.Event()
        self.failure = Failure()
        self._threads = [
            threading.Thread(
                target=self._run, args=(index, self._stop), name=f"bql-{index}", daemon=True
            )
            for index in range(self._spec.threads)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Wake every thread (gaps and holds wait on the stop event) and join them."""
        self._stop.set()
        _join_all(self._threads, timeout, "BQL contention")

    @property
    def acquisitions(self) -> int:
        return sum(self._acquisitions)

    @property
    def held_ns(self) -> int:
        return sum(self._held_ns)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _run(self, index: int, stop: threading.Event) -> None:
        rate = self._spec.rate / self._spec.threads
        gaps = random.Random(f"{self._seed}:bql-gap:{index}")
        # The default 50 us timer slack makes a 200 us hold last ~270 us; 1 ns
        # slack (this thread only) brings the overshoot to ~20 us.
        precise_sleeps_for_this_thread()
        try:
            hold = self._spec.hold.sampler(self._seed, f"bql-hold-{index}")
            next_at = time.monotonic() + gaps.expovariate(rate)
            while not stop.wait(max(0.0, next_at - time.monotonic())):
                if self._lock.acquire_until(stop) is None:
                    return
                if stop.is_set():  # got it just as a stop freed it: do not hold again
                    self._lock.release()
                    return
                taken = time.monotonic_ns()
                try:
                    stop.wait(max(0, hold()) / 1e9)
                finally:
                    self._held_ns[index] += time.monotonic_ns() - taken
                    self._lock.release()
                self._acquisitions[index] += 1
                next_at = max(next_at + gaps.expovariate(rate), time.monotonic())
        except Exception as error:  # a bug or a broken hold model: no thread may die silently
            LOG.exception("BQL contention thread %d failed; stopping all BQL threads", index)
            self.failure.record(error)
            stop.set()  # half a model would measure something nobody asked for


# ----------------------------------------------------------- mmap_lock churn


@dataclass(frozen=True)
class MmapSpec:
    threads: int
    size: int  # bytes per thread's mapping, a multiple of the page size
    spec: str

    @property
    def total(self) -> int:
        """Bytes resident at the peak: every thread's mapping populated at once."""
        return self.threads * self.size


_SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_MMAP_FORMAT = "THREADS[,size=BYTES[K|M|G]], e.g. 2 or 4,size=128M"


MAX_MMAP_CONTENTION_SIZE = 1 << 30


MEMINFO = Path("/proc/meminfo")
# The threads populate their whole mappings at once, so threads x size is
# really resident at the peak; half of MemAvailable leaves the other half to
# the guests this backend serves (whose RAM fills again as they reuse
# reported pages) and to the rest of the host. Going over is an OOM kill of
# the backend, and every VM it serves loses its device.
MMAP_MEMORY_SHARE = 0.5


class ContentionMemoryError(ContentionSpecError):
    """mmap contention that would take more memory than the host can spare."""


def memory_available(meminfo: Path = MEMINFO) -> int:
    """MemAvailable in bytes (the kernel's estimate of what can be allocated
    without swapping); ContentionMemoryError if it cannot be read."""
    try:
        text = meminfo.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not text"
        raise ContentionMemoryError(f"cannot read MemAvailable from {meminfo}: {reason}") from None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            number, _, unit = value.strip().partition(" ")
            if number.isdigit() and unit == "kB":
                return int(number) << 10
    raise ContentionMemoryError(f"cannot read MemAvailable from {meminfo}: no 'MemAvailable: N kB'")


def check_mmap_memory(spec: MmapSpec, available: int) -> None:
    """Refuse `spec` if its threads x size is over MMAP_MEMORY_SHARE of `available`."""
    allowed = int(available * MMAP_MEMORY_SHARE)
    if spec.total > allowed:
        size, total = _size_text(spec.size), _size_text(spec.total)
        raise ContentionMemoryError(
            f"--mmap-contention {spec.spec!r}: {spec.threads} threads x {size} = {total}, "
            f"over {_size_text(allowed)} ({MMAP_MEMORY_SHARE:.0%} of the "
            f"{_size_text(available)} MemAvailable): fewer threads or a smaller size"
        )


def _size_text(size: int) -> str:
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f}G"
    return f"{size / (1 << 20):.0f}M" if size >= 1 << 20 else f"{size >> 10}K"


def parse_mmap_contention(spec: str, *, available: Callable[[], int] | None = None) -> MmapSpec:
    """Parse `THREADS[,size=64M]`: threads 1..64, size at least one page, and
    threads x size within MMAP_MEMORY_SHARE of `available()` (bytes; by
    default memory_available(), read now: the CLI, ctl and specs all check)."""
    threads_text, *options = spec.split(",")
    what = f"--mmap-contention {spec!r}"
    threads = _thread_count(f"{what}: bad thread count", threads_text)
    settings = _options(what, options, {"size"})
    size_text = settings.get("size", "64M")
    match = _SIZE.fullmatch(size_text.strip())
    if match is None:
        raise ContentionSpecError(
            f"{what}: bad size {size_text!r}: expected bytes with an optional K, M or G "
            f"suffix, in {_MMAP_FORMAT}"
        )
    size = int(match[1]) * _UNITS[match[2].upper()]
    if size < mmap.PAGESIZE:
        raise ContentionSpecError(
            f"{what}: bad size {size_text!r}: must be at least one page ({mmap.PAGESIZE} bytes)"
        )
    if size > MAX_MMAP_CONTENTION_SIZE:
        # Populating more stalls even the event loop on the mmap_lock for seconds.
        raise ContentionSpecError(
            f"{what}: bad size {size_text!r}: at most {MAX_MMAP_CONTENTION_SIZE >> 20}M per thread"
        )
    size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    parsed = MmapSpec(threads=threads, size=size, spec=spec)
    check_mmap_memory(parsed, (available or memory_available)())
    return parsed


class MmapContention:
    """Threads that churn this process's mmap_lock until stopped.

    Each iteration: mmap an anonymous private region (mmap_lock for write),
    MADV_POPULATE_WRITE it (read lock, held while the kernel faults every
    page in), mprotect it read-only (write lock), munmap it (write lock).
    Every call goes through cffi, which releases the GIL for its duration:
    the Python loop holds the GIL only for a few bytecodes between syscalls,
    so the event loop thread is not starved of it and what it feels is the
    kernel lock (and the CPUs), not the interpreter.
    """

    def __init__(self, spec: MmapSpec) -> None:
        self._spec = spec
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._iterations = [0] * spec.threads
        self._failures = [0] * spec.threads
        # Cleared (once, by any thread) on a kernel without MADV_POPULATE_WRITE.
        self._populate_with_madvise = True
        self.failure = Failure()

    def start(self) -> None:
        if self.running:
            raise RuntimeError("mmap contention is already running")
        self._stop = threading.Event()
        self.failure = Failure()
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(index, self._stop),
                name=f"mmap-contention-{index}",
                daemon=True,
            )
            for index in range(self._spec.threads)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Threads finish their current iteration (one populate) and exit."""
        self._stop.set()
        _join_all(self._threads, timeout, "mmap contention")

    @property
    def spec(self) -> MmapSpec:
        return self._spec

    @property
    def iterations(self) -> int:
        return sum(self._iterations)

    @property
    def failures(self) -> int:
        """Iterations that failed (MAP_FAILED, populate errors) and backed off."""
        return sum(self._failures)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _run(self, index: int, stop: threading.Event) -> None:
        try:
            self._churn(index, stop)
        except Exception as error:  # a bug: no thread may die silently
            LOG.exception("mmap contention thread %d failed; stopping all of them", index)
            self.failure.record(error)
            stop.set()

    def _churn(self, index: int, stop: threading.Event) -> None:
        size = self._spec.size
        prot_rw = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        while not stop.is_set():
            try:
                address = libc.mmap(size, prot_rw, flags)
            except OSError:  # MAP_FAILED
                self._failures[index] += 1
                stop.wait(_BACKOFF_S)
                continue
            try:
                ok = self._populate(address, size) and _protect_read_only(address, size)
            finally:
                with contextlib.suppress(OSError):
                    libc.munmap(address, size)
            if ok:
                self._iterations[index] += 1
            else:
                self._failures[index] += 1
                stop.wait(_BACKOFF_S)

    def _populate(self, address: int, size: int) -> bool:
        if self._populate_with_madvise:
            try:
                libc.madvise(address, size, libc.MADV_POPULATE_WRITE)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    return False
            else:
                return True
            self._populate_with_madvise = False  # kernel < 5.14
            LOG.info("MADV_POPULATE_WRITE unsupported; mmap contention touches pages instead")
        _touch_pages(address, size)
        return True


def _protect_read_only(address: int, size: int) -> bool:
    try:
        libc.mprotect(address, size, mmap.PROT_READ)
    except OSError:
        return False
    return True


def _touch_pages(address: int, size: int) -> None:
    """Fault every page in by writing one byte to it (the pre-5.14 fallback).

    Unlike the madvise, this loop holds the GIL (dropped every switch
    interval), so on old kernels the contention also competes for the GIL.
    """
    pages = libc.memory_at(address, size)
    for offset in range(0, size, mmap.PAGESIZE):
        pages[offset] = 0x01


# ------------------------------------------------------------------- helpers


class Failure:
    """The first exception a model's threads died of; any failure stops them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._error: str | None = None

    def record(self, error: Exception) -> None:
        with self._lock:
            if self._error is None:
                self._error = f"{type(error).__name__}: {error}"

    @property
    def error(self) -> str | None:
        return self._error


def _options(what: str, options: list[str], accepted: set[str]) -> dict[str, str]:
    settings: dict[str, str] = {}
    names = ", ".join(f"{name}=" for name in sorted(accepted))
    for option in options:
        name, equals, value = option.partition("=")
        name = name.strip()
        if not equals or name not in accepted:
            raise ContentionSpecError(f"{what}: unknown option {option!r}: accepted: {names}")
        if name in settings:
            raise ContentionSpecError(f"{what}: {name}= given twice")
        settings[name] = value.strip()
    return settings


def _thread_count(what: str, text: str) -> int:
    try:
        threads = int(text.strip())
    except ValueError:
        threads = 0
    if not 1 <= threads <= MAX_THREADS:
        raise ContentionSpecError(f"{what} {text!r}: expected an integer 1..{MAX_THREADS}")
    return threads


def _join_all(threads: list[threading.Thread], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [thread.name for thread in threads if thread.is_alive()]
    if alive:
        raise TimeoutError(f"{what}: {', '.join(alive)} still running after {timeout} s")


__all__ = [
    "BigLock",
    "BqlContention",
    "BqlSpec",
    "ContentionMemoryError",
    "ContentionSpecError",
    "Failure",
    "MmapContention",
    "MmapSpec",
    "check_mmap_memory",
    "memory_available",
    "parse_bql",
    "parse_mmap_contention",
    "with_absolute_hold_path",
]
