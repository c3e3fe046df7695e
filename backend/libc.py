"""Syscalls the standard library lacks, through cffi in ABI mode (no compiler).

The only place in the project that loads libc: every other module calls the
typed functions below. cffi releases the GIL around each call, so a long
punch-hole on a queue's thread does not stall the event loop, and
mmap_lock contention threads hold the GIL only between their syscalls.
Each wrapper reads errno right after its call and raises OSError with it.
"""

from __future__ import annotations

import threading
from typing import Any

import cffi

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; the stdlib mmap module lacks it on 3.11
_PR_SET_TIMERSLACK = 29
_MAP_FAILED = -1

_ffi = cffi.FFI()
_ffi.cdef(
    """
    int fallocate(int fd, int mode, long offset, long len);
    int madvise(void *addr, size_t length, int advice);
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
              unsigned long arg5);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int mprotect(void *addr, size_t length, int prot);
    """
)
_libc: Any = _ffi.dlopen(None)


# ------------------------------------------------------------------ discards


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): frees the file's pages in every mapping."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        errno = _ffi.errno
        raise OSError(errno, f"fallocate(PUNCH_HOLE) at {offset:#x}+{length:#x} failed")


def madvise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(_ffi.cast("void *", address), length, advice) != 0:
        errno = _ffi.errno
        raise OSError(errno, f"madvise({advice}) at {address:#x}+{length:#x} failed")


# ------------------------------------------------------------ raw mappings


def mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(NULL, ...): the mapping's start address; OSError on MAP_FAILED."""
    address = _libc.mmap(_ffi.NULL, length, prot, flags, fd, offset)
    if int(_ffi.cast("intptr_t", address)) == _MAP_FAILED:
        errno = _ffi.errno
        raise OSError(errno, f"mmap of {length:#x} bytes failed")
    return int(_ffi.cast("uintptr_t", address))


def munmap(address: int, length: int) -> None:
    if _libc.munmap(_ffi.cast("void *", address), length) != 0:
        errno = _ffi.errno
        raise OSError(errno, f"munmap at {address:#x}+{length:#x} failed")


def mprotect(address: int, length: int, prot: int) -> None:
    if _libc.mprotect(_ffi.cast("void *", address), length, prot) != 0:
        errno = _ffi.errno
        raise OSError(errno, f"mprotect({prot}) at {address:#x}+{length:#x} failed")


def memory_at(address: int, length: int) -> memoryview:
    """The bytes at a live mapping (from `mmap`), writable; unusable after munmap."""
    return memoryview(_ffi.buffer(_ffi.cast("char *", address), length))


def buffer_address(buffer: object) -> int:
    """Start address of a writable buffer (an mmap); holds no export afterwards."""
    pointer = _ffi.from_buffer(buffer, require_writable=True)  # type: ignore[call-overload]
    try:
        return int(_ffi.cast("uintptr_t", pointer))
    finally:
        _ffi.release(pointer)


# ------------------------------------------------------------------ timers


def precise_sleeps_for_this_thread() -> None:
    """Timer slack of 1 ns for the calling thread (default 50 us).

    Sleeps of injected delays and BQL holds otherwise overshoot by ~50-100 us
    each, which adds up over the 32 entries of a report.
    """
    _libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


# ------------------------------------------------------------------ fences

_FENCE = threading.Lock()


def full_fence() -> None:
    """A full memory barrier for ring index handshakes (EVENT_IDX).

    CPython cannot emit mfence, but acquiring and releasing a lock executes a
    locked read-modify-write (sem_post / atomic compare-exchange), which is a
    full barrier on x86 and a release/acquire pair elsewhere.
    """
    with _FENCE:
        pass
