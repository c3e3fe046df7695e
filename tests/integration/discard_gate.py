"""A gate on the first discard syscall, shared by the tests that need a
report held in flight (the `gate` fixture is in conftest.py), and the order
of a record's timestamps."""

from __future__ import annotations

import threading

from vhost_balloon.backend.libc import punch_hole as real_punch_hole

# A record's timestamps, in the order a report meets them.
TIMESTAMPS = (
    "t_kick_ns",
    "t_start_ns",
    "t_popped_ns",
    "t_discard_start_ns",
    "t_discard_done_ns",
    "t_published_ns",
    "t_notified_ns",
)


class Gate:
    """Blocks the first discard syscall in its queue thread until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.calls = 0
        self.fails = False  # the held syscall raises (a bug, not an errno) once opened

    def punch_hole(self, fd: int, offset: int, length: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.opened.wait(30)
            if self.fails:
                raise RuntimeError("the gated discard failed")
        real_punch_hole(fd, offset, length)
