"""Syscalls the standard library lacks, through cffi in ABI mode (no compiler).

The only place in the project that loads libc: every other module calls the
typed functions below (two of them through ctypes, to keep the GIL). cffi
releases the GIL around each call, so a long punch-hole on a queue's thread
does not stall the event loop, and mmap_lock contention threads hold the GIL
only between their syscalls.
Each wrapper reads errno right after its call and raises OSError with it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from errno import EFAULT
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


# ------------------------------------------------------- copies that fail

# process_vm_readv/writev on our own pid copy through the kernel's page
# walk: a page that would SIGBUS on a plain load (a shared file truncated
# under its mapping, a hugetlbfs pool with no page left) makes the call fail
# with EFAULT instead, and no signal is sent. These two go through ctypes'
# PyDLL, which keeps the GIL: they take a microsecond or two, and handing
# the GIL to another thread and winning it back cost ~20 us a call here
# (a report makes several), where cffi would release it around each call.


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


_IOVEC_P = ctypes.POINTER(_IoVec)
_pylibc = ctypes.PyDLL(None, use_errno=True)
_process_vm: dict[str, Any] = {}
for _name in ("process_vm_readv", "process_vm_writev"):
    _call = getattr(_pylibc, _name)
    _call.restype = ctypes.c_ssize_t
    _call.argtypes = [
        ctypes.c_int,
        _IOVEC_P,
        ctypes.c_ulong,
        _IOVEC_P,
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    _process_vm[_name] = _call


def _own_copy(name: str, local: int, address: int, length: int) -> None:
    local_iov = _IoVec(local, length)
    remote_iov = _IoVec(address, length)
    done = _process_vm[name](os.getpid(), local_iov, 1, remote_iov, 1, 0)
    if done != length:
        errno = ctypes.get_errno() if done < 0 else EFAULT
        raise OSError(errno, f"{name} of {length} bytes at {address:#x} failed (copied {done})")


def read_without_fault(address: int, length: int) -> bytes:
    """The bytes at `address` in this process; OSError, never SIGBUS, if unbacked."""
    local = ctypes.create_string_buffer(length)
    _own_copy("process_vm_readv", ctypes.addressof(local), address, length)
    return local.raw


def write_without_fault(address: int, data: bytes) -> None:
    """Store `data` at `address` in this process; OSError, never SIGBUS, if unbacked."""
    local = ctypes.create_string_buffer(data, len(data))
    _own_copy("process_vm_writev", ctypes.addressof(local), address, len(data))


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
