"""Framed vhost-user messages over a non-blocking unix stream socket.

Sends a frame with its fds as SCM_RIGHTS; receives whole frames (12-byte
header validated by `protocol.vhost_user.decode_header`, then the payload)
together with any fds that came along. The framing is `protocol.framing`'s
`FrameReader`; this module only moves bytes. Every wait has a timeout, and a
peer that closes the socket gives `BackendClosedError`, never a hang.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence

from vhost_balloon.guest.errors import BackendClosedError, BadReplyError, ReplyTimeoutError
from vhost_balloon.protocol.errors import MessageError
from vhost_balloon.protocol.framing import (
    ANCILLARY_SIZE,
    Frame,
    FrameReader,
    fds_from_ancillary,
    fds_to_ancillary,
)

_RECV_CHUNK = 65536


class Channel:
    """One end of a vhost-user socket, owned by this object."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._reader = FrameReader()  # bytes and fds received, not yet handed out
        self._eof = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def peer_closed(self) -> bool:
        return self._eof

    # -- sending ------------------------------------------------------------

    async def send(self, data: bytes, fds: Sequence[int] = (), *, timeout: float) -> None:
        """Send `data` with `fds` attached to its first byte."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        view = memoryview(data)
        ancillary = fds_to_ancillary(fds)
        while view:
            try:
                sent = self.sock.sendmsg([view], ancillary)
            except BlockingIOError:
                await self._wait_io(writable=True, deadline=deadline, what="sending")
                continue
            except (BrokenPipeError, ConnectionResetError) as error:
                self._eof = True
                raise BackendClosedError(
                    f"the back-end closed the {self.name} while the front-end was sending"
                ) from error
            view = view[sent:]
            ancillary = []  # the fds went with the first chunk

    # -- receiving ----------------------------------------------------------

    async def recv_frame(
        self, *, timeout: float | None, waiting_for: str
    ) -> tuple[bytes, list[int]]:
        """One whole frame (header + payload) and the fds received with it.

        `timeout` None waits forever (the back-end channel's idle wait).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (frame := self._next_frame(waiting_for)) is None:
            if self._eof:
                raise BackendClosedError(
                    f"the back-end closed the {self.name} while the front-end was waiting "
                    f"for {waiting_for}"
                )
            if not self._recv_some():
                await self._wait_io(writable=False, deadline=deadline, what=waiting_for)
        return frame.data, frame.fds

    def _next_frame(self, waiting_for: str) -> Frame | None:
        try:
            return self._reader.next_frame()
        except MessageError as error:
            raise BadReplyError(
                f"malformed message on the {self.name} while waiting for {waiting_for}: {error}"
            ) from None

    def _recv_some(self) -> bool:
        """Read what is there; False if nothing was (would block)."""
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(_RECV_CHUNK, ANCILLARY_SIZE)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            self._eof = True
            return True
        if not data:
            self._eof = True
        self._reader.receive_data(data, fds_from_ancillary(ancdata))
        return True

    def peek_eof(self) -> bool:
        """Whether the peer has closed (looks without consuming anything)."""
        if self._eof:
            return True
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            self._eof = True
            return True
        if not data:
            self._eof = True
        return self._eof

    async def wait_eof(self, timeout: float) -> bool:
        """Discard incoming bytes until the peer closes; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._eof:
            if self._recv_some():
                self._reader.discard_data()
                self.close_received_fds()
                continue
            try:
                await self._wait_io(writable=False, deadline=deadline, what="the peer to close")
            except ReplyTimeoutError:
                return False
        return True

    async def _wait_io(self, *, writable: bool, deadline: float | None, what: str) -> None:
        loop = asyncio.get_running_loop()
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise ReplyTimeoutError(f"no answer on the {self.name} while waiting for {what}")
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = self.sock.fileno()
        if writable:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, remaining)
        except TimeoutError:
            raise ReplyTimeoutError(
                f"no answer on the {self.name} within the timeout while waiting for {what}"
            ) from None
        finally:
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    def close_received_fds(self) -> None:
        for fd in self._reader.pending_fds:
            os.close(fd)
        self._reader.take_fds()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.close_received_fds()
        self.sock.close()
