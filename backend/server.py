"""The vhost-balloon server: a vhost-user server whose devices are balloons.

It composes the rooms below it: each session gets a BalloonDevice (from the
factory given to vhost.server), the device's records go to the trace, the
histograms and any hooks the caller adds (on the queue's thread, after the
notify: see balloon/device.py). It also owns what the sessions share: the
latency runtime (settings, BQL, mmap contention), the metrics and the
control socket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.balloon.stats import DeviceStats
from vhost_balloon.backend.latency.in_force import LatencyInForce
from vhost_balloon.backend.latency.injection import LatencyInjection, LatencySettings
from vhost_balloon.backend.observe.control import close_control, serve_control
from vhost_balloon.backend.observe.exposition import (
    Counter,
    Exposition,
    Gauge,
    Snapshot,
    device_counters,
)
from vhost_balloon.backend.observe.metrics import Metrics
from vhost_balloon.backend.observe.metrics_http import serve_metrics
from vhost_balloon.backend.observe.trace import TraceWriter
from vhost_balloon.backend.vhost.backend_channel import ChannelFailed
from vhost_balloon.backend.vhost.server import VhostUserServer, listen_unix, socket_from_fd
from vhost_balloon.backend.vhost.session import Session, SessionLogger
from vhost_balloon.backend.vhost.worker import share_the_gil_fairly
from vhost_balloon.protocol.virtio import BALLOON_PFN_SHIFT

__all__ = ["Server", "ServerSettings", "listen_unix", "socket_from_fd"]

LOG = logging.getLogger("vhost_balloon")
TRACE_WRITTEN_HELP = "Trace records written."
TRACE_DROPPED_HELP = "Trace records dropped: the trace's queue was full or its writes failed."


BALLOON_GAUGES = (
    ("target_bytes", "The guest memory size the host asked for (RAM if never set)."),
    ("ballooned_bytes", "The balloon's size as the driver reports it (actual)."),
    ("partial_huge_pages", "Huge pages only partly ballooned, so not freed yet."),
)


# Settings a running server keeps until it restarts: {field: its option}.
RESTART_ONLY = {
    "trace_path": "trace",
    "control_socket": "control-socket",
    "metrics_address": "metrics",
    "allow_unsealed_memory": "allow-unsealed-memory",
}

GUEST_STAT_HELP = "The guest's last stats-queue sample, by QEMU's stat name."


@dataclass(frozen=True, slots=True)
class ServerSettings:
    balloon: BalloonSettings = field(default_factory=BalloonSettings)
    trace_path: Path | None = None
    latency: LatencySettings = field(default_factory=LatencySettings)
    control_socket: Path | None = None
    metrics_address: tuple[str, int] | None = None
    allow_unsealed_memory: bool = False


class Server:
    def __init__(
        self,
        settings: ServerSettings,
        *,
        record_hooks: Sequence[Callable[[ReportRecord], None]] = (),
        open_trace: Callable[[Path], TraceWriter] = TraceWriter,  # tests: a small queue
    ) -> None:
        self.settings = settings
        self.record_hooks = list(record_hooks)  # given every report of every session
        self.vhost = VhostUserServer(
            self._new_device,
            allow_unsealed_memory=settings.allow_unsealed_memory,
            on_session_end=self._session_ended,
        )
        self.finished = DeviceStats()  # totals of sessions that have ended
        self._trace = open_trace(settings.trace_path) if settings.trace_path else None
        self.latency = LatencyInForce(settings.latency)
        self.metrics = Metrics()  # percentiles for ctl stats
        self.exposition = Exposition(self._scraped)  # /metrics
        self._services: list[asyncio.AbstractServer] = []
        self._control: asyncio.AbstractServer | None = None
        self._balloon_targets = asyncio.Lock()

    async def reconfigure(self, new: ServerSettings) -> list[str]:
        """Apply new settings where they can change while serving: latency for
        every session from its next report, the balloon settings for sessions
        that connect from now on. Returns the settings that differ but change
        only on a restart (the sockets, the trace, unsealed memory). ValueError
        if the latency could not be applied (then nothing changed but what
        the error says)."""
        await self.latency.replace(new.latency)  # a new version, if anything changed
        restart_only = [
            option
            for name, option in RESTART_ONLY.items()
            if getattr(new, name) != getattr(self.settings, name)
        ]
        self.settings = dataclasses.replace(
            self.settings, latency=self.latency.current(), balloon=new.balloon
        )
        return restart_only

    async def start_services(self) -> None:
        """Contention threads, the control socket and the metrics endpoint."""
        share_the_gil_fairly()  # one session's full ring must not hold up the others
        await self.latency.start()
        if self.settings.control_socket is not None:
            self._control = await serve_control(self.settings.control_socket, self.handle_control)
            self._services.append(self._control)
        if self.settings.metrics_address is not None:
            host, port = self.settings.metrics_address
            self._services.append(await serve_metrics(host, port, self.render_metrics))

    def render_metrics(self) -> str:
        return self.exposition.render()

    def _scraped(self) -> Snapshot:
        """What a scrape reads now: the device counters over every session,
        the trace's, and the live sessions' gauges."""
        counters = device_counters(self.totals().counters())
        if self._trace is not None:
            trace = self._trace.counters()
            counters += [
                Counter("trace_records_written", TRACE_WRITTEN_HELP, trace.written),
                Counter("trace_records_dropped", TRACE_DROPPED_HELP, trace.dropped),
            ]
        sessions = Gauge("sessions", "Front-ends connected now.", [({}, len(self.sessions))])
        return Snapshot(counters, [sessions, *self._balloon_gauges()])

    def _balloon_gauges(self) -> list[Gauge]:
        """Each live session's balloon target and size (labels: the session)."""
        status = {
            name: self.vhost.devices[name].balloon_status(session.guest_ram_bytes)
            for name, session in self.sessions.items()
        }
        gauges = [
            Gauge(key, help_text, [({"session": n}, s[key]) for n, s in status.items()])
            for key, help_text in BALLOON_GAUGES
        ]
        # The guest's last stats sample: at most 16 names per session (tags
        # QEMU does not name stay in `ctl stats`, off the label set).
        samples: list[tuple[dict[str, str], float]] = []
        for name in self.sessions:
            last = self.vhost.devices[name].guest_stats.last
            if last is not None:
                samples += [({"session": name, "stat": k}, v) for k, v in last.stats.items()]
        gauges.append(Gauge("guest_stat", GUEST_STAT_HELP, samples))
        return gauges

    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's commands: stats, get, set."""
        command = request.get("cmd")
        if command == "get":
            return {"ok": True, "settings": self.latency.describe()}
        if command == "set":
            await self.latency.update(request)
            return {"ok": True, "settings": self.latency.describe()}
        if command == "balloon":
            return await self._set_balloon_target(request)
        if command == "stats":
            sessions = {}
            for name, session in self.sessions.items():
                histograms = self.metrics.session(name)
                device = self.vhost.devices[name]
                sessions[name] = {
                    "state": session.state.value,
                    **device.stats.as_dict(),
                    "hold_us": histograms.percentiles("hold"),
                    "discard_us": histograms.percentiles("discard"),
                    "bql_wait_us": histograms.percentiles("bql_wait"),
                    "balloon": device.balloon_status(session.guest_ram_bytes),
                    "guest_stats": device.guest_stats.describe(device.settings.stats_interval_s),
                }
            reply = {
                "ok": True,
                "totals": self.totals().as_dict(),
                "sessions_served": self.sessions_served,
                "sessions": sessions,
                "settings": self.latency.describe(),
            }
            if self._trace is not None:
                reply["trace"] = self._trace.counters().as_dict()
            return reply
        raise ValueError(f"unknown command {command!r}; accepted: stats, get, set, balloon")

    async def set_balloon_target(self, size: int, session: str | None = None) -> dict[str, Any]:
        """What `ctl balloon SIZE [--session NAME]` does; ValueError when refused."""
        request: dict[str, Any] = {"size": size}
        if session is not None:
            request["session"] = session
        return await self._set_balloon_target(request)

    async def _set_balloon_target(self, request: dict[str, Any]) -> dict[str, Any]:
        """Set a session's target guest memory size, as QMP `balloon` does:
        num_pages = (guest RAM - size) / 4 KiB, then a config change. Refused,
        changing nothing, when the driver could not be told."""
        size = request.get("size")
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"balloon: size must be a whole number of bytes, got {size!r}")
        name = request.get("session")
        if name is None:
            if len(self.sessions) != 1:
                raise ValueError(
                    f"balloon: {len(self.sessions)} sessions are connected "
                    f"({', '.join(self.sessions) or 'none'}); name one with --session"
                )
            (name,) = self.sessions
        session = self.sessions.get(name) if isinstance(name, str) else None
        if session is None:
            raise ValueError(
                f"balloon: no session {name!r} (connected: {', '.join(self.sessions)})"
            )
        ram = session.guest_ram_bytes
        if ram == 0:
            raise ValueError(f"balloon: session {name} has no memory table yet")
        if not 0 < size <= ram:
            raise ValueError(
                f"balloon: size {size} is not between 1 byte and the guest's RAM ({ram} bytes)"
            )
        if not session.can_change_config:
            raise ValueError(
                f"balloon: session {name}'s front-end cannot be told of a config change "
                "(no backend channel, or the CONFIG protocol feature not negotiated)"
            )
        device = self.vhost.devices[name]
        # One target at a time: an undo must restore what the driver was told.
        async with self._balloon_targets:
            undo = device.set_target((ram - size) >> BALLOON_PFN_SHIFT)
            try:
                notified = await session.config_changed()
            except ChannelFailed as error:
                undo()
                raise ValueError(
                    f"balloon: session {name}: {error}; the target is unchanged"
                ) from None
            if not notified:
                undo()
                raise ValueError(
                    f"balloon: session {name}'s front-end refused the config change; "
                    "the target is unchanged"
                )
        return {"ok": True, "session": name, "balloon": device.balloon_status(ram)}

    @property
    def sessions(self) -> dict[str, Session]:
        return self.vhost.sessions

    @property
    def sessions_served(self) -> int:
        return self.vhost.sessions_served

    @property
    def session_ended(self) -> asyncio.Event:
        return self.vhost.session_ended

    def totals(self) -> DeviceStats:
        total = DeviceStats()
        total.add(self.finished)
        for device in self.vhost.devices.values():
            total.add(device.stats)
        return total

    async def serve(self, listener: socket.socket) -> None:
        """Accept connections until cancelled."""
        await self.vhost.serve(listener)

    def adopt(self, conn: socket.socket) -> None:
        """Serve an already-connected front-end (a socket passed with --fd)."""
        self.vhost.adopt(conn)

    def start(self, listener: socket.socket) -> None:
        self.vhost.start(listener)

    def _new_device(self, name: str, log: SessionLogger) -> BalloonDevice:
        device = BalloonDevice(
            self.settings.balloon,
            name,
            log,
            latency=LatencyInjection(self.latency.current, self.latency.big_lock),
        )
        histograms = self.metrics.session(name)
        if self._trace is not None:
            device.record_hooks.append(self._trace.write)
            device.balloon_hooks.append(self._trace.write)
            device.stats_hooks.append(self._trace.write)
        exposition = self.exposition

        def record_latencies(record: ReportRecord) -> None:
            bql_wait_ns = sum(record.bql_wait_ns.values())
            histograms.record(record, bql_wait_ns, record.injected_ns)
            exposition.observe(record, bql_wait_ns, record.injected_ns)

        device.record_hooks.append(record_latencies)
        device.record_hooks.extend(self.record_hooks)
        return device

    def _session_ended(self, session: Session, device: BalloonDevice) -> None:
        stats = device.stats
        self.finished.add(stats)
        self.metrics.end_session(session.name)
        session.log.info(
            "session ended: %d reports, %d entries, %d bytes reported, %d freed, "
            "%d skipped, %d discard errors, %d queue errors; %d pages inflated "
            "(%d bytes freed), %d deflated",
            stats.reports,
            stats.entries,
            stats.reported_bytes,
            stats.freed_bytes,
            stats.skipped_outside + stats.skipped_unaligned,
            stats.discard_errors,
            stats.queue_errors,
            stats.inflated_pages,
            stats.inflate_freed_bytes,
            stats.deflated_pages,
        )

    async def close(self) -> None:
        await self.vhost.close()
        for service in self._services:
            if service is self._control:
                assert self.settings.control_socket is not None
                await close_control(service, self.settings.control_socket)
            else:
                service.close()
                await service.wait_closed()
        await self.latency.close()
        if self._trace is not None:
            # Up to 2 s of writing out what is queued: not on the loop.
            await asyncio.to_thread(self._trace.close)


def _device_stats(session: Session) -> DeviceStats:
    stats = getattr(session.device, "stats", None)
    return stats if isinstance(stats, DeviceStats) else DeviceStats()
