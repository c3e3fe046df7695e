"""A session's vrings and the workers that drain them.

The session handles the vhost-user messages that configure a ring; this
object runs the rings: it starts and stops them (telling the device, which
holds a `QueueHandle` for each started one), parses each ring over the
current memory map, schedules a worker per kicked queue, and breaks a ring
whose contents are malformed (invariant 2: the err eventfd is signalled, the
session goes on). While memory or rings are being replaced it pauses: no new
batch starts, and `quiesce()` waits for the running ones, so no discard runs
on a mapping that is being unmapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from vhost_balloon.backend.libc import full_fence
from vhost_balloon.backend.vhost.device import QueueHandle, VirtioDevice
from vhost_balloon.backend.vhost.mapping import MemoryMap
from vhost_balloon.backend.vhost.vring import Vring, read_eventfd
from vhost_balloon.backend.vhost.worker import QueueWorker
from vhost_balloon.protocol.errors import AddressError, QueueError, QueueErrorKind
from vhost_balloon.protocol.memory import Space
from vhost_balloon.protocol.virtio import F_EVENT_IDX, F_INDIRECT_DESC, has_feature
from vhost_balloon.protocol.virtqueue import DeviceQueue, RingLayout


class RingSet:
    def __init__(
        self,
        name: str,
        device: VirtioDevice,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        *,
        memory_map: Callable[[], MemoryMap],
        acked_features: Callable[[], int],
        on_broken: Callable[[], None],
    ) -> None:
        self._name = name
        self._device = device
        self._log = log
        self._memory_map = memory_map
        self._acked_features = acked_features
        self._on_broken = on_broken
        self._loop = asyncio.get_running_loop()
        self.vrings = [Vring(i) for i in range(device.max_queues)]
        self._workers: dict[int, QueueWorker] = {}
        self._handles: dict[int, QueueHandle] = {}  # one per started ring
        # The parsed queue each running batch began with: a re-parse ends it.
        self._batch_queues: dict[int, DeviceQueue] = {}
        self._paused = False

    @property
    def any_started(self) -> bool:
        return any(vring.started for vring in self.vrings)

    # -- starting and stopping -------------------------------------------------

    def start(self, vring: Vring, kick_fd: int) -> None:
        """The ring has its kick fd: hand it to the device and drain what waits."""
        vring.started = True
        forget_queue(vring)
        handle = self._handles[vring.index] = self._handle(vring)
        self._device.queue_started(handle)
        self._loop.add_reader(kick_fd, self._on_kick, vring)
        self.schedule(vring, time.monotonic_ns())  # buffers may already be waiting

    def stop(self, vring: Vring) -> None:
        if not vring.started:
            return
        if vring.kick_fd is not None:
            self._loop.remove_reader(vring.kick_fd)
        vring.started = False
        self._handles.pop(vring.index, None)
        self._batch_queues.pop(vring.index, None)
        self._device.queue_stopped(vring.index)

    async def wait_idle(self, vring: Vring) -> None:
        """Wait for the ring's running batch, if any, to finish."""
        worker = self._workers.get(vring.index)
        if worker is not None:
            await worker.wait_idle()

    async def reset(self) -> None:
        """Stop every ring and worker; start again with fresh, empty rings."""
        with self.paused():
            await self.close()
            self.vrings = [Vring(i) for i in range(self._device.max_queues)]

    async def close(self) -> None:
        """Stop every ring and worker and close every eventfd."""
        for vring in self.vrings:
            self.stop(vring)
        for worker in self._workers.values():
            await worker.stop()
        self._workers.clear()
        for vring in self.vrings:
            vring.close()

    # -- memory changes ----------------------------------------------------------

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new queue work starts while memory or rings are being replaced."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            for worker in self._workers.values():
                worker.retry()

    def pause_for_good(self) -> None:
        """The session is closing: no batch starts again."""
        self._paused = True

    async def quiesce(self) -> None:
        """Wait for every queue worker: no discard may run on a mapping we unmap."""
        for worker in list(self._workers.values()):
            await worker.wait_idle()

    def invalidate(self) -> None:
        """Drop parsed queues (rebuilt over the new mappings at the next kick),
        keeping where each one had got to."""
        for vring in self.vrings:
            forget_queue(vring)
        self._batch_queues.clear()

    # -- processing -----------------------------------------------------------------

    def _on_kick(self, vring: Vring) -> None:
        kick_ns = time.monotonic_ns()
        assert vring.kick_fd is not None
        try:
            read_eventfd(vring.kick_fd)
        except BlockingIOError:
            return
        self.schedule(vring, kick_ns)

    def schedule(self, vring: Vring, kick_ns: int) -> None:
        if not (vring.started and vring.enabled) or vring.broken:
            return
        worker = self._workers.get(vring.index)
        if worker is None:
            worker = QueueWorker(
                f"{self._name}-q{vring.index}",
                lambda kick: self._process(vring, kick),
                lambda: vring.started and vring.enabled and not vring.broken and not self._paused,
            )
            self._workers[vring.index] = worker
        worker.kick(kick_ns)

    def _handle(self, vring: Vring) -> QueueHandle:
        index = vring.index

        def running() -> bool:
            # A batch stops as soon as its ring is stopped or re-parsed.
            return (
                vring.started
                and vring.enabled
                and not self._paused
                and vring.queue is not None
                and vring.queue is self._batch_queues.get(index)
            )

        return QueueHandle(
            index,
            queue=lambda: self._parsed_queue(vring),
            memory_map=self._memory_map,
            notify=vring.notify,
            running=running,
        )

    def _parsed_queue(self, vring: Vring) -> DeviceQueue:
        if vring.queue is None:
            if vring.addr is None or vring.num == 0:
                raise QueueError(
                    QueueErrorKind.BAD_LAYOUT,
                    "queue started before its size and addresses were set",
                )
            layout = RingLayout(vring.num, vring.addr.desc, vring.addr.avail, vring.addr.used)
            features = self._acked_features()
            vring.queue = DeviceQueue(
                self._memory_map().memory,
                layout,
                ring_space=Space.UVA,
                indirect=has_feature(features, F_INDIRECT_DESC),
                event_idx=has_feature(features, F_EVENT_IDX),
                next_avail=vring.base,
                fence=full_fence,
            )
        return vring.queue

    async def _process(self, vring: Vring, kick_ns: int) -> None:
        try:
            handle = self._handles.get(vring.index)
            if handle is None:
                return  # the ring stopped before this batch could run
            self._batch_queues[vring.index] = self._parsed_queue(vring)
            await self._device.process_queue(handle, kick_ns)
        except (QueueError, AddressError) as error:
            self._break(vring, str(error))
        except ValueError as error:
            # A mapping released under a running queue: memory changes wait
            # for workers, so this is a bug; stop rather than guess a position.
            self._break(vring, f"ring memory unavailable: {error}")
        except Exception as error:  # e.g. EMFILE from a timerfd mid-report
            # A popped chain may now never be published: say so loudly (err
            # eventfd, broken queue) rather than leave the guest waiting silently.
            self._log.exception("queue %d: report processing failed", vring.index)
            self._break(vring, f"report processing failed: {error!r}")

    def _break(self, vring: Vring, reason: str) -> None:
        vring.broken = True
        self._device.queue_failed(vring.index, reason)
        self.stop(vring)
        vring.signal_error()
        self._on_broken()
        self._log.error("queue %d is broken, device needs reset: %s", vring.index, reason)


def forget_queue(vring: Vring) -> None:
    """Drop a parsed queue; it is re-parsed at the next kick from where it got to."""
    if vring.queue is not None:
        vring.base = vring.queue.next_avail
    vring.queue = None
