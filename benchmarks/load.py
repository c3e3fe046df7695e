"""Many sessions for a long time, one of them hostile: do the others keep their
hold times, and does the backend give back everything the sessions took?

Runs `vhost-balloon serve` in its own process, then twice, for SECONDS each:
- quiet: GOOD mocked guests at once (default 63), spread over worker
  processes, each reporting every PACE ms without writing its pages;
- hostile: the same, plus one hostile front-end that keeps its reporting
  ring full of useless chains (outside RAM, unaligned) and kicks every
  millisecond, and meanwhile opens a new connection every 0.2 s that sends
  a malformed message (a bad header, a request that lies about its size,
  fds where none belong) and hangs up.
Prints, for each run: reports, the good guests' hold p50 / p99 (the hold as
the guest saw it: chain available to used entry seen, and the backend's
kick-to-notify from its trace), the worst session's p99, report timeouts;
then hostile / quiet, and the backend's RSS, fds and sessions table before,
between and after (the leak check).

    .venv/bin/python benchmarks/load.py                    # 63 + 1 sessions, 600 s per run
    .venv/bin/python benchmarks/load.py --seconds 60       # a shorter look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness

from vhost_balloon.backend.observe.control import control_request
from vhost_balloon.guest.driver import DriverConfig
from vhost_balloon.guest.errors import GuestError, ReportTimeoutError
from vhost_balloon.guest.runner import GuestOptions, MockGuest
from vhost_balloon.protocol.virtqueue import Buffer

GUESTS_PER_WORKER = 8
MEMORY = 128 << 20


@dataclass
class GuestOutcome:
    reports: int
    holds_us: list[float]
    timeouts: int
    error: str | None


def _options(sock: str) -> GuestOptions:
    return GuestOptions(
        socket_path=sock,
        memory_bytes=MEMORY,
        driver=DriverConfig(report_timeout=10.0, populate=False, integrity_bytes=1 << 20),
        connect_timeout=30.0,
    )


async def _good_guest(sock: str, deadline: float, pace_s: float, seed: int) -> GuestOutcome:
    rng = random.Random(seed)
    holds: list[float] = []
    timeouts = 0
    try:
        async with MockGuest(_options(sock)) as guest:
            await asyncio.sleep(rng.uniform(0, pace_s))  # not all in step
            while time.monotonic() < deadline:
                try:
                    report = await guest.report()
                except ReportTimeoutError:
                    timeouts += 1  # its chain is still in flight: this guest stops here
                    break
                holds.append(report.hold_ns / 1000)
                await asyncio.sleep(pace_s)
            if not guest.driver.verify_integrity_region():
                return GuestOutcome(len(holds), holds, timeouts, "integrity region changed")
    except GuestError as error:
        return GuestOutcome(len(holds), holds, timeouts, f"{type(error).__name__}: {error}")
    return GuestOutcome(len(holds), holds, timeouts, None)


def good_worker(sock: str, count: int, seconds: float, pace_s: float, seed: int) -> list[Any]:
    """One worker process: `count` good guests in one event loop."""

    async def run() -> list[GuestOutcome]:
        deadline = time.monotonic() + seconds
        return list(
            await asyncio.gather(
                *(_good_guest(sock, deadline, pace_s, seed * 100 + i) for i in range(count))
            )
        )

    return [outcome.__dict__ for outcome in asyncio.run(run())]


async def _flood(sock: str, deadline: float) -> int:
    """A session that keeps its ring full of useless chains and kicks every ms."""
    posted = 0
    async with MockGuest(_options(sock)) as hostile:
        driver = hostile.driver
        index = driver.reporting_queue
        vq = driver.queue(index)
        block = driver.layout.blocks[0]
        useless = (Buffer(1 << 62, 4096, True), Buffer(block.gpa + 512, 4096, True))
        while time.monotonic() < deadline:
            vq.get_used()
            while vq.free_descriptors:
                vq.add([useless[posted % 2]])
                posted += 1
            hostile.frontend.kick(index)
            await asyncio.sleep(0.001)
    return posted


async def _churn(sock: str, deadline: float) -> int:
    """New connections that send something malformed and hang up."""
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    sent = 0
    while time.monotonic() < deadline:
        data, fds = harness.malformed_message(rng)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.setblocking(False)
            try:
                await loop.sock_connect(conn, sock)
                rights = struct.pack(f"{len(fds)}i", *fds)
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)] if fds else []
                conn.sendmsg([data], ancillary)
                sent += 1
            except OSError:
                pass
        for fd in fds:
            os.close(fd)
        await asyncio.sleep(0.2)
    return sent


async def _nothing(_sock: str, _deadline: float) -> int:
    return 0


def hostile_worker(sock: str, seconds: float, kind: str) -> dict[str, int]:
    flood = _flood if kind in ("both", "flood") else _nothing
    churn = _churn if kind in ("both", "churn") else _nothing

    async def run() -> dict[str, int]:
        deadline = time.monotonic() + seconds
        posted, churned = await asyncio.gather(flood(sock, deadline), churn(sock, deadline))
        return {"chains_posted": posted, "malformed_connections": churned}

    return asyncio.run(run())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _backend_state(pid: int, control: Path) -> dict[str, int]:
    stats = control_request(control, {"cmd": "stats"})
    return {
        "rss_kib": _rss_kib(pid),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "sessions": len(stats["sessions"]),
    }


def _wait_for_no_sessions(control: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while control_request(control, {"cmd": "stats"})["sessions"]:
        if time.monotonic() > deadline:
            raise RuntimeError("sessions still open after their guests left")
        time.sleep(0.1)


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _cpu_jiffies(pid: int) -> int:
    """utime + stime of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def run_once(
    sock: Path, trace: Path, args: argparse.Namespace, *, hostile: bool, seed: int, seconds: float
) -> dict[str, Any]:
    trace.write_bytes(b"")  # the backend appends: this run's records only
    workers = -(-args.good // GUESTS_PER_WORKER)
    counts = [GUESTS_PER_WORKER] * (workers - 1) + [args.good - GUESTS_PER_WORKER * (workers - 1)]
    busy_before, total_before = _cpu_busy()
    backend_before = _cpu_jiffies(args.backend_pid)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers + 1) as pool:
        pending = [
            pool.apply_async(
                good_worker, (str(sock), count, seconds, args.pace_ms / 1000, seed + w)
            )
            for w, count in enumerate(counts)
        ]
        bad = (
            pool.apply_async(hostile_worker, (str(sock), seconds + 1.0, args.hostile))
            if hostile
            else None
        )
        outcomes = [GuestOutcome(**o) for p in pending for o in p.get()]
        hostile_result = bad.get() if bad is not None else None
    busy_after, total_after = _cpu_busy()
    backend_cpu = (_cpu_jiffies(args.backend_pid) - backend_before) / os.sysconf("SC_CLK_TCK")
    host_busy = (busy_after - busy_before) / max(1, total_after - total_before)
    holds = [h for o in outcomes for h in o.holds_us]
    per_session_p99 = [_percentile(o.holds_us, 0.99) for o in outcomes if o.holds_us]
    records = [json.loads(line) for line in trace.read_text().splitlines() if line]
    kick_to_notify = [
        (r["t_notified_ns"] - r["t_kick_ns"]) / 1000
        for r in records
        if r.get("kind") == "report" and r["t_notified_ns"] and r["discarded_entries"]
    ]
    return {
        "reports": sum(o.reports for o in outcomes),
        "hold_p50_us": _percentile(holds, 0.50),
        "hold_p99_us": _percentile(holds, 0.99),
        "worst_session_p99_us": max(per_session_p99, default=float("nan")),
        "median_session_p99_us": statistics.median(per_session_p99) if per_session_p99 else 0.0,
        "backend_p50_us": _percentile(kick_to_notify, 0.50),
        "backend_p99_us": _percentile(kick_to_notify, 0.99),
        "timeouts": sum(o.timeouts for o in outcomes),
        "host_busy_percent": 100 * host_busy,
        "backend_cpu_percent": 100 * backend_cpu / seconds,
        "errors": [o.error for o in outcomes if o.error],
        "hostile": hostile_result,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the hostile run")
    parser.add_argument(
        "--quiet-seconds", type=float, help="length of the quiet run (default: --seconds)"
    )
    parser.add_argument("--good", type=int, default=63, help="well-behaved guests")
    parser.add_argument("--pace-ms", type=float, default=200.0, help="between a guest's reports")
    parser.add_argument(
        "--hostile",
        choices=("both", "flood", "churn"),
        default="both",
        help="what the hostile front-end does: flood its ring, churn malformed connections, both",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quiet_seconds is None:
        args.quiet_seconds = args.seconds
    with tempfile.TemporaryDirectory(prefix="vb-load-") as tmp:
        sock, control, trace = Path(tmp) / "b.sock", Path(tmp) / "c.sock", Path(tmp) / "t.jsonl"
        options = (
            "--discard",
            "punch-hole",
            "--control-socket",
            str(control),
            "--trace",
            str(trace),
        )
        with harness.backend(sock, *options) as server:
            while not control.exists():
                time.sleep(0.02)
            args.backend_pid = server.pid
            start = _backend_state(server.pid, control)
            quiet = run_once(sock, trace, args, hostile=False, seed=1, seconds=args.quiet_seconds)
            _wait_for_no_sessions(control)
            between = _backend_state(server.pid, control)
            loud = run_once(sock, trace, args, hostile=True, seed=1, seconds=args.seconds)
            _wait_for_no_sessions(control)
            end = _backend_state(server.pid, control)
            served = control_request(control, {"cmd": "stats"})["sessions_served"]
    result = {
        "quiet": quiet,
        "hostile": loud,
        "backend": {"start": start, "between": between, "end": end, "sessions_served": served},
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    print(
        f"{args.good} good sessions for {args.quiet_seconds:g} s, then with 1 hostile for "
        f"{args.seconds:g} s; "
        f"a report every {args.pace_ms:g} ms per guest, unpopulated, --discard punch-hole"
    )
    print(f"{'':34}{'quiet':>12}{'hostile':>12}{'ratio':>8}")
    for key, label in (
        ("reports", "reports"),
        ("hold_p50_us", "guest hold p50 (us)"),
        ("hold_p99_us", "guest hold p99 (us)  [goal <= 2x]"),
        ("median_session_p99_us", "median session's p99 (us)"),
        ("worst_session_p99_us", "worst session's p99 (us)"),
        ("backend_p50_us", "backend kick-to-notify p50 (us)"),
        ("backend_p99_us", "backend kick-to-notify p99 (us)"),
        ("timeouts", "report timeouts"),
        ("host_busy_percent", "host CPU busy (% of both cores)"),
        ("backend_cpu_percent", "backend CPU (% of one core)"),
    ):
        a, b = quiet[key], loud[key]
        ratio = f"{b / a:.2f}x" if a else ""
        print(f"{label:34}{a:>12.0f}{b:>12.0f}{ratio:>8}")
    print(f"hostile: {loud['hostile']}")
    print("errors:", quiet["errors"] + loud["errors"] or "none")
    for name, state in (("start", start), ("after quiet", between), ("after hostile", end)):
        print(
            f"backend {name:14} rss {state['rss_kib'] / 1024:6.1f} MiB  fds {state['fds']:3}  "
            f"sessions {state['sessions']}"
        )
    growth_mib = (end["rss_kib"] - between["rss_kib"]) / 1024
    fds = end["fds"] - start["fds"]
    print(f"sessions served: {served}; rss {growth_mib:+.1f} MiB over the hostile run, ", end="")
    print(f"fds {fds:+d} over both")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
