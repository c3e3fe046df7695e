"""Per-queue vhost-user state: size, base, addresses, eventfds, enable.

A `Vring` owns the kick, call and err eventfds it was given (invariant 4);
replacing one closes the old one. The queue's thread signals the call and err
eventfds while the event loop may replace them, so both go through one lock:
a signal never lands on a closed fd, or on whatever reused its number. (The
kick fd is closed only once its thread has ended.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
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
# switch it off again at any moment. Reads therefore never depend on it:
# preadv2(RWF_NOWAIT) is non-blocking whatever the file's flags say. Writes
# cannot do that (eventfd writes answer RWF_NOWAIT with EOPNOTSUPP), and block
# only on a counter one short of 2**64-1: the flag is set right before the
# write, and a counter that poll says is full is left alone, so a peer must
# both clear the flag and fill the counter inside those few instructions.


def read_eventfd(fd: int) -> None:
    """Take the counter; BlockingIOError if it is zero. Never blocks."""
    try:
        os.preadv(fd, [bytearray(8)], -1, os.RWF_NOWAIT)
        return
    except OSError as error:
        if error.errno != errno.EOPNOTSUPP:
            raise
    # A kernel whose eventfd lacks RWF_NOWAIT: the flag, with its race.
    os.set_blocking(fd, False)
    os.read(fd, 8)


def signal_eventfd(fd: int) -> None:
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(0):
        return  # a full counter: a notification is pending anyway
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
