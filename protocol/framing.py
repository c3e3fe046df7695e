"""vhost-user framing over a unix stream socket (sans-I/O, in the style of h11).

A frame is the 12-byte header (validated by `vhost_user.decode_header`)
followed by its `size` payload bytes; file descriptors travel beside the
bytes as SCM_RIGHTS. `FrameReader` takes what one receive returned (bytes
and the fds that came with them) and hands back complete frames with their
fds; the caller does the I/O and owns every fd the reader gives back. The
reader never reads, writes or closes anything: on an error it keeps the
fds it was given until the caller takes them (`take_fds`) to close them.

A frame carries every fd received since the previous frame was handed out.
The kernel attaches a sendmsg's fds to its first byte, so a caller that
wants each message's fds and no later ones receives at most
`bytes_needed` bytes at a time (the back-end does); one that receives
larger chunks (the mocked guest) gets fds that came with a later frame's
bytes on the frame completed first.

`socket` is imported for its constants and `CMSG_SPACE` (arithmetic) only,
to turn fds into and out of SCM_RIGHTS ancillary items.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vhost_balloon.protocol.errors import MessageError
from vhost_balloon.protocol.vhost_user import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    Header,
    decode_header,
)

_FD_SIZE = array.array("i").itemsize
# Room for MAX_FDS_PER_MESSAGE fds in one receive; more set MSG_CTRUNC.
ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _FD_SIZE)

Ancillary = list[tuple[int, int, bytes]]


def fds_from_ancillary(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds in recvmsg's ancillary items (SCM_RIGHTS only; a partial int is dropped)."""
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % _FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def fds_to_ancillary(fds: Sequence[int]) -> Ancillary:
    """sendmsg's ancillary items carrying `fds` (none for no fds)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


@dataclass(frozen=True, slots=True)
class Frame:
    header: Header
    data: bytes  # the whole frame: header and payload, as received
    fds: list[int]  # the caller's from now on

    @property
    def payload(self) -> bytes:
        return self.data[HEADER_SIZE:]


class FrameReader:
    """Bytes and fds in, whole vhost-user frames out."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._header: Header | None = None  # of the frame at the buffer's start

    def receive_data(
        self, data: bytes, fds: Sequence[int] = (), *, fds_truncated: bool = False
    ) -> None:
        """What one receive returned: its bytes and the fds that came with them.

        `fds_truncated` (MSG_CTRUNC) or more than MAX_FDS_PER_MESSAGE fds
        raise MessageError; the fds are kept first, for `take_fds`. Empty
        `data` adds nothing (end of stream is the caller's to notice).
        """
        self._fds.extend(fds)
        if fds_truncated or len(fds) > MAX_FDS_PER_MESSAGE:
            raise MessageError(None, f"more than {MAX_FDS_PER_MESSAGE} fds in one message")
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive.

        Raises MessageError for a header that cannot be accepted (bad
        version or flags, size over MAX_PAYLOAD_SIZE) as soon as its 12
        bytes are there, before any payload; the bytes stay buffered, so
        asking again raises again.
        """
        header = self._header
        if header is None:
            if len(self._buffer) < HEADER_SIZE:
                return None
            header = self._header = decode_header(bytes(self._buffer[:HEADER_SIZE]))
        end = HEADER_SIZE + header.size
        if len(self._buffer) < end:
            return None
        data = bytes(self._buffer[:end])
        del self._buffer[:end]
        self._header = None
        fds, self._fds = self._fds, []
        return Frame(header, data, fds)

    @property
    def bytes_needed(self) -> int:
        """Bytes still missing before `next_frame` can take its next step.

        The rest of the header while it is incomplete, then the rest of the
        frame; 0 when `next_frame` has what it needs.
        """
        if self._header is None:
            return max(0, HEADER_SIZE - len(self._buffer))
        return max(0, HEADER_SIZE + self._header.size - len(self._buffer))

    @property
    def header(self) -> Header | None:
        """The header of the frame in progress, once `next_frame` has decoded it."""
        return self._header

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out in a frame."""
        return len(self._buffer)

    @property
    def pending_fds(self) -> tuple[int, ...]:
        """Fds received and not yet handed out (still this reader's)."""
        return tuple(self._fds)

    def take_fds(self) -> list[int]:
        """Hand over the pending fds (to close them); the reader forgets them."""
        fds, self._fds = self._fds, []
        return fds

    def discard_data(self) -> None:
        """Drop the buffered bytes (the pending fds stay until taken)."""
        self._buffer.clear()
        self._header = None


__all__ = [
    "ANCILLARY_SIZE",
    "Frame",
    "FrameReader",
    "fds_from_ancillary",
    "fds_to_ancillary",
]
