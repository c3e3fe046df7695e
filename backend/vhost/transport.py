"""Framed vhost-user I/O with file descriptors on a non-blocking unix socket.

asyncio's streams cannot carry SCM_RIGHTS, so this reads with recvmsg when
the loop says the socket is readable. The framing (header, payload, fds) is
`protocol.framing.FrameReader`'s; this module only moves bytes. It receives
no more than the frame in progress still needs, so a frame's fds are the
ones its own bytes brought. Every fd received is handed to the caller with
its message or, on any error, closed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence

from vhost_balloon.protocol.framing import (
    ANCILLARY_SIZE,
    FrameReader,
    fds_from_ancillary,
    fds_to_ancillary,
)
from vhost_balloon.protocol.vhost_user import HEADER_SIZE, Header


class ConnectionClosed(Exception):
    """The peer closed the connection (possibly mid-message)."""


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _closed(reader: FrameReader) -> ConnectionClosed:
    """What the peer's end of stream cut short: the header or the payload."""
    if reader.header is None:
        got, size = reader.buffered, HEADER_SIZE
    else:
        got, size = reader.buffered - HEADER_SIZE, reader.header.size
    # As before the framing moved to protocol/: a part of HEADER_SIZE bytes of
    # which nothing arrived counts as a clean close (a 12-byte payload too).
    if got == 0 and size == HEADER_SIZE:
        return ConnectionClosed("connection closed")
    return ConnectionClosed(f"connection closed mid-message ({got} of {size} bytes)")


class MessageChannel:
    """Reads whole vhost-user frames (header, payload, fds) and writes frames."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def _wait(self, writable: bool) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        fileno = self.sock.fileno()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        if writable:
            self._loop.add_writer(fileno, ready)
        else:
            self._loop.add_reader(fileno, ready)
        try:
            await future
        finally:
            if writable:
                self._loop.remove_writer(fileno)
            else:
                self._loop.remove_reader(fileno)

    async def _receive_into(self, reader: FrameReader) -> None:
        """One recvmsg of at most what the frame in progress still needs."""
        while True:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(reader.bytes_needed, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            reader.receive_data(
                data,
                fds_from_ancillary(ancillary),
                fds_truncated=bool(flags & socket.MSG_CTRUNC),
            )
            if not data:
                raise _closed(reader)
            return

    async def receive(self) -> tuple[Header, bytes, list[int]]:
        """One frame. On any error the fds received so far are closed."""
        reader = FrameReader()
        try:
            while (frame := reader.next_frame()) is None:
                await self._receive_into(reader)
        except BaseException:
            close_fds(reader.take_fds())
            raise
        return frame.header, frame.payload, frame.fds

    async def send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(frame)
        ancillary = fds_to_ancillary(fds)
        while view:
            try:
                sent = self.sock.sendmsg([view], ancillary)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            view = view[sent:]
            ancillary = []

    def hang_up(self) -> None:
        """End the connection from our side: a pending receive sees EOF."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()
