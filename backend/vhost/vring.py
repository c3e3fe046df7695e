"""Per-queue vhost-user state: size, base, addresses, eventfds, enable.

A `Vring` owns the kick, call and err eventfds it was given (invariant 4);
replacing one closes the old one. The queue's thread signals the call and err
eventfds while the event loop may replace them, so both go through one lock:
a signal never lands on a closed fd, or on whatever reused its number. (The
kick fd is closed only once its thread has ended.)
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

from vhost_balloon.protocol.vhost_user import VringAddr
from vhost_balloon.protocol.virtqueue import DeviceQueue

_ONE = (1).to_bytes(8, "little")


class EventFdError(Exception):
    """An fd that is not an eventfd where one is required."""


def check_eventfd(fd: int) -> None:
    """Refuse anything but a plain eventfd: a regular file or pipe given as a
    kick fd would make the loop spin or block, and so would a semaphore
    eventfd (each read takes only 1 off its counter)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            fdinfo = info.read()
    except OSError as error:
        raise EventFdError(f"fd {fd} cannot be inspected: {error}") from None
    if target != "anon_inode:[eventfd]":
        raise EventFdError(f"fd is {target!r}, not an eventfd")
    if "eventfd-semaphore: 1" in fdinfo:
        raise EventFdError("fd is a semaphore eventfd (EFD_SEMAPHORE)")


# O_NONBLOCK lives on the open file the front-end shares with us, so it can
# switch it off again: set it before every read and write, so that a peer
# cannot make the event loop block (one fcntl pair, about a microsecond).


def read_eventfd(fd: int) -> None:
    os.set_blocking(fd, False)
    os.read(fd, 8)


def signal_eventfd(fd: int) -> None:
    os.set_blocking(fd, False)
    # A saturated counter (EAGAIN) means a notification is pending anyway.
    with contextlib.suppress(BlockingIOError):
        os.write(fd, _ONE)


@dataclass(slots=True)
class Vring:
    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    broken: bool = False
    queue: DeviceQueue | None = None
    fds_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def replace_fd(self, kind: str, fd: int | None) -> None:
        attribute = f"{kind}_fd"
        with self.fds_lock:
            old = getattr(self, attribute)
            if old is not None and old != fd:
                os.close(old)
            setattr(self, attribute, fd)

    def notify(self) -> bool:
        with self.fds_lock:
            if self.call_fd is None:
                return False
            signal_eventfd(self.call_fd)
            return True

    def signal_error(self) -> None:
        with self.fds_lock:
            if self.err_fd is not None:
                signal_eventfd(self.err_fd)

    def close(self) -> None:
        for kind in ("kick", "call", "err"):
            self.replace_fd(kind, None)
        self.queue = None
        self.started = False
