"""The latency settings in force and the contention threads they start.

One `LatencyInForce` per server: it holds the current `LatencySettings` snapshot
(read by every report as it starts), the process-wide BigLock, and the BQL
and mmap contention threads, which it restarts when their settings change.
Changes come from the command line at start and from the control socket
while QEMU and the guest keep running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from vhost_balloon.backend.latency.contention import (
    BigLock,
    BqlContention,
    ContentionSpecError,
    MmapContention,
    check_mmap_memory,
    memory_available,
)
from vhost_balloon.backend.latency.injection import LatencySettings
from vhost_balloon.backend.latency.request import Change, parse_set_request

# A `set` is refused, and nothing changed, unless it is parsed and reaches
# the front of the queue of changes within SET_BUDGET_S; applying it then
# waits at most STOP_TIMEOUT_S for each of the two contention models to
# stop. 2 + 2 x 1.25 = 4.5 s, under ctl's 5 s: a backend that is not wedged
# answers every `set` before ctl gives up, so ctl's "no reply" never hides
# a change applied later. MAX_REPLAY_BYTES keeps a parse well inside.
SET_BUDGET_S = 2.0
STOP_TIMEOUT_S = 1.25
SHUTDOWN_TIMEOUT_S = 5.0


class LatencyStartError(OSError):
    """The latency settings given at start cannot run here (e.g. not enough memory)."""


class LatencyInForce:
    def __init__(
        self,
        settings: LatencySettings | None = None,
        *,
        available_memory: Callable[[], int] | None = None,
        set_budget_s: float = SET_BUDGET_S,
    ) -> None:
        self.settings = settings or LatencySettings()
        self.big_lock = BigLock()
        self._bql: BqlContention | None = None
        self._mmap: MmapContention | None = None
        self._available = available_memory or memory_available
        self._set_budget_s = set_budget_s
        # Changes are serialised: two concurrent `set`s must not both restart
        # the same contention threads, nor both build on the same snapshot.
        self._changing = asyncio.Lock()
        # One parse at a time, off the event loop: a queued parse whose `set`
        # gave up is cancelled before it runs, so abandoned work cannot pile up.
        self._parser = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="latency-parse"
        )

    def current(self) -> LatencySettings:
        return self.settings

    async def start(self) -> None:
        """Start the contention the initial settings ask for; LatencyStartError
        if the memory checked when they were parsed is no longer there."""
        if self.settings.mmap is not None:
            try:
                check_mmap_memory(self.settings.mmap, self._available())
            except ContentionSpecError as error:
                raise LatencyStartError(f"cannot start: {error}") from None
        await self._restart_contention(LatencySettings(), self.settings)

    async def apply(self, new: LatencySettings) -> LatencySettings:
        """Make `new` the settings in force (from the next report on)."""
        async with self._changing:
            return await self._apply(new)

    async def replace(self, new: LatencySettings) -> LatencySettings:
        """Make `new` the settings in force as the next version (its own
        version is ignored), unless it equals the settings in force. The
        version is taken under the same lock as every change, so no two
        different snapshots share one: injection rebuilds its samplers by
        version, and trace records name the settings they ran under."""
        async with self._changing:
            current = self.settings
            if dataclasses.replace(new, version=current.version) == current:
                return current
            return await self._apply(dataclasses.replace(new, version=current.version + 1))

    async def update(self, request: Mapping[str, Any]) -> LatencySettings:
        """Apply a control-socket `set` request (ValueError if it is bad, or if
        it cannot be parsed and queued within the budget: then nothing changed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._set_budget_s
        parsing = loop.run_in_executor(self._parser, self.parsed_change, request)
        try:
            change = await asyncio.wait_for(parsing, self._set_budget_s)
        except TimeoutError:
            raise self._late("parsing it") from None
        if not await _lock_within(self._changing, deadline - loop.time()):
            raise self._late("waiting for the changes before it")
        try:
            return await self._apply(change.applied_to(self.settings))
        finally:
            self._changing.release()

    def _late(self, doing: str) -> ValueError:
        return ValueError(
            f"set not applied, nothing changed: {doing} took over the "
            f"{self._set_budget_s:g} s a set may take"
        )

    def parsed_change(self, request: Mapping[str, Any]) -> Change:
        """Parse a `set` request (ValueError if bad); reads replay files."""
        return parse_set_request(request, self._mmap_available)

    def updated(self, request: Mapping[str, Any]) -> LatencySettings:
        """The settings a control-socket `set` request asks for (ValueError if bad)."""
        return self.parsed_change(request).applied_to(self.settings)

    def _mmap_available(self) -> int:
        """MemAvailable, plus what the running mmap contention holds (a change frees it)."""
        running = self._mmap
        return self._available() + (running.spec.total if running is not None else 0)

    async def _apply(self, new: LatencySettings) -> LatencySettings:
        old = self.settings
        if new.mmap is not None and new.mmap != old.mmap:
            check_mmap_memory(new.mmap, self._mmap_available())  # memory may have shrunk
        try:
            await self._restart_contention(old, new, STOP_TIMEOUT_S)
        except Exception as error:
            # Never leave settings that do not describe what runs: stop all
            # contention and say so. No waiting: the reply is due.
            await self._stop_all(timeout=0.0)
            self.settings = old.changed(bql=None, mmap=None)
            raise ValueError(
                f"contention could not be changed ({error}); all contention threads were "
                "told to stop"
            ) from None
        self.settings = new
        return new

    async def _restart_contention(
        self, old: LatencySettings, new: LatencySettings, timeout: float = SHUTDOWN_TIMEOUT_S
    ) -> None:
        # Stopping joins threads: do it off the event loop.
        if self._bql is not None and (old.bql != new.bql or old.seed != new.seed):
            await asyncio.to_thread(self._bql.stop, timeout)
            self._bql = None
        if new.bql is not None and self._bql is None:
            self._bql = BqlContention(self.big_lock, new.bql, new.seed)
            self._bql.start()
        if self._mmap is not None and old.mmap != new.mmap:
            await asyncio.to_thread(self._mmap.stop, timeout)
            self._mmap = None
        if new.mmap is not None and self._mmap is None:
            self._mmap = MmapContention(new.mmap)
            self._mmap.start()

    async def _stop_all(self, timeout: float) -> None:
        bql, mmap_threads, self._bql, self._mmap = self._bql, self._mmap, None, None
        for contention in (bql, mmap_threads):
            if contention is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(contention.stop, timeout)

    async def close(self) -> None:
        async with self._changing:
            await self._stop_all(timeout=SHUTDOWN_TIMEOUT_S)
        self._parser.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        """The settings in force and whether their contention really runs: a
        model whose threads died shows "failed" and the error, never "running"."""
        described = self.settings.describe()
        described["bql_acquisitions"] = self._bql.acquisitions if self._bql else 0
        described["mmap_iterations"] = self._mmap.iterations if self._mmap else 0
        described["bql_state"], described["bql_error"] = _state(self._bql)
        described["mmap_state"], described["mmap_error"] = _state(self._mmap)
        return described


def _state(contention: BqlContention | MmapContention | None) -> tuple[str, str | None]:
    if contention is None:
        return "off", None
    if contention.failure.error is not None:
        return "failed", contention.failure.error
    return ("running", None) if contention.running else ("stopped", None)


async def _lock_within(lock: asyncio.Lock, seconds: float) -> bool:
    """Take `lock` if that takes at most `seconds`; False, and not taken, if not.

    The acquire runs as its own task so that giving up never leaves it
    holding the lock: whatever it wins after that is released at once.
    """
    acquiring = asyncio.ensure_future(lock.acquire())
    try:
        await asyncio.wait({acquiring}, timeout=max(0.0, seconds))
    finally:
        if not acquiring.done():
            acquiring.cancel()
            acquiring.add_done_callback(functools.partial(_release_if_taken, lock))
    return acquiring.done() and not acquiring.cancelled()


def _release_if_taken(lock: asyncio.Lock, acquiring: asyncio.Future[bool]) -> None:
    if not acquiring.cancelled():
        lock.release()
