"""Run `vhost-balloon serve` and the mocked guest as separate processes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def backend(sock: Path, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """`vhost-balloon serve --socket-path SOCK OPTIONS...`, stopped on exit."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vhost_balloon.backend",
            "serve",
            "--socket-path",
            str(sock),
            *options,
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the backend did not start")
            time.sleep(0.02)
        yield server
    finally:
        server.terminate()
        server.wait(timeout=30)


def guest_command(sock: Path) -> list[str]:
    """`python -m vhost_balloon.guest --socket-path SOCK --json`, to add options to."""
    return [sys.executable, "-m", "vhost_balloon.guest", "--socket-path", str(sock), "--json"]


def run_guest(sock: Path, *options: str) -> dict[str, Any]:
    """`python -m vhost_balloon.guest --socket-path SOCK --json OPTIONS...`; its summary."""
    guest = subprocess.run(
        [*guest_command(sock), *options],
        capture_output=True,
        text=True,
        check=True,
    )
    summary: dict[str, Any] = json.loads(guest.stdout)
    return summary


_HEADER = struct.Struct("<III")


def malformed_message(rng: random.Random) -> tuple[bytes, list[int]]:
    """One malformed vhost-user message and the fds that go with it (the
    caller closes them): a header of random bits, a request that lies about
    its size, or GET_FEATURES carrying an fd."""
    choice = rng.randrange(3)
    if choice == 0:
        return os.urandom(_HEADER.size), []
    if choice == 1:
        return _HEADER.pack(1, 0x1, 0xFFFF_FFF0) + b"x" * 64, []
    return _HEADER.pack(1, 0x1, 0), [os.eventfd(0)]
