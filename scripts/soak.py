#!/usr/bin/env python3
"""The integrity soak: mocked guests that check every page they own while
the backend serves them under random delays, disconnects and restarts.

    .venv/bin/python scripts/soak.py --minutes 10            # the issue's soak
    .venv/bin/python scripts/soak.py --seconds 20 --json F   # a short one (the tests')

Runs `vhost-balloon serve` as a process of its own with a control socket
and a trace, and GUESTS mocked guests (guest/soak.py) in this one. Each
guest keeps about half its blocks allocated, each page stamped with its gpa
and a generation, frees blocks, reports only free ones and checks its pages
all the time. Meanwhile, at random intervals (exponential, with the means
given):
- the delays change through the control socket: one to three injection
  points, each a random const, uniform or exp model of up to 20 ms (entry
  delays up to 2 ms, per entry);
- one guest hangs up with a report in flight (--disconnect-every);
- the backend is killed with SIGKILL and started again on the same socket
  (--restart-every), its delays given again on its command line.

Prints a numbered summary and exits 1 unless every goal holds:
0 bytes of unreported memory altered; 0 reports whose used entry the guest
saw before every reported byte read zero (published before the discard
returned, as the guest sees it); 0 trace records published before their
discard returned (as the backend recorded it); no protocol error from the
device, a clean backend exit, some reports, and at least one of each kind
of event the run was long enough for (three expected).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vhost_balloon.backend.observe.control import ControlError, control_request  # noqa: E402
from vhost_balloon.guest.soak import (  # noqa: E402
    SoakCounts,
    SoakGuest,
    SoakGuestOptions,
    soak_options,
)

POINTS = ("kick", "report", "entry", "publish", "notify")
START_TIMEOUT_S = 20.0


def random_delays(rng: random.Random) -> dict[str, str]:
    """One to three points, each a random model; entry delays are per entry, so shorter."""
    delays: dict[str, str] = {}
    for point in rng.sample(POINTS, rng.randint(1, 3)):
        top_us = 2000 if point == "entry" else 20000
        low, high = sorted(rng.randint(0, top_us) for _ in range(2))
        kind = rng.choice(("const", "uniform", "exp"))
        if kind == "const":
            delays[point] = f"const:{high}us"
        elif kind == "uniform":
            delays[point] = f"uniform:{low}us..{high}us"
        else:
            delays[point] = f"exp:{max(high // 2, 1)}us"
    return delays


class Backend:
    """`vhost-balloon serve` in a process of its own, which the soak kills and restarts."""

    def __init__(self, work: Path, discard: str, seed: int) -> None:
        self.socket = work / "backend.sock"
        self.control = work / "control.sock"
        self.work = work
        self.log = work / "backend.log"
        self.discard = discard
        self.seed = seed
        self.delays: dict[str, str] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "vhost_balloon.backend",
            "serve",
            "--socket-path",
            str(self.socket),
            "--control-socket",
            str(self.control),
            "--trace",
            str(self.trace(self.starts)),
            "--discard",
            self.discard,
            "--seed",
            str(self.seed + self.starts),
        ]
        for point, model in self.delays.items():
            command += ["--delay", f"{point}={model}"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stderr=log, cwd=ROOT)
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listening():
            if self.process.poll() is not None:
                raise RuntimeError(f"the backend exited with {self.process.returncode}: {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backend did not start in {START_TIMEOUT_S:g} s")
            time.sleep(0.02)

    def trace(self, start: int) -> Path:
        """Each process its own trace: session names start again at s1."""
        return self.work / f"trace-{start}.jsonl"

    def traces(self) -> list[Path]:
        return [self.trace(start) for start in range(self.starts)]

    def _listening(self) -> bool:
        try:
            return bool(control_request(self.control, {"cmd": "get"}, 1.0).get("ok"))
        except ControlError:  # not up yet: no socket, a stale one, no reply
            return False

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a crash: nothing of the backend's shutdown runs."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.terminate()
        return self.process.wait(timeout=30)

    def set_delays(self, delays: dict[str, str]) -> bool:
        try:
            reply = control_request(self.control, {"cmd": "set", "delay": delays, "replace": True})
        except ControlError:
            return False
        if reply.get("ok"):
            self.delays = delays
        return bool(reply.get("ok"))


class Chaos:
    """The random events, each at exponential intervals with its own mean."""

    def __init__(self, args: argparse.Namespace, backend: Backend, guests: list[SoakGuest]) -> None:
        self.rng = random.Random(args.seed)
        self.backend = backend
        self.guests = guests
        self.means = {
            "delay": args.delay_every,
            "disconnect": args.disconnect_every,
            "restart": args.restart_every,
        }
        self.done = {"delay": 0, "disconnect": 0, "restart": 0}

    async def run(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        due = {
            name: now + self.rng.expovariate(1 / mean)
            for name, mean in self.means.items()
            if mean > 0
        }
        while due:
            name = min(due, key=due.__getitem__)
            if due[name] >= deadline:
                return
            await asyncio.sleep(max(due[name] - time.monotonic(), 0.0))
            if name == "delay":
                delays = random_delays(self.rng)
                if await loop.run_in_executor(None, self.backend.set_delays, delays):
                    self.done[name] += 1
            elif name == "disconnect":
                self.rng.choice(self.guests).want_disconnect()
                self.done[name] += 1
            else:
                await loop.run_in_executor(None, self.restart)
                self.done[name] += 1
            due[name] = time.monotonic() + self.rng.expovariate(1 / self.means[name])

    def restart(self) -> None:
        self.backend.kill()
        time.sleep(self.rng.uniform(0.0, 0.5))  # the guests see the hang-up meanwhile
        self.backend.start()


def check_trace(paths: list[Path]) -> dict[str, int]:
    """Report records: how many, how many were published before their discard
    returned, and how many a process recorded twice."""
    records = early = twice = torn = 0
    seen: set[tuple[int, str, int]] = set()
    lines = [
        (index, line)
        for index, path in enumerate(paths)
        if path.exists()
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
    ]
    for index, line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            torn += 1  # the last line of a backend killed while writing it
            continue
        if record.get("kind") != "report":
            continue
        records += 1
        key = (index, record["session"], record["seq"])
        twice += key in seen
        seen.add(key)
        if record["discarded_entries"] and (
            not record["t_discard_done_ns"]
            or record["t_published_ns"] < record["t_discard_done_ns"]
        ):
            early += 1
    return {
        "records": records,
        "published_before_discard": early,
        "duplicates": twice,
        "torn_lines": torn,
    }


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    backend = Backend(work, args.discard, args.seed)
    base = SoakGuestOptions(
        socket_path=str(backend.socket),
        memory_bytes=args.memory_mib << 20,
        seed=args.seed,
    )
    guests: list[SoakGuest] = []
    status = 0
    try:
        backend.start()
        guests += [SoakGuest(soak_options(base, index)) for index in range(args.guests)]
        chaos = Chaos(args, backend, guests)
        started = time.monotonic()
        deadline = started + args.seconds
        # A task that fails cancels the others before the guests' RAM is closed.
        async with asyncio.TaskGroup() as group:
            group.create_task(chaos.run(deadline))
            for guest in guests:
                group.create_task(guest.run_until(deadline))
    finally:
        for guest in guests:
            await guest.close()
        status = backend.stop()
    total = SoakCounts()
    for guest in guests:
        total.add(guest.counts)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "guests": args.guests,
        "memory_mib": args.memory_mib,
        "discard": args.discard,
        "seed": args.seed,
        "delay_changes": chaos.done["delay"],
        "disconnects_asked": chaos.done["disconnect"],
        "backend_restarts": chaos.done["restart"],
        "backend_exit_status": status,
        "delay_every": args.delay_every,
        "disconnect_every": args.disconnect_every,
        "restart_every": args.restart_every,
        "guest": asdict(total),
        "trace": check_trace(backend.traces()),
    }


def failures(result: dict[str, Any]) -> list[str]:
    guest, trace = result["guest"], result["trace"]
    found = []
    if guest["altered_bytes"]:
        found.append(f"{guest['altered_bytes']} bytes of unreported memory altered")
    if guest["undiscarded_bytes"]:
        found.append(f"{guest['early_reports']} reports seen used before their pages read zero")
    if trace["published_before_discard"]:
        found.append(
            f"{trace['published_before_discard']} trace records published before their discard"
        )
    if trace["duplicates"]:
        found.append(f"{trace['duplicates']} reports recorded twice")
    if guest["driver_errors"]:
        found.append(f"{guest['driver_errors']} times the device broke the protocol")
    if result["backend_exit_status"]:
        found.append(f"the backend exited with status {result['backend_exit_status']}")
    if not guest["reports_published"]:
        found.append("no report was published")
    # Every kind of event the run was long enough for (three expected) happened.
    expected = {
        "delay_changes": (result["delay_changes"], result["delay_every"]),
        "disconnects": (guest["disconnects_injected"], result["disconnect_every"]),
        "backend restarts": (result["backend_restarts"], result["restart_every"]),
    }
    for name, (count, mean_s) in expected.items():
        if mean_s > 0 and result["seconds"] >= 3 * mean_s and not count:
            found.append(f"no {name} in a run of {result['seconds']:g} s")
    return found


def print_summary(result: dict[str, Any]) -> None:
    guest, trace = result["guest"], result["trace"]
    lines = [
        f"soak of {result['seconds']:g} s: {result['guests']} guests of "
        f"{result['memory_mib']} MiB, "
        f"--discard {result['discard']}, seed {result['seed']}",
        f"connections made: {guest['connections']}",
        f"reports published and checked: {guest['reports_published']} "
        f"({guest['reported_bytes'] >> 20} MiB reported)",
        f"reports abandoned in flight: {guest['reports_abandoned']}",
        f"delay changes: {result['delay_changes']}",
        f"disconnects with a report in flight: {guest['disconnects_injected']} "
        f"(asked {result['disconnects_asked']})",
        f"backend restarts (SIGKILL): {result['backend_restarts']}; connections lost: "
        f"{guest['connections_lost']}",
        f"blocks allocated / freed: {guest['blocks_allocated']} / {guest['blocks_freed']}",
        f"pages checked: {guest['pages_checked']} ({guest['bytes_checked'] >> 30} GiB)",
        f"bytes of unreported memory altered: {guest['altered_bytes']} "
        f"({guest['altered_pages']} pages)  [goal 0]",
        f"reports seen used before every byte read zero: {guest['early_reports']} "
        f"({guest['undiscarded_bytes']} bytes)  [goal 0]",
        f"protocol errors from the device: {guest['driver_errors']}  [goal 0]",
        f"trace records: {trace['records']}; published before their discard returned: "
        f"{trace['published_before_discard']}  [goal 0]; recorded twice: {trace['duplicates']}; "
        f"torn lines: {trace['torn_lines']}",
    ]
    for number, line in enumerate(lines, 1):
        print(f"{number:2}. {line}")
    for error in guest["errors"]:
        print(f"    a connection ended: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--guests", type=int, default=2)
    parser.add_argument("--memory-mib", type=int, default=256, help="each guest's RAM")
    parser.add_argument("--discard", choices=("punch-hole", "madv-remove"), default="punch-hole")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--delay-every", type=float, default=2.0, metavar="S")
    parser.add_argument("--disconnect-every", type=float, default=8.0, metavar="S")
    parser.add_argument("--restart-every", type=float, default=30.0, metavar="S")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--keep", type=Path, help="keep the backend's trace and log in this folder")
    args = parser.parse_args()
    args.seconds = args.seconds if args.seconds is not None else (args.minutes or 10.0) * 60
    if args.seconds <= 0 or args.guests < 1 or args.memory_mib < 64:
        parser.error("--seconds/--minutes must be positive, --guests >= 1, --memory-mib >= 64")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(soak(args, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="vb-soak-") as tmp:
            result = asyncio.run(soak(args, Path(tmp)))
    print_summary(result)
    found = failures(result)
    result["failures"] = found
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for failure in found:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
