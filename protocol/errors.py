"""Typed errors raised by the pure protocol code.

Every way a peer can be wrong is one of these, so callers can turn it into a
log line, an error reply or a broken-device state without guessing.
"""

from __future__ import annotations

import enum


class ProtocolError(Exception):
    """Base of every error a peer's bytes can cause."""


class MessageError(ProtocolError):
    """A vhost-user message that cannot be accepted (bad header, size, fds)."""

    def __init__(self, request: int | None, reason: str) -> None:
        self.request = request
        self.reason = reason
        # A known request is an IntEnum member: name it; an unknown id by number.
        name = request.name if isinstance(request, enum.Enum) else None
        where = "message header" if request is None else name or f"request {request}"
        self.where = where
        super().__init__(f"{where}: {reason}")


class AddressError(ProtocolError):
    """An address range that is not fully inside one memory region."""


class MemoryFault(ProtocolError):
    """Guest memory that is mapped but has no page behind it any more (the
    front-end truncated the file): the session's memory is gone."""


class QueueErrorKind(enum.Enum):
    HEAD_OUT_OF_RANGE = "descriptor index >= queue size"
    NEXT_OUT_OF_RANGE = "next descriptor index >= table size"
    LOOP = "descriptor chain loops or is longer than its table"
    NESTED_INDIRECT = "indirect descriptor inside an indirect table"
    INDIRECT_WITH_NEXT = "indirect descriptor with the NEXT flag"
    INDIRECT_NOT_NEGOTIATED = "indirect descriptor without INDIRECT_DESC"
    INDIRECT_BAD_LENGTH = "indirect table length is 0, not a multiple of 16, or over the queue size"
    AVAIL_AHEAD = "avail.idx runs more than queue size ahead"
    ADDRESS = "ring or table address outside guest memory"
    OVERFLOW = "descriptor addr + len overflows 64 bits"
    READ_AFTER_WRITE = "device-readable descriptor after a device-writable one"
    BAD_LAYOUT = "invalid queue size or ring alignment"
    USED_OVERRUN = "more used entries than buffers in flight"


class QueueError(ProtocolError):
    """A malformed ring state: the queue cannot be processed any further."""

    def __init__(self, kind: QueueErrorKind, detail: str = "") -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"{kind.value}{': ' + detail if detail else ''}")

    def __reduce__(self) -> tuple[type[QueueError], tuple[QueueErrorKind, str]]:
        # Pickled as its arguments (the default would pass the message as `kind`).
        return (type(self), (self.kind, self.detail))
