"""Guest RAM: one memfd, mapped MAP_SHARED, cut into 1..8 regions.

Like QEMU's `memory-backend-memfd,share=on`: every region is a window of
the SAME memfd at its own file offset (`mmap_offset`), each handed to the
back-end with its own fd (a dup of the memfd). With more than one region
the later ones sit at higher guest-physical addresses with a hole before
them, as q35 does above 4 GiB. `userspace_addr` is the real virtual address
of this process's mapping, which is what a front-end puts in the memory
table and in SET_VRING_ADDR.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from vhost_balloon.guest.errors import ConfigError
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable
from vhost_balloon.protocol.units import MAX_GUEST_MEMORY, format_size
from vhost_balloon.protocol.vhost_user import MAX_MEM_REGIONS, MemoryRegionDesc

PAGE_SIZE = 4096
# Region sizes and guest-physical bases are multiples of this, so order-10
# (4 MiB) buddy blocks are aligned in both address spaces.
REGION_ALIGN = 4 << 20
# Hole between regions: with two regions of 2 GiB this puts the second at
# 4 GiB, exactly like q35 with `-m 4G`.
DEFAULT_GAP = 2 << 30


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@dataclass(frozen=True, slots=True)
class RamRegion:
    """One region: where it is in each address space, and its own fd."""

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int
    fd: int

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size

    def desc(self) -> MemoryRegionDesc:
        return MemoryRegionDesc(
            self.guest_phys_addr, self.size, self.userspace_addr, self.mmap_offset
        )


def split_sizes(total: int, count: int) -> list[int]:
    """Region sizes: equal REGION_ALIGN multiples, the remainder in the last."""
    if not 1 <= count <= MAX_MEM_REGIONS:
        raise ConfigError(f"regions must be between 1 and {MAX_MEM_REGIONS}, got {count}")
    if not 0 < total <= MAX_GUEST_MEMORY:
        raise ConfigError(
            f"memory size {total} is not between 1 byte and {format_size(MAX_GUEST_MEMORY)}"
        )
    if total % PAGE_SIZE:
        raise ConfigError(f"memory size {total} is not a multiple of {PAGE_SIZE}")
    each = total // count // REGION_ALIGN * REGION_ALIGN
    if each == 0:
        raise ConfigError(
            f"memory size {total} is too small for {count} regions of at least 4 MiB each"
        )
    return [each] * (count - 1) + [total - each * (count - 1)]


def _mapping_address(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the buffer export so the mmap can be closed


class GuestRam:
    """A memfd of `size` bytes seen as `regions` guest-physical regions."""

    def __init__(
        self,
        size: int,
        *,
        regions: int = 1,
        gap: int = DEFAULT_GAP,
        seal: bool = True,
        name: str = "vhost-balloon-guest-ram",
    ) -> None:
        sizes = split_sizes(size, regions)
        if gap < 0 or gap % REGION_ALIGN:
            raise ConfigError(f"region gap {gap} is not a non-negative multiple of 4 MiB")
        self.size = size
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._mappings: list[mmap.mmap] = []
        self._regions: list[RamRegion] = []
        try:
            os.ftruncate(self._fd, size)
            if seal:
                # Like QEMU's memory-backend-memfd (seal=on): the size is fixed,
                # so no process can truncate RAM under another's mapping.
                # Punching holes stays allowed.
                fcntl.fcntl(
                    self._fd,
                    fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
                )
            self._map(sizes, gap)
        except BaseException:
            self.close()
            raise
        table = RegionTable(
            [
                Region(r.guest_phys_addr, r.size, r.userspace_addr, r.mmap_offset)
                for r in self.regions
            ]
        )
        self.memory = GuestMemory(table, self._mappings)

    def _map(self, sizes: Sequence[int], gap: int) -> None:
        gpa, offset = 0, 0
        for region_size in sizes:
            mapping = mmap.mmap(
                self._fd,
                region_size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=offset,
            )
            self._mappings.append(mapping)
            fd = os.dup(self._fd)  # non-inheritable, like every fd Python creates
            self._regions.append(RamRegion(gpa, region_size, _mapping_address(mapping), offset, fd))
            offset += region_size
            gpa = _align_up(gpa + region_size + gap, REGION_ALIGN)

    @property
    def regions(self) -> tuple[RamRegion, ...]:
        return tuple(self._regions)

    @property
    def fd(self) -> int:
        """The memfd itself (region fds are dups of it)."""
        return self._fd

    @property
    def table(self) -> RegionTable:
        return self.memory.table

    @property
    def mappings(self) -> tuple[mmap.mmap, ...]:
        return tuple(self._mappings)

    def descs(self) -> list[MemoryRegionDesc]:
        return [region.desc() for region in self.regions]

    def region_fds(self) -> list[int]:
        return [region.fd for region in self.regions]

    def allocated_bytes(self) -> int:
        """Bytes the host really holds for guest RAM (the memfd's blocks)."""
        return os.fstat(self._fd).st_blocks * 512

    def locate(self, gpa: int, length: int) -> tuple[mmap.mmap, int]:
        """This process's mapping holding [gpa, gpa+length) and the offset in it."""
        index, offset = self.table.find(gpa, length)
        return self._mappings[index], offset

    def file_offset(self, gpa: int, length: int = 1) -> int:
        index, offset = self.table.find(gpa, length)
        return self.regions[index].mmap_offset + offset

    def pread_into(self, gpa: int, buffer: bytearray) -> None:
        """Read guest RAM through the memfd (not the mapping).

        A read fault on a hole of a shared shmem mapping allocates a page;
        pread of a hole returns zeros without allocating, so reading back
        discarded memory this way does not undo the discard.
        """
        offset = self.file_offset(gpa, len(buffer))
        done = 0
        view = memoryview(buffer)
        try:
            while done < len(buffer):
                count = os.preadv(self._fd, [view[done:]], offset + done)
                if count == 0:
                    raise OSError(f"short read of guest RAM at gpa {gpa + done:#x}")
                done += count
        finally:
            view.release()

    def close(self) -> None:
        """Unmap every region and close every fd (idempotent)."""
        for mapping in self._mappings:
            mapping.close()
        self._mappings = []
        for region in self._regions:
            os.close(region.fd)
        self._regions = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
