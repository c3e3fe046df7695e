"""The virtio-balloon device: features, config space and its queues.

Free page reporting is the queue that matters: each chain is one report;
its entries are discarded, and only when every discard has returned is the
used entry published and the driver notified (invariant 1). All of it runs
on the queue's own thread (vhost/worker.py), and so do the record hooks,
after the notify: a hook must be thread-safe and quick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vhost_balloon.backend.balloon.ballooned import BadChain, BalloonedPages, BalloonPlan, read_pfns
from vhost_balloon.backend.balloon.discard import DiscardResult, DiscardStrategy, run_discards
from vhost_balloon.backend.balloon.features import OFFERED_FEATURES
from vhost_balloon.backend.balloon.guest_stats import BadStats, StatsState, parse_stats
from vhost_balloon.backend.balloon.records import BalloonRecord, ReportRecord, StatsRecord
from vhost_balloon.backend.balloon.report_plan import ReportPlan, plan_report
from vhost_balloon.backend.balloon.stats import DeviceStats
from vhost_balloon.backend.balloon.target import BalloonTarget
from vhost_balloon.backend.latency.injection import (
    NO_INJECTION,
    BqlPhase,
    LatencySettings,
    PhaseLatency,
    Point,
)
from vhost_balloon.backend.vhost.device import FrontendLink, QueueHandle, VirtioDevice
from vhost_balloon.backend.vhost.log_limit import LimitedLog
from vhost_balloon.backend.vhost.worker import GilTurns
from vhost_balloon.protocol import virtio
from vhost_balloon.protocol.errors import AddressError, MemoryFault, QueueError
from vhost_balloon.protocol.virtqueue import Chain, DeviceQueue


class NotifyPolicy(enum.Enum):
    # Every used entry is followed by a call signal. The reporting driver
    # waits for each report anyway, so this costs nothing and cannot lose an
    # interrupt to a missing fence.
    ALWAYS = "always"
    # Signal only when the driver's used_event asks for it (EVENT_IDX).
    EVENT_IDX = "event-idx"


@dataclass(frozen=True, slots=True)
class _ReportStart:
    """What a report starts with: its window's opening (the kick, or the
    previous publish), when its turn began, the kick delay and the BQL wait
    before its pop, and the latency snapshot it runs under."""

    kick_ns: int
    start_ns: int
    kick_delay_ns: int
    pop_wait_ns: int
    latency: LatencySettings


@dataclass(frozen=True, slots=True)
class _Published:
    """When a report was published and notified (0: not notified), and the
    BQL waits of its phases."""

    published_ns: int
    notified_ns: int
    bql_wait_ns: dict[str, int]


_NO_LATENCY = LatencySettings()  # stats and hinting chains: nothing injected
RECORD_RANGES = 64  # ranges kept in a balloon chain's record
# The queues whose chains take the injected latency, as reports do.
_TIMED = ("reporting", "inflate", "deflate")


@dataclass(frozen=True, slots=True)
class BalloonSettings:
    discard: DiscardStrategy = DiscardStrategy.PUNCH_HOLE
    notify: NotifyPolicy = NotifyPolicy.ALWAYS
    features: int = OFFERED_FEATURES
    # Give the held stats buffer back, asking for a fresh sample, this often
    # (QEMU's guest-stats-polling-interval); 0: never.
    stats_interval_s: float = 0.0


class BalloonDevice(VirtioDevice):
    def __init__(
        self,
        settings: BalloonSettings,
        session: str,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        *,
        latency: PhaseLatency = NO_INJECTION,
    ) -> None:
        self.settings = settings
        self.session = session
        self.log = logger
        # What a guest's bad chains and buffers make us say, at most BURST lines per interval.
        self.guest_log = LimitedLog(logger)
        # Discard errors get a quota of their own: a flood of the guest's
        # bad chains must not hide them.
        self.discard_log = LimitedLog(logger)
        self.stats = DeviceStats()
        self.config = virtio.BalloonConfig()
        self.acked_features = 0
        self._queues = virtio.balloon_queues(0)
        self.injector = latency
        # Each published report's record goes to these, in order (trace, metrics, ...).
        self.record_hooks: list[Callable[[ReportRecord], None]] = []
        # And each inflate and deflate chain's.
        self.balloon_hooks: list[Callable[[BalloonRecord], None]] = []
        self.ballooned = BalloonedPages()
        self.target = BalloonTarget()
        # Inflate and deflate run on their own threads: one chain at a time,
        # so that a page given back is never discarded afterwards.
        self._balloon_lock = threading.Lock()
        self._discard_lock = threading.Lock()  # taken after _balloon_lock, never before
        self._balloon_seq = {"inflate": 0, "deflate": 0}
        self.guest_stats = StatsState()
        self.stats_hooks: list[Callable[[StatsRecord], None]] = []
        # The stats ring's pushes: its thread's, and the event loop's timer's.
        self._stats_lock = threading.Lock()
        self._stats_timer: asyncio.TimerHandle | None = None
        self.frontend: FrontendLink | None = None  # raises config changes
        self.handles: dict[int, QueueHandle] = {}  # the started queues, by index
        self._seq = 0
        self._last_published_ns: dict[int, int] = {}  # per queue
        # The queues' threads all count into `stats`; the loop reads it.
        self._accounting = threading.Lock()
        # Each snapshot's description, made once (a record per report carries it).
        self._described: tuple[LatencySettings, dict[str, Any]] | None = None

    @property
    def max_queues(self) -> int:
        return virtio.balloon_queues(self.settings.features).count

    def offered_features(self) -> int:
        return self.settings.features

    def set_features(self, features: int) -> None:
        self.acked_features = features
        self._queues = virtio.balloon_queues(features)  # read on every kick

    @property
    def queues(self) -> virtio.BalloonQueues:
        return self._queues

    def read_config(self, offset: int, size: int) -> bytes:
        return self.config.read(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config = self.config.write(offset, data)
        self.target.actual_written(self.config.actual)

    def reset(self) -> None:
        self.set_features(0)
        # The target stays (as in QEMU); a reset driver owns every page again,
        # and has the target still to reach.
        self.config = virtio.BalloonConfig(num_pages=self.config.num_pages)
        self.target.driver_reset()
        with self._balloon_lock:
            self.ballooned.clear()
        with self._stats_lock:
            self.guest_stats.held_head = None  # its ring is gone with the reset

    def balloon_status(self, guest_ram_bytes: int) -> dict[str, Any]:
        """The `balloon` object of `ctl stats`: target, ballooned, freed."""
        with self._accounting:
            freed = self.stats.inflate_freed_bytes
        return {
            "guest_ram_bytes": guest_ram_bytes,
            **self.target.describe(guest_ram_bytes),
            "inflate_freed_bytes": freed,
            "tracked_bytes": self.ballooned.count << virtio.BALLOON_PFN_SHIFT,
            "partial_huge_pages": self.ballooned.partial_granules,
        }

    def set_target(self, num_pages: int) -> Callable[[], None]:
        """The driver should balloon `num_pages` 4 KiB pages (on the loop;
        the caller then raises a config change). Returns what undoes it, for
        a driver that could not be told."""
        config, target = self.config, self.target.copy()
        self.config = dataclasses.replace(config, num_pages=num_pages)
        self.target.set(num_pages, self.config.actual)

        def undo() -> None:
            self.config = dataclasses.replace(self.config, num_pages=config.num_pages)
            self.target = target

        return undo

    def attach(self, frontend: FrontendLink) -> None:
        self.frontend = frontend

    def queue_started(self, handle: QueueHandle) -> None:
        self.handles[handle.index] = handle
        if handle.index == self.queues.stats and self.settings.stats_interval_s > 0:
            self._arm_stats_timer()

    def queue_stopped(self, index: int) -> None:
        handle = self.handles.pop(index, None)
        if index == self.queues.stats and handle is not None:
            if self._stats_timer is not None:
                self._stats_timer.cancel()
                self._stats_timer = None
            # The held buffer goes back with the ring, or the driver, which
            # waits for it, would never send stats again after a restart.
            self._give_stats_back(handle)

    # -- the stats queue ---------------------------------------------------------

    def _arm_stats_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._stats_timer = loop.call_later(self.settings.stats_interval_s, self._request_stats)

    def _request_stats(self) -> None:
        """On the loop, every stats interval: give the held buffer back."""
        index = self.queues.stats
        handle = None if index is None else self.handles.get(index)
        if handle is None:
            self._stats_timer = None
            return
        if handle.running():  # not while memory is being replaced
            self._give_stats_back(handle)
        self._arm_stats_timer()

    def _give_stats_back(self, handle: QueueHandle) -> None:
        with self._stats_lock:
            head = self.guest_stats.held_head
            if head is None:
                return
            self.guest_stats.held_head = None
            self.guest_stats.requests += 1
            try:
                handle.publish(head)
                self._notify(handle)
            except (QueueError, AddressError, ValueError) as error:
                self.guest_log.warning("stats queue: could not give the buffer back: %s", error)
            except MemoryFault as fault:
                if self.frontend is not None:
                    self.frontend.lost_memory(f"guest memory is gone: {fault}")

    def _stats_chain(self, handle: QueueHandle, chain: Chain) -> None:
        """A stats buffer: hold it, and keep its sample."""
        state = self.guest_stats
        # Only the pushes are locked: the loop's timer pushes too, and must
        # never wait for a batch (a guest that keeps its ring full would stop
        # the loop, every session with it).
        with self._stats_lock:
            previous, state.held_head = state.held_head, chain.head
            if previous is not None:
                # A second buffer while one is held: the first goes back (QEMU too).
                handle.publish(previous)
                self._notify(handle)
        try:
            sample = parse_stats(chain, handle.memory_map.memory)
        except BadStats as bad:
            state.bad += 1
            state.last_error = str(bad)
            self.guest_log.warning("stats buffer refused: %s", bad)
            return
        state.last = sample
        state.samples += 1
        record = StatsRecord(
            session=self.session,
            queue=handle.index,
            seq=state.samples,
            t_ns=sample.monotonic_ns,
            stats=sample.stats,
            unknown_tags={str(tag): value for tag, value in sample.unknown.items()},
        )
        for hook in self.stats_hooks:
            hook(record)

    def queue_failed(self, index: int, reason: str) -> None:
        with self._accounting:
            self.stats.queue_errors += 1

    def process_queue(self, handle: QueueHandle, kick_ns: int) -> None:
        queue = handle.queue
        kind = self.queues.name(handle.index)
        timed = kind in _TIMED
        kick_delay = 0
        kick_latency: LatencySettings | None = None
        # A pass with nothing to pop (ring start, a spurious kick) is not a
        # report's kick: it gets no kick delay.
        if timed and queue.has_available():
            kick_latency = self.injector.begin_report()
            kick_delay = self.injector.delay(Point.KICK)
        first_kick_ns: int | None = kick_ns
        turns = GilTurns()
        while True:
            queue.disable_notifications()
            while handle.running():
                start_ns = time.monotonic_ns()
                # Only the first chain of a batch came with this kick. The
                # driver posts a report only after seeing the previous one
                # used, so a chain found while draining (or woken by a kick
                # folded into an earlier batch) was made available after the
                # previous publish: its window cannot open before that.
                report_kick_ns = max(
                    start_ns if first_kick_ns is None else first_kick_ns,
                    self._last_published_ns.get(handle.index, 0),
                )
                if kick_latency is not None:  # the first report runs under the kick's settings
                    latency, kick_latency = kick_latency, None
                elif timed:
                    latency = self.injector.begin_report()
                else:
                    latency = _NO_LATENCY
                chain, pop_wait = self.injector.locked(latency, BqlPhase.POP, queue.pop)
                if chain is None:
                    first_kick_ns = None  # a chain found after this is not the kick's
                    break
                # Another chain already waiting behind this one: a driver that
                # does not wait for its chains (Linux always does).
                flooding = queue.others_waiting
                if timed:
                    start = _ReportStart(report_kick_ns, start_ns, kick_delay, pop_wait, latency)
                    if kind == "reporting":
                        self._report(handle, chain, start)
                    else:
                        self._balloon_chain(handle, chain, start, kind)
                    kick_delay = 0  # attributed to the first chain of the batch
                    first_kick_ns = None
                elif kind == "stats":
                    self._stats_chain(handle, chain)
                else:
                    self._ack_chain(handle, chain)
                turns.between_chains(flooding)  # a full ring must not keep the GIL
            if not handle.running() or not queue.enable_notifications():
                return

    def _notify(self, handle: QueueHandle) -> int:
        """Signal the driver if the policy says so; the signal's timestamp or 0."""
        queue: DeviceQueue = handle.queue
        always = self.settings.notify is NotifyPolicy.ALWAYS
        if (always or queue.needs_notify()) and handle.notify():
            notified_ns = time.monotonic_ns()
            with self._accounting:
                self.stats.notifications += 1
            return notified_ns
        return 0

    def _report(self, handle: QueueHandle, chain: Chain, start: _ReportStart) -> None:
        """One report: its delays, its discards, then (and only then) its
        publish and notify, and its record."""
        popped_ns = time.monotonic_ns()
        injected = self._delays_before(start)
        # QEMU acks without discarding when the guest poisons freed pages with
        # a non-zero value: a discarded page would read back as zeros.
        poison = self.config.poison_val != 0 and bool(
            self.acked_features >> virtio.BALLOON_F_PAGE_POISON & 1
        )
        plan = plan_report(chain, handle.memory_map, discard=not poison)
        result = self._discard(plan, injected)
        # Every discard of this report has returned: only now may the guest
        # get its pages back.
        published = self._publish(handle, chain.head, start, injected)
        self._seq += 1
        strategy = self.settings.discard
        record = ReportRecord(
            session=self.session,
            queue=handle.index,
            seq=self._seq,
            head=chain.head,
            entries=plan.entries,
            bytes=plan.reported_bytes,
            ranges=plan.ranges,
            discard=strategy.value,
            **self._timeline(start, popped_ns, result, published, len(plan.targets)),
            skipped_outside=plan.skipped_outside,
            skipped_unaligned=plan.skipped_unaligned,
            poison_ack=poison,
            injected_ns=injected,
            bql_wait_ns=published.bql_wait_ns,
            settings=self._describe(start.latency),
            errors=result.errors,
        )
        self._account(record)
        for hook in self.record_hooks:
            hook(record)

    def _delays_before(self, start: _ReportStart) -> dict[str, int]:
        """The kick delay (already slept) and the per-chain delay (slept
        here), measured, as a chain's record carries them."""
        injector = self.injector
        injected: dict[str, int] = {}
        if start.kick_delay_ns or injector.has(Point.KICK):
            injected[Point.KICK.value] = start.kick_delay_ns
        if injector.has(Point.REPORT):
            injected[Point.REPORT.value] = injector.delay(Point.REPORT)
        return injected

    def _timeline(
        self,
        start: _ReportStart,
        popped_ns: int,
        result: DiscardResult,
        published: _Published,
        targets: int,
    ) -> dict[str, int]:
        """The fields a report's and a balloon chain's records share: when
        each phase happened, and what the discards did."""
        discarding = self.settings.discard is not DiscardStrategy.NONE
        return {
            "t_kick_ns": start.kick_ns,
            "t_start_ns": start.start_ns,
            "t_popped_ns": popped_ns,
            "t_discard_start_ns": result.started_ns,
            "t_discard_done_ns": result.done_ns,
            "t_published_ns": published.published_ns,
            "t_notified_ns": published.notified_ns,
            "discard_syscall_ns": result.syscall_ns,
            "discarded_entries": targets if discarding else 0,
            "freed_bytes": result.freed_bytes,
        }

    def _describe(self, latency: LatencySettings) -> dict[str, Any]:
        described = self._described
        if described is None or described[0] is not latency:
            described = self._described = (latency, latency.describe())
        return described[1]

    def _discard(self, plan: ReportPlan | BalloonPlan, injected: dict[str, int]) -> DiscardResult:
        """Every target of the plan (with the per-entry delays, measured into
        `injected`); none when there is nothing to do."""
        strategy = self.settings.discard
        entry_delays = self.injector.entry_delays(len(plan.targets)) if plan.targets else None
        if plan.targets and (strategy is not DiscardStrategy.NONE or entry_delays):
            # One discard at a time per device: freed bytes are measured over
            # the whole file, and the reporting and inflate threads discard in
            # the same memfd (QEMU does both under its big lock).
            with self._discard_lock:
                result = run_discards(strategy, plan.targets, plan.files, entry_delays)
        else:
            now = time.monotonic_ns()
            result = DiscardResult(started_ns=now, done_ns=now)
        if entry_delays is not None:
            injected[Point.ENTRY.value] = result.entry_delay_ns
        return result

    def _publish(
        self, handle: QueueHandle, head: int, start: _ReportStart, injected: dict[str, int]
    ) -> _Published:
        """The publish and notify phases, each after its delay and under the
        big lock where the BQL is modelled."""
        injector = self.injector
        latency = start.latency
        if injector.has(Point.PUBLISH):
            injected[Point.PUBLISH.value] = injector.delay(Point.PUBLISH)
        _, publish_wait = injector.locked(latency, BqlPhase.PUBLISH, lambda: handle.publish(head))
        published_ns = time.monotonic_ns()
        self._last_published_ns[handle.index] = published_ns
        if injector.has(Point.NOTIFY):
            injected[Point.NOTIFY.value] = injector.delay(Point.NOTIFY)
        notified_ns, notify_wait = injector.locked(
            latency, BqlPhase.NOTIFY, lambda: self._notify(handle)
        )
        bql_wait = {}
        if latency.bql is not None:
            bql_wait = {
                BqlPhase.POP.value: start.pop_wait_ns,
                BqlPhase.PUBLISH.value: publish_wait,
                BqlPhase.NOTIFY.value: notify_wait,
            }
        return _Published(published_ns, notified_ns, bql_wait)

    def _account(self, record: ReportRecord) -> None:
        stats = self.stats
        with self._accounting:
            stats.reports += 1
            stats.entries += record.entries
            stats.reported_bytes += record.bytes
            stats.discarded_entries += record.discarded_entries
            stats.freed_bytes += record.freed_bytes
            stats.skipped_outside += record.skipped_outside
            stats.skipped_unaligned += record.skipped_unaligned
            stats.poison_acks += record.poison_ack
            stats.discard_errors += len(record.errors)
            stats.discard_syscall_ns += record.discard_syscall_ns
        if record.skipped_outside or record.skipped_unaligned:
            self.guest_log.warning(
                "report %d: skipped %d entries outside guest RAM, %d unaligned",
                record.seq,
                record.skipped_outside,
                record.skipped_unaligned,
            )
        for error in record.errors:
            self.discard_log.error("report %d: %s", record.seq, error)

    def _ack_chain(self, handle: QueueHandle, chain: Chain) -> None:
        # A queue this device reads nothing from (free page hints): acked.
        with self._accounting:
            self.stats.other_acks += 1
        handle.publish(chain.head)
        self._notify(handle)

    def _balloon_chain(
        self, handle: QueueHandle, chain: Chain, start: _ReportStart, kind: str
    ) -> None:
        """One inflate or deflate chain: its delays, its discards (inflate),
        then its publish and notify, and its record, as a report's."""
        popped_ns = time.monotonic_ns()
        injected = self._delays_before(start)
        bad_chain = ""
        with self._balloon_lock:
            try:
                pfns = read_pfns(chain, handle.memory_map.memory)
            except BadChain as bad:
                bad_chain, pfns = str(bad), []
            pages = self.ballooned
            plan = BalloonPlan()
            if not bad_chain:
                memory_map = handle.memory_map
                if kind == "inflate":
                    plan = pages.inflate(pfns, memory_map)
                else:
                    plan = pages.deflate(pfns, memory_map)
            # Every discard returns before the guest hears the chain is done.
            result = self._discard(plan, injected)
        published = self._publish(handle, chain.head, start, injected)
        strategy = self.settings.discard
        with self._accounting:
            self._balloon_seq[kind] += 1
            seq = self._balloon_seq[kind]
        record = BalloonRecord(
            kind=kind,
            session=self.session,
            queue=handle.index,
            seq=seq,
            head=chain.head,
            pfns=plan.pfns,
            pages=plan.pages,
            # A chain may hold 262144 PFNs: its record must stay small (the
            # trace queue is sized for records of tens of ranges).
            ranges=plan.ranges[:RECORD_RANGES],
            ranges_total=len(plan.ranges),
            discard=strategy.value,
            **self._timeline(start, popped_ns, result, published, len(plan.targets)),
            skipped_outside=plan.skipped_outside,
            skipped_unaligned=plan.skipped_unaligned,
            duplicates=plan.duplicates,
            unknown=plan.unknown,
            partial_granules=plan.partial_granules,
            bad_chain=bad_chain,
            injected_ns=injected,
            bql_wait_ns=published.bql_wait_ns,
            settings=self._describe(start.latency),
            errors=result.errors,
        )
        self._account_balloon(record)
        for hook in self.balloon_hooks:
            hook(record)

    def _account_balloon(self, record: BalloonRecord) -> None:
        stats = self.stats
        with self._accounting:
            if record.kind == "inflate":
                stats.inflate_chains += 1
                stats.inflated_pages += record.pages
                stats.inflate_freed_bytes += record.freed_bytes
            else:
                stats.deflate_chains += 1
                stats.deflated_pages += record.pages
                stats.deflate_unknown_pfns += record.unknown
            stats.balloon_pfns_outside += record.skipped_outside
            stats.balloon_pfns_unaligned += record.skipped_unaligned
            stats.balloon_duplicate_pfns += record.duplicates
            stats.bad_balloon_chains += bool(record.bad_chain)
            stats.discard_errors += len(record.errors)
            stats.discard_syscall_ns += record.discard_syscall_ns
        if record.bad_chain:
            self.guest_log.warning(
                "%s chain %d: %s; acked, nothing used", record.kind, record.seq, record.bad_chain
            )
        elif (
            record.skipped_outside
            or record.skipped_unaligned
            or record.duplicates
            or record.unknown
        ):
            self.guest_log.warning(
                "%s chain %d: skipped %d PFNs outside guest RAM, %d in unaligned regions, "
                "%d repeated, %d never inflated",
                record.kind,
                record.seq,
                record.skipped_outside,
                record.skipped_unaligned,
                record.duplicates,
                record.unknown,
            )
        for error in record.errors:
            self.discard_log.error("%s chain %d: %s", record.kind, record.seq, error)
