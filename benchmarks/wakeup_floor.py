"""The floor under every hold window: what one eventfd hop costs on this machine.

A report's hold window, as the guest sees it, ends with the backend's call
signal (an eventfd write) and the front-end's wake-up (a read in another
process, through its event loop). The kick at its start is the same hop the
other way. No backend can go below these hops, so they are measured here
and quoted as the floor (docs/benchmarks.md).

Each hop is timed as half a ping-pong round trip between two eventfds,
medians of several repetitions of many round trips:

- process -> process, both blocked in read(2): the kernel's wake-up alone;
- process -> process, the receiver in an asyncio loop (add_reader), as the
  mocked guest's front-end and the backend's kick reader wait today;
- thread -> thread in one process, both blocked in read(2) (the GIL is
  released in the syscall): what a per-queue worker thread would pay to
  hand a record to the event loop, or the loop to wake a worker;
- process -> process one way, after both sides were idle for --idle-ms:
  a report's kick and call are hops of this kind (the guest spends
  milliseconds between reports, the backend milliseconds in the discard),
  and on a virtual machine an idle vCPU is halted, so its wake-up costs
  more than in a ping-pong, which keeps both CPUs busy. Timed from the
  write to the reader's return, on CLOCK_MONOTONIC, which both processes
  share.

    .venv/bin/python benchmarks/wakeup_floor.py [--runs 5] [--trips 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable

ONE = (1).to_bytes(8, "little")


def _echo_blocking(ping: int, pong: int, trips: int) -> None:
    for _ in range(trips):
        os.read(ping, 8)
        os.write(pong, ONE)


def _echo_asyncio(ping: int, pong: int, trips: int) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        seen = 0

        def on_ping() -> None:
            nonlocal seen
            os.read(ping, 8)
            os.write(pong, ONE)
            seen += 1
            if seen == trips and not done.done():
                done.set_result(None)

        loop.add_reader(ping, on_ping)
        await done
        loop.remove_reader(ping)

    asyncio.run(run())


def _round_trips_ns(ping: int, pong: int, trips: int) -> list[int]:
    times = []
    for _ in range(trips):
        start = time.perf_counter_ns()
        os.write(ping, ONE)
        os.read(pong, 8)
        times.append(time.perf_counter_ns() - start)
    return times


def _in_child(echo: Callable[[int, int, int], None], trips: int) -> list[int]:
    ping, pong = os.eventfd(0), os.eventfd(0)
    pid = os.fork()
    if pid == 0:  # the echoing process
        try:
            echo(ping, pong, trips)
        finally:
            os._exit(0)
    try:
        return _round_trips_ns(ping, pong, trips)
    finally:
        os.waitpid(pid, 0)
        os.close(ping)
        os.close(pong)


def _one_way_after_idle(idle_s: float, trips: int, writer_side: bool = False) -> list[int]:
    """Write to a process blocked in read(2) after `idle_s` of quiet; the
    time from before the write to the reader's return, as the reader saw it
    (or, `writer_side`, how long the write(2) itself took: the notify's own
    cost inside a backend's kick-to-notify, the wake-up of the other CPU
    included)."""
    ping = os.eventfd(0)
    stamps_r, stamps_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the reader
        try:
            for _ in range(trips):
                os.read(ping, 8)
                os.write(stamps_w, time.monotonic_ns().to_bytes(8, "little"))
        finally:
            os._exit(0)
    times = []
    try:
        for _ in range(trips):
            time.sleep(idle_s)
            sent = time.monotonic_ns()
            os.write(ping, ONE)
            written = time.monotonic_ns()
            woke = int.from_bytes(os.read(stamps_r, 8), "little")
            times.append(written - sent if writer_side else woke - sent)
        return times
    finally:
        os.waitpid(pid, 0)
        for fd in (ping, stamps_r, stamps_w):
            os.close(fd)


def _in_thread(trips: int) -> list[int]:
    ping, pong = os.eventfd(0), os.eventfd(0)
    echo = threading.Thread(target=_echo_blocking, args=(ping, pong, trips))
    echo.start()
    try:
        return _round_trips_ns(ping, pong, trips)
    finally:
        echo.join()
        os.close(ping)
        os.close(pong)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trips", type=int, default=2000)
    parser.add_argument("--idle-ms", type=float, default=10.0, help="quiet before each one-way hop")
    parser.add_argument("--idle-trips", type=int, default=200, help="one-way hops per run")
    args = parser.parse_args()
    # (name, measure, divisor from ns to the hop's us: a round trip is two hops)
    hops: list[tuple[str, Callable[[], list[int]], int]] = [
        ("process -> process (blocked read)", lambda: _in_child(_echo_blocking, args.trips), 2000),
        (
            "process -> process (asyncio receiver)",
            lambda: _in_child(_echo_asyncio, args.trips),
            2000,
        ),
        ("thread -> thread (blocked read)", lambda: _in_thread(args.trips), 2000),
        (
            f"process -> process, one way, {args.idle_ms:g} ms idle",
            lambda: _one_way_after_idle(args.idle_ms / 1000, args.idle_trips),
            1000,
        ),
        (
            f"  the write(2) itself, {args.idle_ms:g} ms idle",
            lambda: _one_way_after_idle(args.idle_ms / 1000, args.idle_trips, writer_side=True),
            1000,
        ),
    ]
    print(
        f"one eventfd hop = half a round trip ({args.trips} per run), or one way "
        f"after a quiet spell ({args.idle_trips} per run); medians of {args.runs} runs"
    )
    print(f"{'hop':40} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8}")
    for name, measure, divisor in hops:
        p50s, p90s, p99s = [], [], []
        for _ in range(args.runs):
            halves = sorted(t / divisor for t in measure())
            p50s.append(halves[len(halves) // 2])
            p90s.append(halves[int(len(halves) * 0.9)])
            p99s.append(halves[int(len(halves) * 0.99)])
        print(
            f"{name:40} {statistics.median(p50s):8.1f} {statistics.median(p90s):8.1f} "
            f"{statistics.median(p99s):8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
