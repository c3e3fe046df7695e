"""The vhost-user server: accepts front-ends, one session (and device) each.

Sessions are independent: one ending, for whatever reason, never touches
another. Discards of every session share one thread pool so a long
punch-hole never blocks the event loop (it is sized for injected per-entry
delays, which sleep in those threads). The server also owns the latency
runtime (settings, BQL, mmap contention), the metrics and the control socket.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.balloon.stats import DeviceStats
from vhost_balloon.backend.latency.injection import LatencySettings
from vhost_balloon.backend.latency.runtime import Runtime
from vhost_balloon.backend.libc import precise_sleeps_for_this_thread
from vhost_balloon.backend.observe.control import close_control, serve_control
from vhost_balloon.backend.observe.metrics import Metrics, serve_metrics
from vhost_balloon.backend.observe.trace import TraceWriter
from vhost_balloon.backend.vhost.session import Session, SessionLogger

LOG = logging.getLogger("vhost_balloon")
DISCARD_THREADS = 16
ACCEPT_RETRY_S = 0.1


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
    ) -> None:
        self.settings = settings
        self.record_hooks = list(record_hooks)  # given every report of every session
        self.sessions: dict[str, Session] = {}
        self.finished = DeviceStats()  # totals of sessions that have ended
        self.sessions_served = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=DISCARD_THREADS,
            thread_name_prefix="discard",
            initializer=precise_sleeps_for_this_thread,
        )
        self._trace = TraceWriter(settings.trace_path) if settings.trace_path else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._accepting: asyncio.Task[None] | None = None
        self.session_ended = asyncio.Event()
        self.runtime = Runtime(settings.latency)
        self.metrics = Metrics()
        self._services: list[asyncio.AbstractServer] = []
        self._control: asyncio.AbstractServer | None = None

    async def start_services(self) -> None:
        """Contention threads, the control socket and the metrics endpoint."""
        precise_sleeps_for_this_thread()  # the event loop's thread: timer wake-ups
        await self.runtime.start()
        if self.settings.control_socket is not None:
            self._control = await serve_control(self.settings.control_socket, self.handle_control)
            self._services.append(self._control)
        if self.settings.metrics_address is not None:
            host, port = self.settings.metrics_address
            self._services.append(await serve_metrics(host, port, self.render_metrics))

    def render_metrics(self) -> str:
        return self.metrics.render(self.totals().counters(), len(self.sessions))

    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's commands: stats, get, set."""
        command = request.get("cmd")
        if command == "get":
            return {"ok": True, "settings": self.runtime.describe()}
        if command == "set":
            await self.runtime.update(request)
            return {"ok": True, "settings": self.runtime.describe()}
        if command == "stats":
            sessions = {}
            for name, session in self.sessions.items():
                histograms = self.metrics.session(name)
                sessions[name] = {
                    "state": session.state.value,
                    **_device_stats(session).as_dict(),
                    "hold_us": histograms.percentiles("hold"),
                    "discard_us": histograms.percentiles("discard"),
                    "bql_wait_us": histograms.percentiles("bql_wait"),
                }
            return {
                "ok": True,
                "totals": self.totals().as_dict(),
                "sessions_served": self.sessions_served,
                "sessions": sessions,
                "settings": self.runtime.describe(),
            }
        raise ValueError(f"unknown command {command!r}; accepted: stats, get, set")

    def totals(self) -> DeviceStats:
        total = DeviceStats()
        total.add(self.finished)
        for session in self.sessions.values():
            total.add(_device_stats(session))
        return total

    async def serve(self, listener: socket.socket) -> None:
        """Accept connections until cancelled."""
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as error:
                # EMFILE, ECONNABORTED, ENOBUFS: one failed accept must not stop
                # the server from accepting ever again.
                LOG.error("accepting a front-end failed: %s; retrying", error)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            self._start_session(conn)

    def adopt(self, conn: socket.socket) -> None:
        """Serve an already-connected front-end (a socket passed with --fd)."""
        self._start_session(conn)

    def start(self, listener: socket.socket) -> None:
        self._accepting = asyncio.create_task(self.serve(listener), name="accept")

    def _start_session(self, conn: socket.socket) -> None:
        name = f"s{next(self._ids)}"
        log = SessionLogger(LOG, {"session": name})
        device = BalloonDevice(
            self.settings.balloon,
            self._executor,
            name,
            log,
            latency=self.runtime.current,
            big_lock=self.runtime.big_lock,
        )
        histograms = self.metrics.session(name)
        if self._trace is not None:
            device.record_hooks.append(self._trace.write)
        device.record_hooks.append(
            lambda record: histograms.record(
                record, sum(record.bql_wait_ns.values()), record.injected_ns
            )
        )
        device.record_hooks.extend(self.record_hooks)
        session = Session(
            name, conn, device, log, allow_unsealed_memory=self.settings.allow_unsealed_memory
        )
        self.sessions[name] = session
        log.info("front-end connected")
        task = asyncio.create_task(self._run(session), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, session: Session) -> None:
        try:
            await session.run()
        except Exception:  # a bug must not take the other sessions down
            session.log.exception("session failed")
            await session.close()
        finally:
            stats = _device_stats(session)
            self.finished.add(stats)
            self.sessions.pop(session.name, None)
            self.metrics.end_session(session.name)
            self.sessions_served += 1
            session.log.info(
                "session ended: %d reports, %d entries, %d bytes reported, %d freed, "
                "%d skipped, %d discard errors, %d queue errors",
                stats.reports,
                stats.entries,
                stats.reported_bytes,
                stats.freed_bytes,
                stats.skipped_outside + stats.skipped_unaligned,
                stats.discard_errors,
                stats.queue_errors,
            )
            self.session_ended.set()

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        for session in list(self.sessions.values()):
            with contextlib.suppress(OSError):
                session.channel.sock.shutdown(socket.SHUT_RDWR)  # ends its run loop
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for service in self._services:
            if service is self._control:
                assert self.settings.control_socket is not None
                await close_control(service, self.settings.control_socket)
            else:
                service.close()
                await service.wait_closed()
        await self.runtime.close()
        self._executor.shutdown(wait=True)
        if self._trace is not None:
            self._trace.close()


def _device_stats(session: Session) -> DeviceStats:
    stats = getattr(session.device, "stats", None)
    return stats if isinstance(stats, DeviceStats) else DeviceStats()


def listen_unix(path: Path) -> socket.socket:
    """A listening socket at `path`; refuses to replace anything but a stale socket."""
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket from a previous run
        else:
            raise OSError(f"another backend is already listening on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener


def socket_from_fd(fd: int) -> tuple[socket.socket, bool]:
    """The unix stream socket inherited from the caller (--fd), and whether it
    is listening (accept many front-ends) or already connected (serve one)."""
    try:
        listener = socket.socket(fileno=fd)
    except OSError as error:
        raise OSError(f"fd {fd} is not a socket: {error.strerror}") from None
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        listener.detach()
        raise OSError(f"fd {fd} is not a unix stream socket")
    os.set_inheritable(fd, False)
    return listener, bool(listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
