"""What each ended session leaves behind in a long-running `serve`.

Runs `vhost-balloon serve` in its own process, then CYCLES front-ends one
after another against it, each a whole session as QEMU makes one: features,
a memory table, three vrings with their eventfds, one report, disconnect.
After a warm-up, prints the backend's RSS and open fds before and after, and
the RSS growth per session. A server that serves VMs for months must stay
flat.

With --malformed, each cycle is instead a connection that sends one malformed
message (a header of random bits, a request that lies about its size, or an
fd where none belongs) and hangs up, as a broken or hostile front-end would.

    .venv/bin/python benchmarks/session_churn.py [--cycles 2000] [--warmup 200] [--malformed]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import harness

from vhost_balloon.guest.driver import DriverConfig
from vhost_balloon.guest.runner import GuestOptions, MockGuest


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sessions(sock: Path, count: int) -> None:
    options = GuestOptions(
        socket_path=str(sock),
        memory_bytes=128 << 20,
        driver=DriverConfig(report_timeout=10.0, populate=False),
    )
    for _ in range(count):
        async with MockGuest(options) as guest:
            await guest.run(1)


def malformed_connections(sock: Path, count: int, rng: random.Random) -> None:
    for _ in range(count):
        data, fds = harness.malformed_message(rng)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(str(sock))
                rights = struct.pack(f"{len(fds)}i", *fds)
                conn.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else []
                )
                # The backend hangs up on it; waiting for that keeps one in flight.
                conn.settimeout(10)
                with contextlib.suppress(ConnectionResetError):  # unread bytes left
                    while conn.recv(4096):
                        pass
        finally:
            for fd in fds:
                os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument(
        "--malformed", action="store_true", help="malformed connections instead of sessions"
    )
    args = parser.parse_args()
    rng = random.Random(7)

    def cycles(sock: Path, count: int) -> None:
        if args.malformed:
            malformed_connections(sock, count, rng)
        else:
            asyncio.run(sessions(sock, count))

    with tempfile.TemporaryDirectory(prefix="vb-churn-") as tmp:
        sock = Path(tmp) / "b.sock"
        with harness.backend(sock, "--discard", "punch-hole") as server:
            cycles(sock, args.warmup)
            time.sleep(0.5)  # the last session's end is logged and accounted
            rss_before, fds_before = rss_kib(server.pid), open_fds(server.pid)
            start = time.monotonic()
            cycles(sock, args.cycles)
            seconds = time.monotonic() - start
            time.sleep(0.5)
            rss_after, fds_after = rss_kib(server.pid), open_fds(server.pid)
    growth = rss_after - rss_before
    what = "malformed connections" if args.malformed else "sessions"
    print(f"{args.cycles} {what} after {args.warmup} of warm-up, {seconds:.0f} s")
    print(f"backend RSS   {rss_before} KiB -> {rss_after} KiB ({growth:+d} KiB)")
    print(f"per cycle     {growth / args.cycles:+.2f} KiB")
    print(f"backend fds   {fds_before} -> {fds_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
