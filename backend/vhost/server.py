"""The vhost-user server: accepts front-ends, one session and one device each.

It knows no device: a factory makes one per connection, and a hook hears of
every session that ends. Sessions are independent: one ending, for whatever
reason, never touches another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
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


# sun_path is 108 bytes on Linux, with the terminating NUL.
MAX_UNIX_PATH = 107
# Only the owner (the backend's user, who runs QEMU) may connect by default:
# whoever connects is handed the guest's RAM as a front-end would hand it.
DEFAULT_SOCKET_MODE = 0o600
Identity = tuple[int, int]  # (st_dev, st_ino) of a socket file


@dataclass(frozen=True, slots=True)
class UnixListener:
    """A listening socket and the file bind() made for it: remove() deletes
    that file, never one another backend bound at the same path since."""

    sock: socket.socket
    path: Path
    identity: Identity

    def remove(self) -> bool:
        return unlink_if_ours(self.path, self.identity)

    def close(self) -> None:
        self.sock.close()
        self.remove()


def listen_unix(path: Path, mode: int = DEFAULT_SOCKET_MODE) -> socket.socket:
    """A listening socket at `path` (see bind_unix) for a caller that never
    removes the file itself (its directory is temporary)."""
    return bind_unix(path, mode).sock


def bind_unix(path: Path, mode: int = DEFAULT_SOCKET_MODE, *, role: str = "") -> UnixListener:
    """Listen at `path`, created with `mode` whatever the umask; refuses to
    replace anything but a stale socket. Every error names the path (after
    `role`, e.g. "control socket ")."""
    check_unix_path(path)
    _remove_stale(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind_private(listener, path)
        identity = socket_identity(path)
        os.chmod(path, mode)  # before listen(): nobody has connected yet
        listener.listen(16)
    except OSError as error:
        listener.close()
        raise OSError(f"cannot listen on {role}{path}: {_reason(error)}") from None
    if identity is None:  # removed between bind and lstat: not ours to serve
        listener.close()
        raise OSError(f"cannot listen on {role}{path}: the socket file vanished at once")
    return UnixListener(listener, path, identity)


def check_unix_path(path: Path) -> None:
    """Refuse a path that does not fit in sockaddr_un, naming it."""
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        raise OSError(
            f"socket path {path} is {size} bytes, over the {MAX_UNIX_PATH} a unix socket "
            "allows: choose a shorter one"
        )


def _remove_stale(path: Path) -> None:
    try:
        if not (path.exists() or path.is_symlink()):
            return
    except OSError as error:
        raise OSError(f"cannot use socket path {path}: {_reason(error)}") from None
    if not path.is_socket():
        raise OSError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale socket from a previous run
        else:
            raise OSError(f"another backend is already listening on {path}")


def _bind_private(listener: socket.socket, path: Path) -> None:
    # The umask is the process's: bind() under 0177 makes the file 0600 from
    # its first instant, so no client connects while its mode is too open.
    # Nothing else of ours creates files here (services start after this).
    previous = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(previous)


def socket_identity(path: Path) -> Identity | None:
    """(st_dev, st_ino) of the file at `path` itself (not a link's target)."""
    try:
        info = path.lstat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def unlink_if_ours(path: Path, identity: Identity) -> bool:
    """Remove `path` only if it is still the file with `identity`: after
    `rm x.sock`, another backend may have bound x.sock, and it stays."""
    if socket_identity(path) != identity:
        return False
    try:
        path.unlink()
    except OSError:
        return False
    return True


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def socket_from_fd(fd: int) -> tuple[socket.socket, bool]:
    """The unix stream socket inherited from the caller (--fd), and whether it
    is listening (accept many front-ends) or already connected (serve one).
    Anything else (a negative or closed fd, a file, a TCP or datagram socket,
    a socket neither listening nor connected) is refused, naming the fd."""
    if fd < 0:
        raise OSError(f"fd {fd} is not a file descriptor (must be 0 or more)")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        if error.errno == errno.EBADF:
            raise OSError(f"fd {fd} is not open in this process") from None
        raise OSError(f"fd {fd} is not a socket: {_reason(error)}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()  # the caller's fd: leave it open
        raise OSError(f"fd {fd} is not a unix stream socket")
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    if not listening and not _connected(sock):
        sock.detach()
        raise OSError(f"fd {fd} is a unix socket neither listening nor connected")
    if listening and _hung_up(fd):
        # shutdown() on a listener: always readable, accept() always EAGAIN,
        # so the accept loop would spin a CPU for good.
        sock.detach()
        raise OSError(f"fd {fd} is a listening socket that was shut down")
    os.set_inheritable(fd, False)
    return sock, listening


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
