"""A model of Linux's classic balloon: inflate, deflate and the stats queue.

What drivers/virtio/virtio_balloon.c does besides free page reporting,
reduced to what the device can observe:

- `update()` is update_balloon_size_func: read `num_pages`, inflate
  (fill_balloon) or deflate (leak_balloon) one chain of at most 256 PFNs,
  write `actual` back, and repeat while the target differs. Like Linux it
  re-reads the target before every chain, so a target that moves mid-way is
  followed at once.
- `follow()` is the config-change work item: CONFIG_CHANGE_MSG sets the
  front-end's `config_changed`, and the balloon runs `update()` again.
- `stats_loop()` is stats_request / stats_handle_request: the device holds
  one stats buffer and returns it when it wants fresh numbers; the driver
  refills the same buffer and adds it again.

Each chain is one driver-readable buffer of little-endian u32 PFNs of
4 KiB frames (gpa >> 12), and the driver waits for the device to use it
before going on (tell_host's wait_event). Pages come from the reporting
driver's own blocks, taken from the end of its rotation: a block with any
ballooned page leaves the rotation (ReportingDriver._next_blocks skips it)
and returns once all its pages are deflated and the device has acked.
Deflate is last-in-first-out, as balloon_page_dequeue is.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vhost_balloon.guest.driver import ReportingDriver, timeout_reason
from vhost_balloon.guest.errors import DriverError, ReplyTimeoutError, ReportTimeoutError
from vhost_balloon.guest.frontend import VhostUserFrontend
from vhost_balloon.guest.layout import PAGE_SIZE, SCRATCH_SIZE, Block
from vhost_balloon.protocol.errors import QueueError
from vhost_balloon.protocol.virtio import (
    BALLOON_F_DEFLATE_ON_OOM,
    BALLOON_F_MUST_TELL_HOST,
    BALLOON_F_STATS_VQ,
    BALLOON_PFN_SHIFT,
    BalloonConfig,
    has_feature,
)
from vhost_balloon.protocol.virtqueue import Buffer, DriverQueue

ARRAY_PFNS_MAX = 256  # VIRTIO_BALLOON_ARRAY_PFNS_MAX: PFNs per inflate/deflate chain
OOM_NR_PAGES = 256  # VIRTIO_BALLOON_OOM_NR_PAGES: deflated per OOM notification
PFN_BYTES = 4
ACTUAL_OFFSET = 4  # offsetof(struct virtio_balloon_config, actual)
STAT = struct.Struct("<HQ")  # struct virtio_balloon_stat: le16 tag, le64 val, packed
BALLOON_MAGIC = 0x4241_4C4C_4F4F_4E21  # "BALLOON!", written into pages before inflating
_STAMP = struct.Struct("<QQ")
_PFNS_OFFSET = 0  # in the scratch page
_STATS_OFFSET = ARRAY_PFNS_MAX * PFN_BYTES
_STATS_POLL_S = 0.5  # how often stats_loop looks at its stop event
OUT_OF_PUFF_RETRY_S = 0.2  # fill_balloon's msleep(200) after a failed allocation


class StatTag(enum.IntEnum):
    """VIRTIO_BALLOON_S_* (include/uapi/linux/virtio_balloon.h, Linux 6.12)."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJFLT = 2
    MINFLT = 3
    MEMFREE = 4
    MEMTOT = 5
    AVAIL = 6
    CACHES = 7
    HTLB_PGALLOC = 8
    HTLB_PGFAIL = 9
    OOM_KILL = 10
    ALLOC_STALL = 11
    ASYNC_SCAN = 12
    DIRECT_SCAN = 13
    ASYNC_RECLAIM = 14
    DIRECT_RECLAIM = 15


NR_STATS = len(StatTag)  # VIRTIO_BALLOON_S_NR
STATS_BYTES = NR_STATS * STAT.size
assert _STATS_OFFSET + STATS_BYTES <= SCRATCH_SIZE, "the PFN array and stats share one page"


def encode_pfns(pfns: Sequence[int]) -> bytes:
    """An inflate/deflate buffer: little-endian u32 PFNs."""
    if len(pfns) > ARRAY_PFNS_MAX:
        raise ValueError(f"{len(pfns)} PFNs, a chain holds at most {ARRAY_PFNS_MAX}")
    return struct.pack(f"<{len(pfns)}I", *pfns)


def decode_pfns(data: bytes) -> list[int]:
    if len(data) % PFN_BYTES:
        raise ValueError(f"{len(data)} bytes is not a whole number of PFNs")
    return list(struct.unpack(f"<{len(data) // PFN_BYTES}I", data))


def pfn_of(gpa: int) -> int:
    return gpa >> BALLOON_PFN_SHIFT


def encode_stats(stats: Iterable[tuple[int, int]]) -> bytes:
    """A stats buffer: packed {le16 tag; le64 val} entries."""
    return b"".join(STAT.pack(tag, value) for tag, value in stats)


def decode_stats(data: bytes) -> dict[int, int]:
    if len(data) % STAT.size:
        raise ValueError(f"{len(data)} bytes is not a whole number of {STAT.size}-byte stats")
    return {tag: value for tag, value in STAT.iter_unpack(data)}


@dataclass(frozen=True, slots=True)
class BalloonChain:
    """One inflate or deflate chain, as the driver saw it."""

    kind: str  # "inflate" or "deflate"
    pfns: int
    head: int
    kicked: bool
    calls: int
    available_ns: int
    hold_ns: int  # chain made available .. used entry seen
    used_len: int


@dataclass(frozen=True, slots=True)
class BalloonUpdate:
    """What one `update()` did."""

    target: int  # num_pages as last read
    inflated: int
    deflated: int
    chains: int
    seconds: float
    actual: int  # what the driver last wrote (its ballooned pages)
    out_of_puff: bool = False  # inflation stopped: no page left to take

    @property
    def reached(self) -> bool:
        return self.actual == self.target


@dataclass(slots=True)
class _Held:
    """A block the balloon took, and how many of its pages (from its start) are ballooned."""

    block: Block
    pages: int


async def _wait_any(events: Sequence[asyncio.Event], timeout: float | None) -> None:
    """Return when any event is set, or after `timeout` seconds."""
    if any(event.is_set() for event in events):
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class BalloonDriver:
    """Inflate, deflate and stats beside a ReportingDriver, on its queues and front-end.

    Create it with the reporting driver before or after probing; call
    `start()` once the driver is probed (it primes the stats queue).
    """

    def __init__(self, driver: ReportingDriver, *, fill: bool | None = None) -> None:
        self.driver = driver
        self.fill = driver.config.balloon_fill if fill is None else fill
        self.num_pages = 0  # vb->num_pages: ballooned 4 KiB pages
        self.target: int | None = None  # num_pages as last read from the config
        self.actual_written: int | None = None
        self._held: list[_Held] = []  # stack: the top block is the one being filled
        layout = driver.layout
        self._pages_per_block = layout.block_size // PAGE_SIZE
        # Positions counted from the end of the rotation; every position
        # below the frontier is held, so a search for a free block starts there.
        self._position = {
            block.gpa: len(layout.blocks) - 1 - i for i, block in enumerate(layout.blocks)
        }
        self._frontier = 0
        self._lock = asyncio.Lock()  # vb->balloon_lock: one inflate or deflate at a time
        self.chains: list[BalloonChain] = []
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.filled_bytes = 0
        self.alloc_stalls = 0  # inflations that found no page (Linux: "Out of puff!")
        self.oom_deflated_pages = 0
        self.oom_kills = 0  # OOM notifications the balloon could not answer
        self.kicks = 0
        self.calls = 0
        self.stats_posted = 0  # stats buffers added (the first at start)
        self.stats_returned = 0  # stats buffers the device used
        self.started = False

    # -- what was negotiated ---------------------------------------------------------

    @property
    def frontend(self) -> VhostUserFrontend:
        return self.driver.frontend

    @property
    def must_tell_host(self) -> bool:
        return has_feature(self.driver.accepted_features, BALLOON_F_MUST_TELL_HOST)

    @property
    def deflate_on_oom(self) -> bool:
        return has_feature(self.driver.accepted_features, BALLOON_F_DEFLATE_ON_OOM)

    @property
    def stats_enabled(self) -> bool:
        return has_feature(self.driver.accepted_features, BALLOON_F_STATS_VQ)

    def _queues(self) -> tuple[int, int, int | None]:
        queues = self.driver.queues
        if queues is None:
            raise DriverError("the driver has not been probed")
        return queues.inflate, queues.deflate, queues.stats

    @property
    def pfns_gpa(self) -> int:
        """Where the PFN array lives (vb->pfns): the scratch page, shared by both queues."""
        return self.driver.layout.scratch_gpa + _PFNS_OFFSET

    @property
    def stats_gpa(self) -> int:
        """Where the stats buffer lives (vb->stats), after the PFN array."""
        return self.driver.layout.scratch_gpa + _STATS_OFFSET

    # -- which pages ------------------------------------------------------------------

    def ballooned_gpas(self) -> list[int]:
        """Every ballooned page, in inflate order (deflate takes from the end)."""
        return [
            held.block.gpa + page * PAGE_SIZE for held in self._held for page in range(held.pages)
        ]

    @property
    def held_blocks(self) -> tuple[Block, ...]:
        return tuple(held.block for held in self._held)

    def _take_block(self) -> Block | None:
        """A free block from the end of the rotation, or None (all held or being reported)."""
        blocks = self.driver.layout.blocks
        held, busy = self.driver.held_blocks, self.driver.reporting_blocks
        position = self._frontier
        while position < len(blocks) and blocks[-1 - position].gpa in held:
            position += 1
        self._frontier = position
        for candidate in range(position, len(blocks)):
            block = blocks[-1 - candidate]
            if block.gpa not in held and block.gpa not in busy:
                held.add(block.gpa)
                return block
        return None

    def _release_block(self, block: Block) -> None:
        self.driver.held_blocks.discard(block.gpa)
        self._frontier = min(self._frontier, self._position[block.gpa])

    def _alloc_page(self) -> int | None:
        """The next page to inflate (balloon_page_alloc), or None when none is left."""
        if not self._held or self._held[-1].pages == self._pages_per_block:
            block = self._take_block()
            if block is None:
                return None
            self._held.append(_Held(block, 0))
        top = self._held[-1]
        gpa = top.block.gpa + top.pages * PAGE_SIZE
        top.pages += 1
        return gpa

    def _dequeue_page(self, emptied: list[Block]) -> int:
        """The most recently inflated page (balloon_page_dequeue); emptied blocks collected."""
        top = self._held[-1]
        top.pages -= 1
        gpa = top.block.gpa + top.pages * PAGE_SIZE
        if top.pages == 0:
            self._held.pop()
            emptied.append(top.block)
        return gpa

    # -- one chain --------------------------------------------------------------------

    async def _fill_balloon(self, num: int) -> int:
        """Inflate up to `num` pages (at most one chain); returns how many."""
        pfns: list[int] = []
        for _ in range(min(num, ARRAY_PFNS_MAX)):
            gpa = self._alloc_page()
            if gpa is None:
                self.alloc_stalls += 1
                break
            if self.fill:
                # The pattern lets a test tell a freed page (zeros) from a kept one.
                self._write(gpa, _STAMP.pack(gpa, BALLOON_MAGIC) * (PAGE_SIZE // _STAMP.size))
                self.filled_bytes += PAGE_SIZE
            pfns.append(pfn_of(gpa))
            self.num_pages += 1  # Linux counts a page as ballooned before telling the host
        if not pfns:
            return 0
        inflate, _deflate, _stats = self._queues()
        await self._tell_host(inflate, "inflate", pfns)
        self.inflated_pages += len(pfns)
        return len(pfns)

    async def _leak_balloon(self, num: int) -> int:
        """Deflate up to `num` pages (at most one chain), newest first; returns how many."""
        num = min(num, ARRAY_PFNS_MAX, self.num_pages)
        if num <= 0:
            return 0
        emptied: list[Block] = []
        pfns = [pfn_of(self._dequeue_page(emptied)) for _ in range(num)]
        self.num_pages -= num
        _inflate, deflate, _stats = self._queues()
        # With MUST_TELL_HOST the pages may be used only once the device has
        # the chain; without it Linux still waits (tell_host always does), so
        # the blocks return to the rotation only after the ack either way.
        await self._tell_host(deflate, "deflate", pfns)
        # Not reached if the device never acks: its emptied blocks then stay
        # out of the rotation, since what the host did with them is unknown.
        for block in emptied:
            self._release_block(block)
        self.deflated_pages += num
        return num

    def _write(self, gpa: int, data: bytes) -> None:
        self.driver.ram.memory.write(gpa, data)

    async def _tell_host(self, index: int, kind: str, pfns: list[int]) -> BalloonChain:
        """One out-buffer of PFNs on queue `index`, kicked if needed, waited for."""
        data = encode_pfns(pfns)
        self._write(self.pfns_gpa, data)
        vq = self.driver.queue(index)
        head = vq.add([Buffer(self.pfns_gpa, len(data), False)])
        available_ns = time.monotonic_ns()
        kicked = vq.kick_needed()
        if kicked:
            self.frontend.kick(index)
            self.kicks += 1
        what = f"{kind} chain {len(self.chains)} ({len(pfns)} PFNs)"
        used_len, calls, used_ns = await self._wait_used(index, vq, head, what)
        chain = BalloonChain(
            kind, len(pfns), head, kicked, calls, available_ns, used_ns - available_ns, used_len
        )
        self.chains.append(chain)
        return chain

    async def _wait_used(
        self, index: int, vq: DriverQueue, head: int, what: str
    ) -> tuple[int, int, int]:
        """Wait on queue `index`'s call eventfd until `head` is used: (len, wake-ups, time)."""
        timeout = self.driver.config.report_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        calls = 0
        while True:
            try:
                await self.frontend.wait_call(index, max(deadline - loop.time(), 0.0))
            except ReplyTimeoutError:
                raise ReportTimeoutError(timeout_reason(vq, head, what, timeout)) from None
            calls += 1
            self.calls += 1
            used = self._get_used(vq)
            now = time.monotonic_ns()
            for used_head, length in used:
                if used_head == head:
                    return length, calls, now
            if used:
                raise DriverError(f"the device returned heads {used} while {what} was in flight")

    @staticmethod
    def _get_used(vq: DriverQueue) -> list[tuple[int, int]]:
        try:
            return vq.get_used()
        except QueueError as error:
            raise DriverError(f"the device corrupted the used ring: {error}") from None

    # -- config space -----------------------------------------------------------------

    async def read_target(self) -> int:
        """towards_target's read: num_pages (Linux reads the whole config through QEMU)."""
        raw = await self.frontend.get_config(0, BalloonConfig.SIZE)
        self.target = BalloonConfig.decode(raw).num_pages
        return self.target

    async def write_actual(self) -> None:
        """update_balloon_size: virtio_cwrite_le of `actual` alone (4 bytes at offset 4)."""
        await self.frontend.set_config(struct.pack("<I", self.num_pages), ACTUAL_OFFSET)
        self.actual_written = self.num_pages

    # -- towards the target -----------------------------------------------------------

    async def update(self, stop: asyncio.Event | None = None) -> BalloonUpdate:
        """Inflate or deflate chain by chain until `actual` equals `num_pages`.

        Returns early when no page is left to inflate (out_of_puff) or when
        `stop` is set between chains.
        """
        async with self._lock:
            started = time.monotonic()
            inflated = deflated = chains = 0
            out_of_puff = False
            target = await self.read_target()
            while target != self.num_pages and not (stop is not None and stop.is_set()):
                if target > self.num_pages:
                    done = await self._fill_balloon(target - self.num_pages)
                    inflated += done
                    out_of_puff = done == 0
                else:
                    done = await self._leak_balloon(self.num_pages - target)
                    deflated += done
                chains += bool(done)
                await self.write_actual()
                if out_of_puff:
                    break
                target = await self.read_target()
            return BalloonUpdate(
                target=target,
                inflated=inflated,
                deflated=deflated,
                chains=chains,
                seconds=time.monotonic() - started,
                actual=self.num_pages,
                out_of_puff=out_of_puff,
            )

    async def follow(self, stop: asyncio.Event) -> list[BalloonUpdate]:
        """Run update() at start and on every config change until `stop` is set.

        As Linux: the probe checks the target once, and each CONFIG_CHANGE_MSG
        queues the update work again. Out of puff, it retries after 200 ms as
        fill_balloon does. Returns the updates that moved the balloon.
        """
        changed = self.frontend.config_changed
        updates: list[BalloonUpdate] = []
        while not stop.is_set():
            changed.clear()  # before reading: a change during update() runs it again
            result = await self.update(stop)
            if result.chains:
                updates.append(result)
            retry = OUT_OF_PUFF_RETRY_S if result.out_of_puff else None
            await _wait_any((changed, stop), retry)
        return updates

    async def oom(self) -> int:
        """The OOM notifier: deflate up to 256 pages if DEFLATE_ON_OOM was negotiated.

        Without the feature Linux registers no notifier and the guest kills a
        task instead (counted in the OOM_KILL stat). Returns the pages freed.
        """
        if not self.deflate_on_oom:
            self.oom_kills += 1
            return 0
        async with self._lock:
            freed = await self._leak_balloon(OOM_NR_PAGES)
            await self.write_actual()
        self.oom_deflated_pages += freed
        if not freed:
            self.oom_kills += 1
        return freed

    # -- stats ------------------------------------------------------------------------

    def stats_sample(self) -> list[tuple[int, int]]:
        """update_balloon_stats from the mocked guest's own state, every tag once.

        No swap, page cache or hugetlb here: those read 0. MINFLT counts the
        pages the guest has written (each first write faults a page in).
        """
        driver = self.driver
        layout = driver.layout
        free = max(layout.reportable_bytes - (self.num_pages << BALLOON_PFN_SHIFT), 0)
        written = driver.populated_bytes + self.filled_bytes + layout.integrity_size
        values = {
            StatTag.MINFLT: written // PAGE_SIZE,
            StatTag.MEMFREE: free,
            StatTag.MEMTOT: driver.ram.size,
            StatTag.AVAIL: free,
            StatTag.OOM_KILL: self.oom_kills,
            StatTag.ALLOC_STALL: self.alloc_stalls,
        }
        return [(int(tag), values.get(tag, 0)) for tag in StatTag]

    def _post_stats(self, index: int) -> None:
        """Write a fresh sample into the stats buffer, add it, kick if needed."""
        data = encode_stats(self.stats_sample())
        self._write(self.stats_gpa, data)
        vq = self.driver.queue(index)
        vq.add([Buffer(self.stats_gpa, len(data), False)])
        self.stats_posted += 1
        if vq.kick_needed():
            self.frontend.kick(index)
            self.kicks += 1

    async def start(self) -> None:
        """After probing: prime the stats queue with one buffer (init_vqs)."""
        if self.started:
            return
        _inflate, _deflate, stats = self._queues()
        if stats is not None:
            self._post_stats(stats)
        self.started = True

    async def stats_loop(self, stop: asyncio.Event) -> None:
        """Each time the device returns the stats buffer, refill it and add it again."""
        _inflate, _deflate, stats = self._queues()
        if stats is None:
            return
        vq = self.driver.queue(stats)
        while not stop.is_set():
            try:
                await self.frontend.wait_call(stats, _STATS_POLL_S)
            except ReplyTimeoutError:
                continue
            self.calls += 1
            used = self._get_used(vq)
            if not used:
                continue
            if len(used) > 1:
                raise DriverError(f"the device returned {len(used)} stats buffers, one was added")
            self.stats_returned += 1
            self._post_stats(stats)

    # -- the summary ------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The balloon's part of the run summary."""
        return {
            "ballooned_pages": self.num_pages,
            "ballooned_bytes": self.num_pages << BALLOON_PFN_SHIFT,
            "target_pages": self.target,
            "actual": self.actual_written,
            "inflated_pages": self.inflated_pages,
            "deflated_pages": self.deflated_pages,
            "inflate_chains": sum(chain.kind == "inflate" for chain in self.chains),
            "deflate_chains": sum(chain.kind == "deflate" for chain in self.chains),
            "held_blocks": len(self._held),
            "alloc_stalls": self.alloc_stalls,
            "oom_deflated_pages": self.oom_deflated_pages,
            "kicks": self.kicks,
            "calls": self.calls,
            "must_tell_host": self.must_tell_host,
            "deflate_on_oom": self.deflate_on_oom,
            "stats_vq": self.stats_enabled,
            "stats_posted": self.stats_posted,
            "stats_returned": self.stats_returned,
        }
