"""The pages a guest has ballooned, and what one inflate or deflate chain
asks of them.

An inflate or deflate chain is one or more driver-readable buffers holding
little-endian u32 page frame numbers of 4 KiB pages, whatever the host's page
size. Inflate: each new, valid PFN is marked ballooned, contiguous ones are
coalesced into ranges, and only whole discard granules (4 KiB on memfd, the
huge page on hugetlbfs) that are ballooned in full are discarded; a huge page
with some of its pieces ballooned is kept, counted as partial, and discarded
once its last piece arrives (QEMU keeps one such partial page; this keeps
them all). Deflate: nothing is freed, the pages are no longer ballooned.

Every PFN is checked as strictly as a report entry: outside guest RAM,
repeated in the chain, or already ballooned (inflate) or never ballooned
(deflate), it is counted and skipped, never discarded.

The ballooned set is a bitmap indexed by PFN, kept in 32 KiB chunks of one
GiB of guest address space each, only where pages are ballooned: at most
512 KiB for a 16 GiB guest, whatever its layout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vhost_balloon.backend.balloon.discard import DiscardTarget
from vhost_balloon.backend.vhost.mapping import FileIdentity, MappedRegion, MemoryMap
from vhost_balloon.protocol.errors import AddressError
from vhost_balloon.protocol.memory import GuestMemory, Space
from vhost_balloon.protocol.virtio import BALLOON_PFN_SHIFT
from vhost_balloon.protocol.virtqueue import Chain

PAGE = 1 << BALLOON_PFN_SHIFT
PFN_BYTES = 4
CHUNK_SHIFT = 18  # PFNs per bitmap chunk: 2**18 pages of 4 KiB, 1 GiB
CHUNK_MASK = (1 << CHUNK_SHIFT) - 1
CHUNK_BYTES = 1 << (CHUNK_SHIFT - 3)
# Linux sends at most 256 PFNs a chain (VIRTIO_BALLOON_ARRAY_PFNS_MAX); a
# chain may be longer, but not without bound: its PFNs are read in one go.
MAX_CHAIN_BYTES = 1 << 20


class BadChain(ValueError):
    """An inflate or deflate chain that is not an array of PFNs: acked, and
    nothing in it is ballooned, discarded or given back."""


def read_pfns(chain: Chain, memory: GuestMemory) -> list[int]:
    """The chain's PFNs, in order; raises BadChain."""
    total = 0
    parts: list[bytes] = []
    for descriptor in chain.descriptors:
        if descriptor.writable:
            raise BadChain("a device-writable buffer (PFN arrays are driver-readable)")
        if descriptor.length % PFN_BYTES:
            raise BadChain(f"a buffer of {descriptor.length} bytes, not a whole number of PFNs")
        total += descriptor.length
        if total > MAX_CHAIN_BYTES:
            raise BadChain(f"more than {MAX_CHAIN_BYTES} bytes of PFNs in one chain")
        try:
            parts.append(memory.read(descriptor.addr, descriptor.length, Space.GPA))
        except AddressError as error:
            raise BadChain(f"a PFN buffer outside guest RAM: {error}") from None
    data = b"".join(parts)
    return list(struct.unpack(f"<{len(data) // PFN_BYTES}I", data))


@dataclass(slots=True)
class BalloonPlan:
    """What one inflate or deflate chain does. `targets` and `files` have the
    meaning they have in a ReportPlan: what to discard, and the files to
    account freed bytes in."""

    pfns: int = 0  # in the chain
    pages: int = 0  # newly ballooned (inflate) or given back (deflate)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # those pages, coalesced (gpa, len)
    targets: list[DiscardTarget] = field(default_factory=list)
    files: dict[FileIdentity, int] = field(default_factory=dict)
    skipped_outside: int = 0  # PFNs outside guest RAM
    skipped_unaligned: int = 0  # in a region whose pages are not the file's pages
    duplicates: int = 0  # repeated in the chain, or inflated twice
    unknown: int = 0  # deflated but never inflated
    partial_granules: int = 0  # huge pages this chain left partly ballooned


class BalloonedPages:
    """The set of ballooned 4 KiB pages of one device, and the huge pages
    that are only partly ballooned."""

    def __init__(self) -> None:
        # Sparse: one 32 KiB bitmap per GiB of guest address space that holds
        # a ballooned page, so a region far up the address space (hotplug,
        # device memory, a hostile front-end) costs 32 KiB, not 32 KiB per
        # GiB below it.
        self._chunks: dict[int, bytearray] = {}
        self.count = 0
        self._partial: set[int] = set()  # gpa of each partly ballooned granule

    @property
    def partial_granules(self) -> int:
        return len(self._partial)

    def clear(self) -> None:
        """The driver was reset: it owns every page again."""
        self._chunks.clear()
        self.count = 0
        self._partial.clear()

    def __contains__(self, pfn: int) -> bool:
        chunk = self._chunks.get(pfn >> CHUNK_SHIFT)
        bit = pfn & CHUNK_MASK
        return chunk is not None and bool(chunk[bit >> 3] >> (bit & 7) & 1)

    def _add(self, pfn: int) -> None:
        chunk = self._chunks.get(pfn >> CHUNK_SHIFT)
        if chunk is None:
            chunk = self._chunks[pfn >> CHUNK_SHIFT] = bytearray(CHUNK_BYTES)
        bit = pfn & CHUNK_MASK
        chunk[bit >> 3] |= 1 << (bit & 7)
        self.count += 1

    def _remove(self, pfn: int) -> None:
        chunk = self._chunks[pfn >> CHUNK_SHIFT]
        bit = pfn & CHUNK_MASK
        chunk[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
        self.count -= 1
        if not self.count:
            self._chunks.clear()  # an empty balloon holds nothing

    def _slice(self, first_pfn: int, pages: int) -> bytes | None:
        """The bitmap bytes of a byte-aligned range inside one chunk; None if
        the range is not so (then it is checked page by page)."""
        if (
            first_pfn & 7
            or pages & 7
            or first_pfn >> CHUNK_SHIFT != (first_pfn + pages - 1) >> CHUNK_SHIFT
        ):
            return None
        chunk = self._chunks.get(first_pfn >> CHUNK_SHIFT)
        if chunk is None:
            return bytes(pages >> 3)
        start = (first_pfn & CHUNK_MASK) >> 3
        return bytes(chunk[start : start + (pages >> 3)])

    def _all(self, first_pfn: int, pages: int) -> bool:
        """Every page of a granule ballooned."""
        bits = self._slice(first_pfn, pages)
        if bits is None:
            return all(pfn in self for pfn in range(first_pfn, first_pfn + pages))
        return bits == b"\xff" * len(bits)

    def _any(self, first_pfn: int, pages: int) -> bool:
        bits = self._slice(first_pfn, pages)
        if bits is None:
            return any(pfn in self for pfn in range(first_pfn, first_pfn + pages))
        return any(bits)

    # -- one chain ---------------------------------------------------------------

    def _valid(
        self, pfns: list[int], memory_map: MemoryMap, plan: BalloonPlan
    ) -> dict[int, list[int]]:
        """The chain's PFNs in guest RAM, once each, by region index."""
        table = memory_map.memory.table if memory_map.regions else None
        seen: set[int] = set()
        by_region: dict[int, list[int]] = {}
        for pfn in pfns:
            if pfn in seen:
                plan.duplicates += 1
                continue
            seen.add(pfn)
            if table is None:
                plan.skipped_outside += 1
                continue
            try:
                index, _ = table.find(pfn << BALLOON_PFN_SHIFT, PAGE, Space.GPA)
            except AddressError:
                plan.skipped_outside += 1
                continue
            region = table.regions[index]
            if (region.mmap_offset - region.guest_phys_addr) % PAGE:
                # The page is not a page of the file (a front-end's odd region):
                # a discard would cut into its neighbour.
                plan.skipped_unaligned += 1
                continue
            by_region.setdefault(index, []).append(pfn)
        return by_region

    def inflate(self, pfns: list[int], memory_map: MemoryMap) -> BalloonPlan:
        plan = BalloonPlan(pfns=len(pfns))
        for index, valid in self._valid(pfns, memory_map, plan).items():
            new = []
            for pfn in valid:
                if pfn in self:
                    plan.duplicates += 1
                    continue
                self._add(pfn)
                new.append(pfn)
            plan.pages += len(new)
            runs = coalesce(new)
            plan.ranges += [(first << BALLOON_PFN_SHIFT, count * PAGE) for first, count in runs]
            self._plan_discards(memory_map.regions[index], runs, plan)
        return plan

    def deflate(self, pfns: list[int], memory_map: MemoryMap) -> BalloonPlan:
        plan = BalloonPlan(pfns=len(pfns))
        for index, valid in self._valid(pfns, memory_map, plan).items():
            mapped = memory_map.regions[index]
            given_back = []
            for pfn in valid:
                if pfn not in self:
                    plan.unknown += 1
                    continue
                self._remove(pfn)
                given_back.append(pfn)
            plan.pages += len(given_back)
            runs = coalesce(given_back)
            plan.ranges += [(first << BALLOON_PFN_SHIFT, count * PAGE) for first, count in runs]
            if mapped.granularity > PAGE:
                # A discarded huge page whose piece is back is partly ballooned
                # again (the guest's touch refaults all of it).
                for gpa, pages in _granules(mapped, runs):
                    first = gpa >> BALLOON_PFN_SHIFT
                    if self._any(first, pages):
                        self._partial.add(gpa)
                    else:
                        self._partial.discard(gpa)
        return plan

    def _plan_discards(
        self, mapped: MappedRegion, runs: list[tuple[int, int]], plan: BalloonPlan
    ) -> None:
        region = mapped.region
        fd = mapped.fd
        assert fd is not None
        if mapped.granularity == PAGE:
            pieces = [(first << BALLOON_PFN_SHIFT, count * PAGE) for first, count in runs]
        else:
            pieces = []
            for gpa, pages in _granules(mapped, runs):
                if self._all(gpa >> BALLOON_PFN_SHIFT, pages):
                    self._partial.discard(gpa)
                    if pieces and pieces[-1][0] + pieces[-1][1] == gpa:
                        pieces[-1] = (pieces[-1][0], pieces[-1][1] + pages * PAGE)
                    else:
                        pieces.append((gpa, pages * PAGE))
                else:
                    self._partial.add(gpa)
                    plan.partial_granules += 1
        for gpa, length in pieces:
            file_offset = region.mmap_offset + gpa - region.guest_phys_addr
            plan.targets.append(
                DiscardTarget(
                    gpa, length, fd, file_offset, mapped.address + file_offset, mapped.identity
                )
            )
        if pieces:
            plan.files.setdefault(mapped.identity, fd)


def coalesce(pfns: list[int]) -> list[tuple[int, int]]:
    """Runs of contiguous PFNs, (first, count), in ascending order."""
    runs: list[tuple[int, int]] = []
    for pfn in sorted(pfns):
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs


def _granules(mapped: MappedRegion, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The discard granules (gpa, pages) of the region that the runs touch,
    each once, in order; only granules wholly inside the region."""
    region = mapped.region
    size = mapped.granularity
    # Granules are aligned in the file (what fallocate frees), not in GPA.
    shift = region.mmap_offset - region.guest_phys_addr
    start_gpa, end_gpa = region.guest_phys_addr, region.guest_phys_addr + region.size
    found: list[tuple[int, int]] = []
    for first, count in runs:
        offset = (first << BALLOON_PFN_SHIFT) + shift
        end = offset + count * PAGE
        granule = offset - offset % size
        while granule < end:
            gpa = granule - shift
            if start_gpa <= gpa and gpa + size <= end_gpa and (not found or found[-1][0] != gpa):
                found.append((gpa, size // PAGE))
            granule += size
    return found
