"""The vhost-user server: accepts front-ends, one session and one device each.

It knows no device: a factory makes one per connection, and a hook hears of
every session that ends. Sessions are independent: one ending, for whatever
reason, never touches another.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from vhost_balloon.backend.vhost.device import VirtioDevice
from vhost_balloon.backend.vhost.session import Session, SessionLogger

LOG = logging.getLogger("vhost_balloon")
ACCEPT_RETRY_S = 0.1

DeviceT = TypeVar("DeviceT", bound=VirtioDevice)
# name, the session's logger -> a new device for that session
DeviceFactory = Callable[[str, SessionLogger], DeviceT]


class VhostUserServer(Generic[DeviceT]):
    def __init__(
        self,
        device_factory: DeviceFactory[DeviceT],
        *,
        allow_unsealed_memory: bool = False,
        on_session_end: Callable[[Session, DeviceT], None] | None = None,
    ) -> None:
        self._device_factory = device_factory
        self._allow_unsealed_memory = allow_unsealed_memory
        self._on_session_end = on_session_end
        self.sessions: dict[str, Session] = {}
        self.devices: dict[str, DeviceT] = {}  # the device of each session, by name
        self.sessions_served = 0
        self.session_ended = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._accepting: asyncio.Task[None] | None = None

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
        device = self._device_factory(name, log)
        session = Session(
            name, conn, device, log, allow_unsealed_memory=self._allow_unsealed_memory
        )
        self.sessions[name] = session
        self.devices[name] = device
        log.info("front-end connected")
        task = asyncio.create_task(self._run(session, device), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, session: Session, device: DeviceT) -> None:
        try:
            await session.run()
        except Exception:  # a bug must not take the other sessions down
            session.log.exception("session failed")
            await session.close()
        finally:
            self.sessions.pop(session.name, None)
            self.devices.pop(session.name, None)
            self.sessions_served += 1
            if self._on_session_end is not None:
                self._on_session_end(session, device)
            self.session_ended.set()

    async def close(self) -> None:
        """Stop accepting, end every session and wait for them."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        for session in list(self.sessions.values()):
            with contextlib.suppress(OSError):
                session.channel.sock.shutdown(socket.SHUT_RDWR)  # ends its run loop
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


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
