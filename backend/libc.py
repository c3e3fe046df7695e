"""Syscalls the standard library lacks, through cffi in ABI mode (no compiler).

cffi releases the GIL around each call, so a long punch-hole running in a
worker thread does not stall the event loop.
"""

from __future__ import annotations

import threading
from typing import Any

import cffi

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MADV_DONTNEED = 4
MADV_REMOVE = 9

_ffi = cffi.FFI()
_ffi.cdef(
    """
    int fallocate(int fd, int mode, long offset, long len);
    int madvise(void *addr, size_t length, int advice);
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
              unsigned long arg5);
    """
)
_libc: Any = _ffi.dlopen(None)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): frees the file's pages in every mapping."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        errno = _ffi.errno
        raise OSError(errno, f"fallocate(PUNCH_HOLE) at {offset:#x}+{length:#x} failed")


def madvise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(_ffi.cast("void *", address), length, advice) != 0:
        errno = _ffi.errno
        raise OSError(errno, f"madvise({advice}) at {address:#x}+{length:#x} failed")


_PR_SET_TIMERSLACK = 29


def precise_sleeps_for_this_thread() -> None:
    """Timer slack of 1 ns for the calling thread (default 50 us).

    Sleeps of injected delays and BQL holds otherwise overshoot by ~50-100 us
    each, which adds up over the 32 entries of a report.
    """
    _libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


def buffer_address(buffer: object) -> int:
    """Start address of a writable buffer (an mmap); holds no export afterwards."""
    pointer = _ffi.from_buffer(buffer, require_writable=True)  # type: ignore[call-overload]
    try:
        return int(_ffi.cast("uintptr_t", pointer))
    finally:
        _ffi.release(pointer)


_FENCE = threading.Lock()


def full_fence() -> None:
    """A full memory barrier for ring index handshakes (EVENT_IDX).

    CPython cannot emit mfence, but acquiring and releasing a lock executes a
    locked read-modify-write (sem_post / atomic compare-exchange), which is a
    full barrier on x86 and a release/acquire pair elsewhere.
    """
    with _FENCE:
        pass
