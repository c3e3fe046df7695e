"""A model of Linux's free page reporting driver.

What drivers/virtio/virtio_balloon.c and mm/page_reporting.c do, reduced to
what the device can observe: negotiate VERSION_1 and REPORTING (plus
INDIRECT_DESC, EVENT_IDX and PAGE_POISON when asked for and offered), set up
inflate, deflate and reporting queues, then report one chain of 1..capacity
device-writable buffers of `4096 << order` bytes at a time and wait for the
device to return it. Exactly one report is in flight, as in Linux.

Around each report the model measures what a researcher wants to know:

- the hold window: `time.monotonic_ns()` from the chain being made
  available (avail.idx published) to seeing its used entry;
- what the host really freed: the memfd's allocated bytes before and after;
- what the guest reads back from the reported ranges (zeros after
  punch-hole or MADV_REMOVE, its own data after MADV_DONTNEED or none),
  sampled through the memfd so the read does not re-allocate the pages;
- that memory it did NOT report still holds what it wrote: the integrity
  region and a guard page on each side of every reported range.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vhost_balloon.guest.errors import (
    ConfigError,
    DriverError,
    ReplyTimeoutError,
    ReportTimeoutError,
)
from vhost_balloon.guest.frontend import VhostUserFrontend
from vhost_balloon.guest.layout import PAGE_SIZE, Block, GuestLayout, plan_layout
from vhost_balloon.guest.ram import GuestRam
from vhost_balloon.protocol.errors import QueueError
from vhost_balloon.protocol.virtio import (
    BALLOON_F_DEFLATE_ON_OOM,
    BALLOON_F_MUST_TELL_HOST,
    BALLOON_F_PAGE_POISON,
    BALLOON_F_REPORTING,
    BALLOON_F_STATS_VQ,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    PAGE_REPORTING_CAPACITY,
    BalloonConfig,
    BalloonQueues,
    balloon_queues,
    describe_features,
    feature_mask,
    feature_name,
    has_feature,
)
from vhost_balloon.protocol.virtqueue import Buffer, DriverQueue

FILL_BYTE = 0xA5
INTEGRITY_MAGIC = 0x5649_4E54_4547_5249  # "VINTEGRI"
GUARD_MAGIC = 0x4755_4152_4450_4147  # "GUARDPAG"
_STAMP = struct.Struct("<QQ")
_SAMPLE_STEP = PAGE_SIZE // 8  # one u64 per 4 KiB page


def _page_stamp(gpa: int, magic: int) -> bytes:
    return _STAMP.pack(gpa, magic) * (PAGE_SIZE // _STAMP.size)


@dataclass(frozen=True, slots=True)
class DriverConfig:
    """What the modelled guest kernel does (page_reporting knobs and more)."""

    capacity: int = PAGE_REPORTING_CAPACITY
    entries: int | None = None  # entries per report; None = capacity
    order: int = 9
    queue_size: int = 64
    indirect: bool = True
    event_idx: bool = True
    page_poison: bool = False
    poison_val: int = 0
    integrity_bytes: int = 4 << 20
    report_timeout: float = 10.0
    sample_zeros: bool = True
    # Write each block before reporting it (a guest that used its pages).
    # False: the pages stay as the last discard left them, so a run measures
    # the report path without the guest's own 64 MiB memset before each report.
    populate: bool = True
    # The classic balloon (guest/balloon.py) beside reporting. `balloon` runs
    # it with no optional feature; each feature below implies it. STATS_VQ
    # adds a queue, so a device that does not offer it is refused;
    # MUST_TELL_HOST and DEFLATE_ON_OOM are accepted only when offered.
    balloon: bool = False
    must_tell_host: bool = False
    deflate_on_oom: bool = False
    stats: bool = False
    # Write a pattern into each page before inflating it, so a test can see
    # that the host freed it (False: inflate pages as they are).
    balloon_fill: bool = True

    @property
    def entries_per_report(self) -> int:
        return self.capacity if self.entries is None else self.entries

    def validate(self) -> None:
        if self.capacity < 1:
            raise ConfigError(f"capacity must be at least 1, got {self.capacity}")
        if not 1 <= self.entries_per_report <= self.capacity:
            raise ConfigError(
                f"entries per report must be between 1 and the capacity {self.capacity}"
            )
        if self.queue_size < self.capacity:
            raise ConfigError(
                f"queue size {self.queue_size} is smaller than the capacity {self.capacity} "
                "(Linux refuses to probe with -ENOSPC)"
            )
        if self.report_timeout <= 0:
            raise ConfigError("the report timeout must be positive")

    @property
    def uses_balloon(self) -> bool:
        """Whether the mocked guest runs the inflate/deflate (and stats) driver."""
        return self.balloon or self.must_tell_host or self.deflate_on_oom or self.stats

    @property
    def wanted_features(self) -> int:
        optional = (
            (F_INDIRECT_DESC, self.indirect),
            (F_EVENT_IDX, self.event_idx),
            (BALLOON_F_PAGE_POISON, self.page_poison),
            (BALLOON_F_MUST_TELL_HOST, self.must_tell_host),
            (BALLOON_F_DEFLATE_ON_OOM, self.deflate_on_oom),
            (BALLOON_F_STATS_VQ, self.stats),
        )
        return feature_mask(F_VERSION_1, BALLOON_F_REPORTING, *(bit for bit, on in optional if on))

    @property
    def queue_count(self) -> int:
        """Queues the driver creates: only STATS_VQ of its optional features adds one.

        The front-end announces this count before negotiation, so it is
        computed from what the driver wants; negotiate() refuses a device
        that does not offer STATS_VQ when it is wanted.
        """
        return balloon_queues(self.wanted_features).count


@dataclass(frozen=True, slots=True)
class ReportResult:
    """One report, as the guest measured it."""

    seq: int
    gpas: tuple[int, ...]
    entry_size: int
    indirect: bool
    kicked: bool
    calls: int  # call-eventfd wake-ups until the used entry was seen
    available_ns: int  # monotonic time the chain was made available
    hold_ns: int
    used_len: int
    allocated_before: int
    allocated_after: int
    zeroed_bytes: int
    integrity_errors: int  # newly corrupted pages found after this report

    @property
    def entries(self) -> int:
        return len(self.gpas)

    @property
    def reported_bytes(self) -> int:
        return self.entry_size * len(self.gpas)

    @property
    def freed_bytes(self) -> int:
        return self.allocated_before - self.allocated_after

    def to_dict(self) -> dict[str, int | bool | list[int]]:
        """One JSON line per report (for traces next to the back-end's)."""
        return {
            "seq": self.seq,
            "entries": self.entries,
            "entry_bytes": self.entry_size,
            "gpas": list(self.gpas),
            "indirect": self.indirect,
            "kicked": self.kicked,
            "calls": self.calls,
            "available_ns": self.available_ns,
            "hold_ns": self.hold_ns,
            "used_len": self.used_len,
            "reported_bytes": self.reported_bytes,
            "allocated_before": self.allocated_before,
            "allocated_after": self.allocated_after,
            "freed_bytes": self.freed_bytes,
            "zeroed_bytes": self.zeroed_bytes,
            "integrity_errors": self.integrity_errors,
        }


@dataclass(frozen=True, slots=True)
class Submitted:
    """One chain's trip through the device, on the guest's monotonic clock."""

    available_ns: int
    used_ns: int
    used_len: int
    calls: int
    kicked: bool

    @property
    def hold_ns(self) -> int:
        """The hold window as the driver sees it: chain made available .. used entry seen."""
        return self.used_ns - self.available_ns


@dataclass(slots=True)
class RunResult:
    """Every report of a run plus what the driver negotiated and checked."""

    reports: list[ReportResult] = field(default_factory=list)
    duration_s: float = 0.0
    integrity_ok: bool = True
    integrity_errors: int = 0


class ReportingDriver:
    """The virtio-balloon driver with only free page reporting in use."""

    def __init__(self, frontend: VhostUserFrontend, ram: GuestRam, config: DriverConfig) -> None:
        config.validate()
        if frontend.options.num_queues != config.queue_count:
            raise ConfigError(
                f"the front-end was set up for {frontend.options.num_queues} queues, "
                f"the driver creates {config.queue_count}"
            )
        self.frontend = frontend
        self.ram = ram
        self.config = config
        self.layout: GuestLayout = plan_layout(
            ram.table.regions,
            queues=config.queue_count,
            queue_size=config.queue_size,
            capacity=config.capacity,
            order=config.order,
            integrity_bytes=config.integrity_bytes,
            min_blocks=config.entries_per_report,
        )
        self.accepted_features = 0
        self.queues: BalloonQueues | None = None
        self._vqs: list[DriverQueue] = []
        self.device_config: BalloonConfig | None = None
        self._cursor = 0
        self._seq = 0
        self._fill = bytes([FILL_BYTE]) * self.layout.block_size
        self._sample_buffer = bytearray(self.layout.block_size)
        self._integrity_expected = b""
        self.corrupted_pages: set[int] = set()
        self.kicks = 0
        self.calls = 0
        # Block gpas the balloon holds (any page inflated): out of rotation
        # until all their pages are deflated. The balloon owns this set.
        self.held_blocks: set[int] = set()
        # Block gpas of the report in flight and of its guard pages, which the
        # balloon must not take (Linux isolates pages being reported from the
        # buddy allocator; the guards are read back after the report).
        self.reporting_blocks: set[int] = set()
        self.populated_bytes = 0  # bytes written before reports (a fault count proxy)

    # -- probe ------------------------------------------------------------------

    @property
    def reporting_queue(self) -> int:
        if self.queues is None or self.queues.reporting is None:
            raise DriverError("the driver has not been probed")
        return self.queues.reporting

    def queue(self, index: int) -> DriverQueue:
        """The driver side of queue `index` (tests use it to post crafted chains)."""
        return self._vqs[index]

    @property
    def use_indirect(self) -> bool:
        return self.config.indirect and has_feature(self.accepted_features, F_INDIRECT_DESC)

    @property
    def event_idx(self) -> bool:
        return has_feature(self.accepted_features, F_EVENT_IDX)

    def negotiate(self, offered: int) -> int:
        """Accept what the driver wants and the device offers (VERSION_1, REPORTING needed)."""
        # STATS_VQ changes the queue numbering the front-end already set up
        # (reporting moves from 2 to 3): needed as much as REPORTING is.
        required = [F_VERSION_1, BALLOON_F_REPORTING]
        if self.config.stats:
            required.append(BALLOON_F_STATS_VQ)
        for bit in required:
            if not has_feature(offered, bit):
                raise DriverError(
                    f"the device does not offer {feature_name(bit)} "
                    f"(it offers {describe_features(offered)})"
                )
        if self.config.page_poison and not has_feature(offered, BALLOON_F_PAGE_POISON):
            # virtballoon_validate: a guest that poisons or inits freed pages
            # turns REPORTING off when the device cannot honour poison_val.
            raise DriverError(
                "the device does not offer PAGE_POISON, so a poisoning guest turns "
                "free page reporting off"
            )
        accepted = self.config.wanted_features & offered
        queues = balloon_queues(accepted)
        if queues.count != self.config.queue_count:
            raise DriverError(
                f"{queues.count} queues for the accepted features, "
                f"expected {self.config.queue_count}"
            )
        self.accepted_features = accepted
        self.queues = queues
        return accepted

    async def probe(self) -> None:
        """Negotiate, build the rings, start the device, write the integrity region."""
        self.negotiate(self.frontend.device_features)
        for ring in self.layout.rings:
            self._vqs.append(DriverQueue(self.ram.memory, ring, event_idx=self.event_idx))
        self._write_integrity_region()
        self.device_config = await self.frontend.start(
            self.accepted_features, self.ram, self.layout.rings
        )
        if has_feature(self.accepted_features, BALLOON_F_PAGE_POISON) and self.device_config:
            # Linux writes poison_val (0 when only init_on_free is on); the
            # generic vhost-user device forwards the whole config buffer.
            config = BalloonConfig(
                self.device_config.num_pages,
                self.device_config.actual,
                self.device_config.free_page_hint_cmd_id,
                self.config.poison_val,
            )
            await self.frontend.set_config(config.encode())
            self.device_config = config

    def _write_integrity_region(self) -> None:
        layout = self.layout
        self._integrity_expected = b"".join(
            _page_stamp(gpa, INTEGRITY_MAGIC)
            for gpa in range(layout.integrity_gpa, layout.integrity_end, PAGE_SIZE)
        )
        if layout.integrity_size:
            self.ram.memory.write(layout.integrity_gpa, self._integrity_expected)

    # -- one report -------------------------------------------------------------

    def _next_blocks(self) -> list[Block]:
        """The next blocks in rotation, skipping those the balloon holds."""
        blocks = self.layout.blocks
        wanted = self.config.entries_per_report
        held = self.held_blocks
        if len(blocks) - len(held) < wanted:
            raise DriverError(
                f"{len(held)} of {len(blocks)} blocks are ballooned, leaving "
                f"{len(blocks) - len(held)} for a report of {wanted} entries: "
                "deflate the balloon or give the guest more memory"
            )
        chosen: list[Block] = []
        # At most one pass over the rotation: enough unheld blocks exist, and
        # no block is chosen twice in one report.
        while len(chosen) < wanted:
            block = blocks[self._cursor]
            self._cursor = (self._cursor + 1) % len(blocks)
            if block.gpa not in held:
                chosen.append(block)
        return chosen

    def _in_held_block(self, gpa: int) -> bool:
        # Blocks are aligned to their size in guest-physical space.
        size = self.layout.block_size
        return bool(self.held_blocks) and gpa // size * size in self.held_blocks

    def _guards(self, blocks: list[Block], seq: int) -> list[tuple[int, bytes]]:
        """Guard pages around each reported range that this report does not cover."""
        size = self.layout.block_size
        starts = {block.gpa for block in blocks}
        regions = self.ram.table.regions
        guards: list[tuple[int, bytes]] = []
        for block in blocks:
            region = regions[block.region]
            for gpa, neighbour in (
                (block.gpa - PAGE_SIZE, block.gpa - size),
                (block.gpa + size, block.gpa + size),
            ):
                if neighbour in starts:
                    continue
                if not region.guest_phys_addr <= gpa < region.guest_phys_addr + region.size:
                    continue
                if self.layout.in_integrity(gpa):
                    continue  # checked with the whole integrity region
                if self._in_held_block(gpa):
                    continue  # the guest does not touch ballooned memory
                guards.append((gpa, _STAMP.pack(gpa, GUARD_MAGIC ^ seq) * (PAGE_SIZE // 16)))
        return guards

    async def report(self) -> ReportResult:
        """Populate, report one chain, wait for it, then measure and verify."""
        blocks = self._next_blocks()
        seq = self._seq
        self._seq += 1
        guards = self._guards(blocks, seq)
        size = self.layout.block_size
        # Set before the first await: the balloon may run between our awaits.
        self.reporting_blocks = {block.gpa for block in blocks} | {
            gpa // size * size for gpa, _stamp in guards
        }
        try:
            return await self._report(seq, blocks, guards)
        finally:
            self.reporting_blocks = set()

    async def _report(
        self, seq: int, blocks: list[Block], guards: list[tuple[int, bytes]]
    ) -> ReportResult:
        size = self.layout.block_size
        for block in blocks if self.config.populate else ():
            mapping, offset = self.ram.locate(block.gpa, size)
            mapping[offset : offset + size] = self._fill
            self.populated_bytes += size
        for gpa, stamp in guards:
            mapping, offset = self.ram.locate(gpa, PAGE_SIZE)
            mapping[offset : offset + PAGE_SIZE] = stamp
        buffers = [Buffer(block.gpa, size, True) for block in blocks]
        indirect = self.use_indirect and len(buffers) > 1
        before = self.ram.allocated_bytes()
        submitted = await self.submit(buffers)
        available_ns, hold_ns = submitted.available_ns, submitted.hold_ns
        used_len, calls, kicked = submitted.used_len, submitted.calls, submitted.kicked

        after = self.ram.allocated_bytes()
        # Unwritten pages read as zeros whatever the device did: nothing to sample.
        sample = self.config.sample_zeros and self.config.populate
        zeroed = self._zeroed_bytes(blocks) if sample else 0
        new_errors = self._verify(guards)
        return ReportResult(
            seq=seq,
            gpas=tuple(block.gpa for block in blocks),
            entry_size=size,
            indirect=indirect,
            kicked=kicked,
            calls=calls,
            available_ns=available_ns,
            hold_ns=hold_ns,
            used_len=used_len,
            allocated_before=before,
            allocated_after=after,
            zeroed_bytes=zeroed,
            integrity_errors=new_errors,
        )

    async def submit(self, buffers: list[Buffer]) -> Submitted:
        """Make one chain of `buffers` available, kick if needed, wait for it."""
        vq = self._vqs[self.reporting_queue]
        indirect = self.use_indirect and len(buffers) > 1
        table = self.layout.indirect_tables[self.reporting_queue] if indirect else None
        head = vq.add(buffers, indirect_table=table)
        # add() writes the descriptors and publishes avail.idx as its last
        # store: this is within a function return of the chain becoming
        # visible, and excludes the ~10 us of Python descriptor writes.
        available_ns = time.monotonic_ns()
        kicked = vq.kick_needed()
        if kicked:
            self.frontend.kick(self.reporting_queue)
            self.kicks += 1
        used_len, calls, used_ns = await self._wait_used(vq, head)
        return Submitted(available_ns, used_ns, used_len, calls, kicked)

    async def _wait_used(self, vq: DriverQueue, head: int) -> tuple[int, int, int]:
        """Wait on the call eventfd until `head` is used: (used len, wake-ups, time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.report_timeout
        calls = 0
        while True:
            try:
                await self.frontend.wait_call(
                    self.reporting_queue, max(deadline - loop.time(), 0.0)
                )
            except ReplyTimeoutError:
                raise ReportTimeoutError(self._timeout_reason(vq, head)) from None
            calls += 1
            self.calls += 1
            try:
                used = vq.get_used()
            except QueueError as error:
                raise DriverError(f"the device corrupted the used ring: {error}") from None
            now = time.monotonic_ns()
            for used_head, length in used:
                if used_head == head:
                    return length, calls, now
            if used:
                raise DriverError(f"the device returned heads {used} while {head} was in flight")

    def _timeout_reason(self, vq: DriverQueue, head: int) -> str:
        return timeout_reason(vq, head, f"report {self._seq - 1}", self.config.report_timeout)

    def _zeroed_bytes(self, blocks: list[Block]) -> int:
        """Bytes of the reported ranges that read back as zero (first u64 of each page)."""
        zero_pages = 0
        buffer = self._sample_buffer
        for block in blocks:
            self.ram.pread_into(block.gpa, buffer)
            with memoryview(buffer) as raw, raw.cast("Q") as words:
                zero_pages += words[::_SAMPLE_STEP].tolist().count(0)
        return zero_pages * PAGE_SIZE

    # -- verification -----------------------------------------------------------

    def _verify(self, guards: list[tuple[int, bytes]]) -> int:
        before = len(self.corrupted_pages)
        for gpa, stamp in guards:
            mapping, offset = self.ram.locate(gpa, PAGE_SIZE)
            if mapping[offset : offset + PAGE_SIZE] != stamp:
                self.corrupted_pages.add(gpa)
        self.verify_integrity_region()
        return len(self.corrupted_pages) - before

    def verify_integrity_region(self) -> bool:
        """Compare the whole integrity region with what was written; True if intact."""
        layout = self.layout
        if not layout.integrity_size:
            return True
        mapping, offset = self.ram.locate(layout.integrity_gpa, layout.integrity_size)
        if mapping[offset : offset + layout.integrity_size] == self._integrity_expected:
            return True
        for page in range(0, layout.integrity_size, PAGE_SIZE):
            start = offset + page
            if (
                mapping[start : start + PAGE_SIZE]
                != self._integrity_expected[page : page + PAGE_SIZE]
            ):
                self.corrupted_pages.add(layout.integrity_gpa + page)
        return False

    # -- whole runs -------------------------------------------------------------

    async def run(
        self,
        reports: int,
        *,
        pause_s: float = 0.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> RunResult:
        """`reports` reports back to back (with `pause_s` between), then a final check."""
        result = RunResult()
        started = time.monotonic()
        for index in range(reports):
            if index and pause_s > 0:
                await asyncio.sleep(pause_s)
            result.reports.append(await self.report())
            if progress is not None:
                progress(index + 1, reports)
        self.verify_integrity_region()
        result.duration_s = time.monotonic() - started
        result.integrity_errors = len(self.corrupted_pages)
        result.integrity_ok = not self.corrupted_pages
        return result

    async def remove(self) -> list[int]:
        """Device removal: the front-end stops the rings; returns their next avail index."""
        return await self.frontend.stop()


def timeout_reason(vq: DriverQueue, head: int, what: str, timeout: float) -> str:
    """Why `head` (`what`: "report 3", "inflate chain 0 ...") was not seen used in time."""
    try:
        used = vq.get_used()
    except QueueError as error:
        return f"the device corrupted the used ring: {error}"
    if any(used_head == head for used_head, _len in used):
        return (
            f"the device returned {what} but did not signal the call eventfd within {timeout:g} s"
        )
    return f"the device did not return {what} within {timeout:g} s"
