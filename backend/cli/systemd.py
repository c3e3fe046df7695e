"""What systemd gives a service and asks of it: the sockets of socket
activation (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS, fds from 3) and the
readiness protocol (sd_notify(3): datagrams to $NOTIFY_SOCKET).

Written here rather than taken from a library: the protocol is one
environment check and one datagram, `sdnotify` has not changed since 2017,
and `systemd-python` needs libsystemd's headers to build.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from vhost_balloon.backend.cli.options import UsageError

LOG = logging.getLogger("vhost_balloon")
LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


def listen_fd(environ: dict[str, str] | None = None) -> int | None:
    """The one socket systemd passed to this process, or None if it passed
    none (no LISTEN_PID, or LISTEN_PID naming another process: a parent's
    variables, not ours). The variables are removed, as
    sd_listen_fds(unset_environment=1) does, so that children do not take
    them for theirs. UsageError if they are malformed or pass more than one."""
    env = os.environ if environ is None else environ
    pid_text, fds_text = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid_text is None:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not pid_text.isdigit():
        raise UsageError(f"LISTEN_PID={pid_text!r} is not a process id")
    if int(pid_text) != os.getpid():
        return None
    if fds_text is None or not fds_text.isdigit():
        raise UsageError(f"LISTEN_FDS={fds_text!r} is not a number of file descriptors")
    count = int(fds_text)
    if count != 1:
        raise UsageError(
            f"LISTEN_FDS={count}: one socket per instance is served (a .socket unit "
            "with one ListenStream=)"
        )
    return LISTEN_FDS_START


class Notifier:
    """sd_notify to $NOTIFY_SOCKET; a no-op when it is unset. A failure is
    logged once and never ends the service: readiness is advisory."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self._shown = path  # as systemd writes it: "@name", not a NUL byte
        # "@name" is in the abstract namespace; anything else is a path.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: str | int) -> None:
        """notify(READY=1, STATUS="serving ...")."""
        if not self._address or self._failed:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as error:
            self._failed = True
            LOG.warning("cannot notify systemd at %s: %s", self._shown, error)

    def ready(self, status: str) -> None:
        self.notify(READY=1, STATUS=status)

    def reloading(self) -> None:
        # Type=notify-reload wants the CLOCK_MONOTONIC time of the reload.
        self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.notify(STOPPING=1)
