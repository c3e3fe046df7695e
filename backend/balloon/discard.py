"""Discard strategies and the timed, accounted discard of one report.

`run_discards` runs on the queue's own thread: it issues the syscalls of
one report back to back and measures, through the files'
allocated blocks, what they really gave back to the host. On a MAP_SHARED
memfd only punch-hole and MADV_REMOVE free anything; MADV_DONTNEED drops the
backend's own page table entries and nothing else, which the accounting
shows as 0 bytes freed.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vhost_balloon.backend.latency.timer import sleep_exact_ns
from vhost_balloon.backend.libc import MADV_DONTNEED, MADV_REMOVE, madvise, punch_hole
from vhost_balloon.backend.vhost.mapping import FileIdentity


class DiscardStrategy(enum.Enum):
    PUNCH_HOLE = "punch-hole"
    MADV_REMOVE = "madv-remove"
    MADV_DONTNEED = "madv-dontneed"
    NONE = "none"

    @classmethod
    def names(cls) -> list[str]:
        return [member.value for member in cls]


@dataclass(slots=True)
class DiscardTarget:
    """One validated, aligned range: where it is in the file and in our mapping."""

    gpa: int
    length: int
    fd: int
    file_offset: int
    address: int
    identity: FileIdentity


@dataclass(slots=True)
class DiscardResult:
    started_ns: int = 0
    done_ns: int = 0
    syscall_ns: int = 0
    freed_bytes: int = 0
    entry_delay_ns: int = 0  # injected before the syscalls (measured, not requested)
    errors: list[str] = field(default_factory=list)


def allocated_bytes(fd: int) -> int:
    """Bytes the file really holds in memory (what the host has not got back)."""
    return os.fstat(fd).st_blocks * 512


def _discard_one(strategy: DiscardStrategy, target: DiscardTarget) -> None:
    if strategy is DiscardStrategy.PUNCH_HOLE:
        punch_hole(target.fd, target.file_offset, target.length)
    elif strategy is DiscardStrategy.MADV_REMOVE:
        madvise(target.address, target.length, MADV_REMOVE)
    elif strategy is DiscardStrategy.MADV_DONTNEED:
        madvise(target.address, target.length, MADV_DONTNEED)


def run_discards(
    strategy: DiscardStrategy,
    targets: Sequence[DiscardTarget],
    files: Mapping[FileIdentity, int],
    entry_delays: Sequence[int] | None = None,
) -> DiscardResult:
    """Discard every target in order; never raises for a failed syscall.

    `entry_delays` (ns, one per target) are slept before each syscall.
    """
    result = DiscardResult()
    accounted = strategy is not DiscardStrategy.NONE
    before = {identity: allocated_bytes(fd) for identity, fd in files.items()} if accounted else {}
    result.started_ns = time.monotonic_ns()
    for index, target in enumerate(targets):
        if entry_delays is not None:
            result.entry_delay_ns += sleep_exact_ns(entry_delays[index])
        if not accounted:
            continue
        begin = time.perf_counter_ns()
        try:
            _discard_one(strategy, target)
        except OSError as error:
            result.errors.append(f"{strategy.value} gpa {target.gpa:#x}: {error.strerror}")
        result.syscall_ns += time.perf_counter_ns() - begin
    result.done_ns = time.monotonic_ns()
    if accounted:
        result.freed_bytes = sum(before[i] - allocated_bytes(fd) for i, fd in files.items())
    return result
