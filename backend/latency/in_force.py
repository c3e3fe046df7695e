"""The latency settings in force and the contention threads they start.

One `LatencyInForce` per server: it holds the current `LatencySettings` snapshot
(read by every report as it starts), the process-wide BigLock, and the BQL
and mmap contention threads, which it restarts when their settings change.
Changes come from the command line at start and from the control socket
while QEMU and the guest keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from vhost_balloon.backend.latency.contention import (
    BigLock,
    BqlContention,
    MmapContention,
    parse_bql,
    parse_mmap_contention,
)
from vhost_balloon.backend.latency.delays import DelayModel, parse_delay
from vhost_balloon.backend.latency.injection import LatencySettings, Point, parse_bql_phases

_OFF = ("", "none", "off")


class LatencyInForce:
    def __init__(self, settings: LatencySettings | None = None) -> None:
        self.settings = settings or LatencySettings()
        self.big_lock = BigLock()
        self._bql: BqlContention | None = None
        self._mmap: MmapContention | None = None
        # Changes are serialised: two concurrent `set`s must not both restart
        # the same contention threads, nor both build on the same snapshot.
        self._changing = asyncio.Lock()

    def current(self) -> LatencySettings:
        return self.settings

    async def start(self) -> None:
        await self._restart_contention(LatencySettings(), self.settings)

    async def apply(self, new: LatencySettings) -> LatencySettings:
        """Make `new` the settings in force (from the next report on)."""
        async with self._changing:
            return await self._apply(new)

    async def update(self, request: Mapping[str, Any]) -> LatencySettings:
        """Apply a control-socket `set` request (ValueError if it is bad).

        Parsing runs in a thread: a `replay:` file is read from disk there.
        """
        async with self._changing:
            new = await asyncio.to_thread(self.updated, request)
            return await self._apply(new)

    async def _apply(self, new: LatencySettings) -> LatencySettings:
        old = self.settings
        try:
            await self._restart_contention(old, new)
        except Exception as error:
            # Never leave settings that do not describe what runs: stop all
            # contention and say so.
            await self._stop_all()
            self.settings = old.changed(bql=None, mmap=None)
            raise ValueError(
                f"contention could not be changed ({error}); all contention threads were stopped"
            ) from None
        self.settings = new
        return new

    async def _restart_contention(self, old: LatencySettings, new: LatencySettings) -> None:
        # Stopping joins threads: do it off the event loop.
        if self._bql is not None and (old.bql != new.bql or old.seed != new.seed):
            await asyncio.to_thread(self._bql.stop)
            self._bql = None
        if new.bql is not None and self._bql is None:
            self._bql = BqlContention(self.big_lock, new.bql, new.seed)
            self._bql.start()
        if self._mmap is not None and old.mmap != new.mmap:
            await asyncio.to_thread(self._mmap.stop)
            self._mmap = None
        if new.mmap is not None and self._mmap is None:
            self._mmap = MmapContention(new.mmap)
            self._mmap.start()

    async def _stop_all(self) -> None:
        bql, mmap_threads, self._bql, self._mmap = self._bql, self._mmap, None, None
        for contention in (bql, mmap_threads):
            if contention is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(contention.stop)

    async def close(self) -> None:
        async with self._changing:
            await self._stop_all()

    def describe(self) -> dict[str, Any]:
        described = self.settings.describe()
        described["bql_acquisitions"] = self._bql.acquisitions if self._bql else 0
        described["mmap_iterations"] = self._mmap.iterations if self._mmap else 0
        return described

    def updated(self, request: Mapping[str, Any]) -> LatencySettings:
        """The settings a control-socket `set` request asks for (ValueError if bad).

        `delay` maps points to models ("none" removes one); `bql`,
        `mmap_contention` take a spec or "none"; `bql_phases` a list or a
        comma-separated string; `seed` an int; `replace: true` starts from no
        delays instead of merging.
        """
        current = self.settings
        delays: dict[Point, DelayModel] = {} if request.get("replace") else dict(current.delays)
        changes: dict[str, Any] = {}
        for point_text, model_text in dict(request.get("delay") or {}).items():
            try:
                point = Point(point_text)
            except ValueError:
                accepted = ", ".join(p.value for p in Point)
                raise ValueError(
                    f"unknown delay point '{point_text}'; accepted: {accepted}"
                ) from None
            if str(model_text).strip().lower() in _OFF:
                delays.pop(point, None)
            else:
                delays[point] = parse_delay(str(model_text))
        changes["delays"] = delays
        if "bql" in request:
            text = str(request["bql"] or "").strip()
            changes["bql"] = None if text.lower() in _OFF else parse_bql(text)
        if "mmap_contention" in request:
            text = str(request["mmap_contention"] or "").strip()
            changes["mmap"] = None if text.lower() in _OFF else parse_mmap_contention(text)
        if "bql_phases" in request:
            phases = request["bql_phases"]
            text = ",".join(phases) if isinstance(phases, list) else str(phases)
            changes["bql_phases"] = parse_bql_phases(text)
        if "seed" in request:
            seed = request["seed"]
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError(f"seed must be an integer, got {seed!r}")
            changes["seed"] = seed
        unknown = set(request) - {
            "cmd",
            "delay",
            "bql",
            "mmap_contention",
            "bql_phases",
            "seed",
            "replace",
        }
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return current.changed(**changes)
