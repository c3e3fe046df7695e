"""Framed vhost-user I/O with file descriptors on a non-blocking unix socket.

asyncio's streams cannot carry SCM_RIGHTS, so this reads with recvmsg when
the loop says the socket is readable. Every fd received is handed to the
caller with its message or, on any error, closed here.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence

from vhost_balloon.protocol.errors import MessageError
from vhost_balloon.protocol.vhost_user import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    Header,
    decode_header,
)

_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * array.array("i").itemsize)


class ConnectionClosed(Exception):
    """The peer closed the connection (possibly mid-message)."""


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_from_ancillary(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


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

    async def _receive(self, size: int, fds: list[int]) -> bytes:
        chunks: list[bytes] = []
        remaining = size
        while remaining:
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(remaining, _ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            fds.extend(_fds_from_ancillary(ancillary))
            if flags & socket.MSG_CTRUNC:
                raise MessageError(None, f"more than {MAX_FDS_PER_MESSAGE} fds in one message")
            if not data:
                raise ConnectionClosed(
                    "connection closed"
                    if remaining == size and not chunks and size == HEADER_SIZE
                    else f"connection closed mid-message ({size - remaining} of {size} bytes)"
                )
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks)

    async def receive(self) -> tuple[Header, bytes, list[int]]:
        """One frame. On any error the fds received so far are closed."""
        fds: list[int] = []
        try:
            header = decode_header(await self._receive(HEADER_SIZE, fds))
            payload = await self._receive(header.size, fds)
        except BaseException:
            close_fds(fds)
            raise
        return header, payload, fds

    async def send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(frame)
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        while view:
            try:
                sent = self.sock.sendmsg([view], ancillary)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)
                continue
            view = view[sent:]
            ancillary = []

    def close(self) -> None:
        self.sock.close()
