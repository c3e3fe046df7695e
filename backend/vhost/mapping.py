"""Guest memory regions received from the front-end, mapped MAP_SHARED.

Each `MappedRegion` owns exactly one received fd and its mapping (invariant
4: every fd is kept in one owner or closed). The backend only ever touches
rings and descriptor tables through these mappings (invariant 3); discards go
through the fd (punch-hole) or the mapping's address (madvise).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vhost_balloon.backend.libc import buffer_address, read_without_fault, write_without_fault
from vhost_balloon.protocol.errors import MemoryFault
from vhost_balloon.protocol.memory import (
    GuardedBuffer,
    GuestMemory,
    Region,
    RegionBuffer,
    RegionTable,
)
from vhost_balloon.protocol.vhost_user import MemoryRegionDesc

PAGE_SIZE = mmap.PAGESIZE


class MappingError(Exception):
    """A region the front-end sent that cannot be mapped safely."""


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Which file a region lives in: several regions may share one memfd."""

    device: int
    inode: int


class GuardedRegion(GuardedBuffer):
    """A region's bytes reached by copies that fail rather than fault.

    For files the front-end can shrink under our mapping: a plain load from a
    truncated page would SIGBUS the process and every session in it, these
    copies raise MemoryFault and only this session ends. The price is one
    syscall (about 3 us) per ring access, paid only by such regions.
    """

    def __init__(self, address: int, size: int) -> None:
        self._address = address
        self._size = size
        self._closed = False

    def __len__(self) -> int:
        return self._size

    def _at(self, offset: int, length: int) -> int:
        # Like a released memoryview: a queue still holding the region after
        # close gets ValueError, never a copy from whatever is mapped there now.
        if self._closed:
            raise ValueError("guest memory region was unmapped")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"{offset:#x}+{length:#x} is outside the region")
        return self._address + offset

    def read(self, offset: int, length: int) -> bytes:
        address = self._at(offset, length)
        try:
            return read_without_fault(address, length)
        except OSError as error:
            raise MemoryFault(f"guest memory at region offset {offset:#x}: {error}") from None

    def write(self, offset: int, data: bytes) -> None:
        address = self._at(offset, len(data))
        try:
            write_without_fault(address, data)
        except OSError as error:
            raise MemoryFault(f"guest memory at region offset {offset:#x}: {error}") from None

    def close(self) -> None:
        self._closed = True


class MappedRegion:
    """One region: its fd, a MAP_SHARED mapping from file offset 0, metadata."""

    def __init__(self, desc: MemoryRegionDesc, fd: int, *, allow_unsealed: bool = False) -> None:
        """Takes ownership of `fd`: it is closed here if the region is refused."""
        try:
            self._map(desc, fd, allow_unsealed)
        except BaseException:
            os.close(fd)
            raise

    def _map(self, desc: MemoryRegionDesc, fd: int, allow_unsealed: bool) -> None:
        self.region = Region(
            desc.guest_phys_addr, desc.memory_size, desc.userspace_addr, desc.mmap_offset
        )
        self.fd: int | None = fd
        self.region.validate()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MappingError("region fd is not a regular file or memfd")
        end = desc.mmap_offset + desc.memory_size
        if info.st_size < end:
            # Touching a page past EOF would SIGBUS the whole backend.
            raise MappingError(
                f"region needs file bytes up to {end:#x} but the file has {info.st_size:#x}"
            )
        self.identity = FileIdentity(info.st_dev, info.st_ino)
        # Discards must be whole blocks of the file system: 4 KiB on tmpfs and
        # memfd, the huge page size on hugetlbfs (a smaller punch frees nothing).
        self.granularity = max(PAGE_SIZE, os.fstatvfs(fd).f_bsize)
        seals = _seals(fd)
        self.sealable = seals is not None
        self.sealed_against_shrink = seals is not None and bool(seals & fcntl.F_SEAL_SHRINK)
        if self.sealable and not self.sealed_against_shrink and not allow_unsealed:
            # Ring access past a truncated end would SIGBUS the whole process.
            raise MappingError(
                "the memfd is not sealed against shrinking (F_SEAL_SHRINK), so the "
                "front-end could truncate it and crash the backend; QEMU's "
                "memory-backend-memfd seals by default (or serve with "
                "--allow-unsealed-memory)"
            )
        try:
            # Map from offset 0 like libvhost-user: mmap_offset need not be
            # aligned to the (huge) page size, offset 0 always is.
            self.mapping: mmap.mmap | None = mmap.mmap(
                fd, end, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except (OSError, OverflowError, ValueError) as error:
            raise MappingError(f"mmap of {end:#x} bytes failed: {error}") from None
        self.address = buffer_address(self.mapping)
        # The region's bytes. Released on close: a queue still holding it
        # then gets ValueError, never a stale pointer.
        self.view: memoryview = memoryview(self.mapping)[desc.mmap_offset : end]
        # What rings, balloon and stats buffers are read through: the plain
        # view where the file cannot shrink (a sealed memfd), else copies
        # that fail with MemoryFault instead of SIGBUS.
        self.guarded: GuardedRegion | None = None
        if not self.sealed_against_shrink:
            self.guarded = GuardedRegion(self.address + desc.mmap_offset, desc.memory_size)
        self.ring_bytes: RegionBuffer = self.view if self.guarded is None else self.guarded

    def close(self) -> None:
        if self.guarded is not None:
            self.guarded.close()
        self.view.release()
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def matches(self, desc: MemoryRegionDesc) -> bool:
        return (
            self.region.guest_phys_addr == desc.guest_phys_addr
            and self.region.size == desc.memory_size
            and self.region.userspace_addr == desc.userspace_addr
        )


def _seals(fd: int) -> int | None:
    """A memfd's seals, or None for any other file.

    Only memfds can be sealed; hugetlbfs and tmpfs files answer F_GET_SEALS
    too (with F_SEAL_SEAL), but nothing could ever seal them, so they are not
    held to it.
    """
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
            return None
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return None


class MemoryMap:
    """The current set of mapped regions of one session."""

    def __init__(self, regions: Sequence[MappedRegion] = ()) -> None:
        self.regions: list[MappedRegion] = list(regions)
        self._memory: GuestMemory | None = None

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def memory(self) -> GuestMemory:
        """Guest memory over the mappings (rebuilt after each change)."""
        if self._memory is None:
            table = RegionTable([r.region for r in self.regions])
            self._memory = GuestMemory(table, [r.ring_bytes for r in self.regions])
        return self._memory

    def add(self, region: MappedRegion) -> None:
        RegionTable([r.region for r in [*self.regions, region]])  # validates overlap
        self.regions.append(region)
        self._memory = None

    def remove(self, desc: MemoryRegionDesc) -> MappedRegion | None:
        for mapped in self.regions:
            if mapped.matches(desc):
                self.regions.remove(mapped)
                self._memory = None
                return mapped
        return None

    def close(self) -> None:
        close_all(self.regions)
        self.regions = []
        self._memory = None


def close_all(regions: Iterable[MappedRegion]) -> None:
    for region in regions:
        region.close()
