"""A session's vrings and the workers that drain them.

The session handles the vhost-user messages that configure a ring; this
object runs the rings: it starts and stops them (telling the device, which
holds a `QueueHandle` for each started one), parses each ring over the
current memory map, runs a thread per started ring (worker.py: the thread waits
for kicks and runs the device's batches), and breaks a ring whose contents
are malformed (invariant 2: the err eventfd is signalled, the session goes
on). While memory or rings are being replaced it pauses: no new batch
starts, and `quiesce()` waits for the running ones, so no discard runs on a
mapping that is being unmapped.
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
from vhost_balloon.backend.vhost.vring import Vring
from vhost_balloon.backend.vhost.worker import QueueThread
from vhost_balloon.protocol.errors import AddressError, MemoryFault, QueueError, QueueErrorKind
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
        on_memory_lost: Callable[[str], None],
    ) -> None:
        self._name = name
        self._device = device
        self._log = log
        self._memory_map = memory_map
        self._acked_features = acked_features
        self._on_broken = on_broken
        self._on_memory_lost = on_memory_lost
        self._loop = asyncio.get_running_loop()
        self.vrings = [Vring(i) for i in range(device.max_queues)]
        self._threads: dict[int, QueueThread] = {}  # one per started ring
        self._ending: dict[int, QueueThread] = {}  # told to stop, not yet waited for
        self._handles: dict[int, QueueHandle] = {}  # one per started ring
        # The parsed queue each running batch began with: a re-parse ends it.
        self._batch_queues: dict[int, DeviceQueue] = {}
        self._paused = False

    @property
    def any_started(self) -> bool:
        return any(vring.started for vring in self.vrings)

    @property
    def busy(self) -> bool:
        """A batch runs on one of the rings (its records are not all out yet)."""
        return any(thread.busy for thread in [*self._threads.values(), *self._ending.values()])

    # -- starting and stopping -------------------------------------------------

    def start(self, vring: Vring, kick_fd: int) -> None:
        """The ring has its kick fd: hand it to the device, start its thread
        and drain what waits."""
        vring.started = True
        forget_queue(vring)
        handle = self._handles[vring.index] = self._handle(vring)
        self._device.queue_started(handle)
        try:
            thread = QueueThread(
                f"{self._name}-q{vring.index}",
                kick_fd,
                lambda kick_ns: self._process(thread, vring, kick_ns),
                lambda: vring.started and vring.enabled and not vring.broken and not self._paused,
                lambda reason: self._break_from_thread(vring, reason),
            )
            thread.start()
        except (OSError, RuntimeError) as error:  # out of fds or threads
            self._break(vring, f"its queue thread could not start: {error}")
            return
        self._threads[vring.index] = thread
        self.schedule(vring, time.monotonic_ns())  # buffers may already be waiting

    def stop(self, vring: Vring) -> None:
        """No batch starts on the ring again; the running one ends after its
        chain. `wait_idle` then waits for its thread to end."""
        if not vring.started:
            return
        vring.started = False
        thread = self._threads.pop(vring.index, None)
        if thread is not None:
            thread.stop()
            self._ending[vring.index] = thread
        self._handles.pop(vring.index, None)
        self._batch_queues.pop(vring.index, None)
        self._device.queue_stopped(vring.index)

    async def wait_idle(self, vring: Vring) -> None:
        """Wait for the ring's running batch, if any, to finish; for a stopped
        ring, for its thread to end (its kick fd may be closed after that)."""
        ending = self._ending.get(vring.index)
        if ending is not None:
            await ending.wait_stopped()
            # Only now: a wait cancelled half-way leaves it for close() to wait for.
            if self._ending.get(vring.index) is ending:
                del self._ending[vring.index]
        thread = self._threads.get(vring.index)
        if thread is not None:
            await thread.wait_idle()

    async def reset(self) -> None:
        """Stop every ring and its thread; start again with fresh, empty rings."""
        with self.paused():
            await self.close()
            self.vrings = [Vring(i) for i in range(self._device.max_queues)]

    async def close(self) -> None:
        """Stop every ring and thread and close every eventfd."""
        for vring in self.vrings:
            self.stop(vring)
        for vring in self.vrings:
            await self.wait_idle(vring)
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
            # A pass on every ring, kicked or not: a batch cut short by the
            # pause left kick notifications disabled, and a driver that obeys
            # suppression would never kick again. The pass re-enables them (and
            # drains what came meanwhile); a kick held back is folded into it.
            now_ns = time.monotonic_ns()
            for index, thread in self._threads.items():
                vring = self.vrings[index]
                # A disabled ring gets its pass when it is enabled (with the
                # time of that, not of this): a kick left pending here would
                # open its first report's window now.
                if vring.enabled and not vring.broken:
                    thread.kick(now_ns)

    def pause_for_good(self) -> None:
        """The session is closing: no batch starts again."""
        self._paused = True

    async def quiesce(self) -> None:
        """Wait for every queue thread's batch: no discard may run on a
        mapping we unmap."""
        for thread in list(self._threads.values()):
            await thread.wait_idle()
        for thread in list(self._ending.values()):
            await thread.wait_stopped()

    def invalidate(self) -> None:
        """Drop parsed queues (rebuilt over the new mappings at the next kick),
        keeping where each one had got to."""
        for vring in self.vrings:
            forget_queue(vring)
        self._batch_queues.clear()

    # -- processing -----------------------------------------------------------------

    def schedule(self, vring: Vring, kick_ns: int) -> None:
        """Run a pass over the ring as if kicked at `kick_ns`."""
        if not (vring.started and vring.enabled) or vring.broken:
            return
        thread = self._threads.get(vring.index)
        if thread is not None:
            thread.kick(kick_ns)

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

    def _process(self, thread: QueueThread, vring: Vring, kick_ns: int) -> None:
        """One batch, on the queue's thread."""
        try:
            handle = self._handles.get(vring.index)
            if handle is None or self._threads.get(vring.index) is not thread:
                return  # the ring stopped before this batch could run
            self._batch_queues[vring.index] = self._parsed_queue(vring)
            self._device.process_queue(handle, kick_ns)
        except MemoryFault as fault:
            # The front-end shrank a file under our mapping: nothing of this
            # guest can be served any more, but no other session is touched.
            self._break_from_thread(vring, f"guest memory is gone: {fault}", memory_lost=True)
        except (QueueError, AddressError) as error:
            self._break_from_thread(vring, str(error))
        except ValueError as error:
            # A mapping released under a running queue: memory changes wait
            # for the threads, so this is a bug; stop rather than guess a position.
            self._break_from_thread(vring, f"ring memory unavailable: {error}")
        except Exception as error:  # e.g. a failed sleep or lock mid-report
            # A popped chain may now never be published: say so loudly (err
            # eventfd, broken queue) rather than leave the guest waiting silently.
            self._log.exception("queue %d: report processing failed", vring.index)
            self._break_from_thread(vring, f"report processing failed: {error!r}")

    def _break_from_thread(self, vring: Vring, reason: str, *, memory_lost: bool = False) -> None:
        # At once, on the thread: no further batch runs on this ring. The rest
        # (the device, the session's state, the log) belongs to the event loop.
        vring.broken = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the session is gone
            self._loop.call_soon_threadsafe(self._break_on_loop, vring, reason, memory_lost)

    def _break_on_loop(self, vring: Vring, reason: str, memory_lost: bool = False) -> None:
        if memory_lost:
            self._on_memory_lost(reason)
        if self.vrings[vring.index] is not vring:
            # The rings were reset meanwhile: the ring it broke is gone.
            self._log.error("queue %d failed as it was reset: %s", vring.index, reason)
            return
        # Even if the ring was stopped meanwhile (GET_VRING_BASE, a new kick
        # fd): its contents are malformed until a reset, so it stays broken,
        # and the front-end is told through the err eventfd.
        self._break(vring, reason)

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
