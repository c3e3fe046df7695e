"""One thread per started queue, blocked in poll(2) on its kick eventfd.

The thread runs a report's whole path (pop, discard, injected delays,
publish, notify) with no event-loop hop: each hop costs a thread wake-up,
tens of microseconds here, inside the hold window being measured. rust-vmm's
vhost-user-backend runs its queue workers the same way. The event loop keeps
the vhost-user messages, the control socket and metrics; it only asks a
thread to run a pass, to stop, or to report when it is idle, and it waits for
that through futures the thread resolves, never by blocking.

Kicks that arrive while a batch runs are folded into the next batch, which
keeps the earliest kick's timestamp (the hold window opens at the first kick).

Each thread also polls a wake eventfd of its own: the loop writes it to make
the thread look at its state again (a pass asked for, a pause lifted, stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable

from vhost_balloon.backend.libc import precise_sleeps_for_this_thread
from vhost_balloon.backend.vhost.vring import read_eventfd, signal_eventfd

LOG = logging.getLogger("vhost_balloon")

# The queue threads, the event loop and the trace writer share one GIL. A
# thread that wants it while another runs Python code waits for the holder's
# next blocking call, or for the interpreter's switch interval (5 ms by
# default): a guest that keeps its ring full would hold every other session
# and the vhost-user messages up that long. At 200 us, a waiter is served
# within 200 us; the cost is more frequent switches, only while threads contend.
GIL_SWITCH_INTERVAL_S = 200e-6


def share_the_gil_fairly() -> None:
    """Bound how long a thread waits for the GIL (process-wide)."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


# The switch interval is not enough for a thread that drops the GIL around
# short syscalls (eventfd writes, fstat, a log line), as a queue draining a
# flood of chains does: it takes the GIL back before the waiter has woken,
# and the waiter's turn never comes (the convoy effect). Every other
# session's report needs the GIL a few dozen times (once per discard
# syscall), so a flooded ring would stretch their hold times tenfold. A
# driver that follows the spec is never throttled: Linux posts one report
# and waits for it (so do its balloon and stats queues), so no other chain
# is ever waiting while one is processed. A ring where one is, and which has
# used BUSY_NS of CPU since it last slept, sleeps long enough that it gets
# at most FLOOD_SHARE of one CPU (and of the GIL); the others' calls find
# the GIL free meanwhile.
BUSY_NS = 500_000
FLOOD_SHARE = 0.1
FLOOD_SLEEP_S = BUSY_NS * (1 / FLOOD_SHARE - 1) / 1e9


class GilTurns:
    """Called between the chains of one batch, told whether another chain
    was already waiting while the last one was processed (a flood)."""

    __slots__ = ("_since_ns", "throttled")

    def __init__(self) -> None:
        self._since_ns = time.thread_time_ns()
        self.throttled = 0  # sleeps taken: a guest flooding its ring

    def between_chains(self, flooding: bool) -> None:
        now_ns = time.thread_time_ns()
        if not flooding:
            self._since_ns = now_ns  # CPU spent on a lone chain is not a flood's
        elif now_ns - self._since_ns >= BUSY_NS:
            self.throttled += 1
            time.sleep(FLOOD_SLEEP_S)
            self._since_ns = time.thread_time_ns()


class QueueThread:
    """The thread that drains one started queue.

    `process(kick_ns)` runs on the thread, one batch at a time, and only when
    `can_run()` says so (the ring enabled, not broken, the session not paused);
    a kick seen while it cannot run stays pending until the next `kick()`.
    If the thread itself fails (a bug, not a malformed ring: `process` handles
    those), it calls `failed(reason)` and ends as a stopped thread would.
    """

    def __init__(
        self,
        name: str,
        kick_fd: int,
        process: Callable[[int], None],
        can_run: Callable[[], bool],
        failed: Callable[[str], None],
    ) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._kick_fd = kick_fd
        self._process = process
        self._can_run = can_run
        self._failed = failed
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # OSError: EMFILE
        self._state = threading.Lock()  # guards the fields below, and the wake fd's life
        self._pending_kick_ns: int | None = None
        self._busy = False
        self._stopping = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._exited_thread = False
        self._exited: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread; if it cannot start (RuntimeError), nothing is left
        behind and the error is raised."""
        try:
            self._thread.start()
        except RuntimeError:  # "can't start new thread": it never ran, so end it here
            self._end()
            raise

    # -- the event loop's side -------------------------------------------------

    def kick(self, kick_ns: int) -> None:
        """Run a pass as if kicked at `kick_ns` (a ring started or enabled)."""
        with self._state:
            if self._pending_kick_ns is None:
                self._pending_kick_ns = kick_ns
        self._wake()

    @property
    def busy(self) -> bool:
        return self._busy

    async def wait_idle(self) -> None:
        """Return once no batch runs (at once if none does)."""
        with self._state:
            if not self._busy:
                return
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
        await waiter

    def stop(self) -> None:
        """Ask the thread to end once its running batch (if any) has finished."""
        with self._state:
            self._stopping = True
        self._wake()

    async def wait_stopped(self) -> None:
        """Wait for the thread to end (after `stop`); its kick fd may then be closed."""
        await asyncio.shield(self._exited)

    def _wake(self) -> None:
        with self._state:  # never a write to a closed (or reused) fd number
            if not self._exited_thread:
                signal_eventfd(self._wake_fd)

    # -- the thread's side -------------------------------------------------------

    def _run(self) -> None:
        try:
            precise_sleeps_for_this_thread()
            # poll(2), not epoll: two fds need no epoll instance (one fd fewer
            # per queue against the process's limit).
            poller = select.poll()
            poller.register(self._kick_fd, select.POLLIN)
            poller.register(self._wake_fd, select.POLLIN)
            while self._next_batch(poller):
                pass
        except Exception as error:  # a bug: say so, and end as a stopped thread would
            LOG.exception("%s: queue thread failed", self.name)
            with contextlib.suppress(Exception):
                self._failed(f"its queue thread failed: {error!r}")
        finally:
            self._end()

    def _end(self) -> None:
        """No thread runs or will run: release the wake fd and every waiter."""
        with self._state:
            self._stopping = True
            self._exited_thread = True
            waiters, self._idle_waiters = self._idle_waiters, []
            os.close(self._wake_fd)
        for waiter in [*waiters, self._exited]:
            self._resolve(waiter)

    def _next_batch(self, poller: select.poll) -> bool:
        """Wait for a kick and run one batch; False once asked to stop."""
        events = poller.poll()
        seen_ns = time.monotonic_ns()
        for fd, _ in events:
            try:
                read_eventfd(fd)
            except BlockingIOError:
                continue  # another reader took it, or a spurious wake-up
            if fd == self._kick_fd:
                with self._state:
                    if self._pending_kick_ns is None:
                        self._pending_kick_ns = seen_ns
        with self._state:
            if self._stopping:
                return False
            if self._pending_kick_ns is None or not self._can_run():
                return True  # a held-back kick stays pending until the next kick()
            kick_ns, self._pending_kick_ns = self._pending_kick_ns, None
            self._busy = True
        try:
            self._process(kick_ns)
        except Exception:  # the process callback handles what it expects
            LOG.exception("%s: queue processing failed", self.name)
        finally:
            with self._state:
                self._busy = False
                waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                self._resolve(waiter)
        return True

    def _resolve(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(_set_done, waiter)


def _set_done(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
