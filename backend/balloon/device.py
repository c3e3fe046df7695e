"""The virtio-balloon device: features, config space and its queues.

Free page reporting is the queue that matters: each chain is one report;
its entries are discarded, and only when every discard has returned is the
used entry published and the driver notified (invariant 1). All of it runs
on the queue's own thread (vhost/worker.py), and so do the record hooks,
after the notify: a hook must be thread-safe and quick.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vhost_balloon.backend.balloon.discard import DiscardResult, DiscardStrategy, run_discards
from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.balloon.report_plan import ReportPlan, plan_report
from vhost_balloon.backend.balloon.stats import DeviceStats
from vhost_balloon.backend.latency.injection import (
    NO_INJECTION,
    BqlPhase,
    LatencySettings,
    PhaseLatency,
    Point,
)
from vhost_balloon.backend.vhost.device import FrontendLink, QueueHandle, VirtioDevice
from vhost_balloon.backend.vhost.worker import GilTurns
from vhost_balloon.protocol import virtio
from vhost_balloon.protocol.virtqueue import Chain, DeviceQueue

OFFERED_FEATURES = virtio.feature_mask(
    virtio.F_VERSION_1,
    virtio.BALLOON_F_REPORTING,
    virtio.BALLOON_F_PAGE_POISON,
    virtio.F_INDIRECT_DESC,
    virtio.F_EVENT_IDX,
)


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


_NO_LATENCY = LatencySettings()  # inflate/deflate chains: nothing injected


@dataclass(frozen=True, slots=True)
class BalloonSettings:
    discard: DiscardStrategy = DiscardStrategy.PUNCH_HOLE
    notify: NotifyPolicy = NotifyPolicy.ALWAYS
    features: int = OFFERED_FEATURES


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
        self.stats = DeviceStats()
        self.config = virtio.BalloonConfig()
        self.acked_features = 0
        self._queues = virtio.balloon_queues(0)
        self.injector = latency
        # Each published report's record goes to these, in order (trace, metrics, ...).
        self.record_hooks: list[Callable[[ReportRecord], None]] = []
        self.frontend: FrontendLink | None = None  # raises config changes
        self.handles: dict[int, QueueHandle] = {}  # the started queues, by index
        self._seq = 0
        self._warned_balloon = False
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

    def reset(self) -> None:
        self.set_features(0)
        self.config = virtio.BalloonConfig(num_pages=self.config.num_pages)

    def attach(self, frontend: FrontendLink) -> None:
        self.frontend = frontend

    def queue_started(self, handle: QueueHandle) -> None:
        self.handles[handle.index] = handle

    def queue_stopped(self, index: int) -> None:
        self.handles.pop(index, None)

    def queue_failed(self, index: int, reason: str) -> None:
        with self._accounting:
            self.stats.queue_errors += 1

    def process_queue(self, handle: QueueHandle, kick_ns: int) -> None:
        queue = handle.queue
        is_reporting = handle.index == self.queues.reporting
        kick_delay = 0
        kick_latency: LatencySettings | None = None
        # A pass with nothing to pop (ring start, a spurious kick) is not a
        # report's kick: it gets no kick delay.
        if is_reporting and queue.has_available():
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
                elif is_reporting:
                    latency = self.injector.begin_report()
                else:
                    latency = _NO_LATENCY
                chain, pop_wait = self.injector.locked(latency, BqlPhase.POP, queue.pop)
                if chain is None:
                    first_kick_ns = None  # a chain found after this is not the kick's
                    break
                if is_reporting:
                    start = _ReportStart(report_kick_ns, start_ns, kick_delay, pop_wait, latency)
                    self._report(handle, chain, start)
                    kick_delay = 0  # attributed to the first report of the batch
                    first_kick_ns = None
                else:
                    self._ack_balloon_chain(handle, chain)
                turns.between_chains()  # a full ring must not keep the GIL
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
        injector = self.injector
        injected: dict[str, int] = {}
        if start.kick_delay_ns or injector.has(Point.KICK):
            injected[Point.KICK.value] = start.kick_delay_ns
        if injector.has(Point.REPORT):
            injected[Point.REPORT.value] = injector.delay(Point.REPORT)
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
            t_kick_ns=start.kick_ns,
            t_start_ns=start.start_ns,
            t_popped_ns=popped_ns,
            t_discard_start_ns=result.started_ns,
            t_discard_done_ns=result.done_ns,
            t_published_ns=published.published_ns,
            t_notified_ns=published.notified_ns,
            discard_syscall_ns=result.syscall_ns,
            discarded_entries=len(plan.targets) if strategy is not DiscardStrategy.NONE else 0,
            freed_bytes=result.freed_bytes,
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

    def _describe(self, latency: LatencySettings) -> dict[str, Any]:
        described = self._described
        if described is None or described[0] is not latency:
            described = self._described = (latency, latency.describe())
        return described[1]

    def _discard(self, plan: ReportPlan, injected: dict[str, int]) -> DiscardResult:
        """Every target of the plan (with the per-entry delays, measured into
        `injected`); none when there is nothing to do."""
        strategy = self.settings.discard
        entry_delays = self.injector.entry_delays(len(plan.targets)) if plan.targets else None
        if plan.targets and (strategy is not DiscardStrategy.NONE or entry_delays):
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
            self.log.warning(
                "report %d: skipped %d entries outside guest RAM, %d unaligned",
                record.seq,
                record.skipped_outside,
                record.skipped_unaligned,
            )
        for error in record.errors:
            self.log.error("report %d: %s", record.seq, error)

    def _ack_balloon_chain(self, handle: QueueHandle, chain: Chain) -> None:
        # The target (num_pages) is 0 unless set, so a Linux guest does not
        # inflate; if a driver does, its pages are acked but not discarded.
        name = self.queues.name(handle.index)
        with self._accounting:
            if name == "inflate":
                self.stats.inflate_acks += 1
            else:
                self.stats.deflate_acks += 1
        if not self._warned_balloon:
            self._warned_balloon = True
            self.log.warning(
                "%s queue used: acked without discarding (only free page "
                "reporting discards memory)",
                name,
            )
        handle.publish(chain.head)
        self._notify(handle)
