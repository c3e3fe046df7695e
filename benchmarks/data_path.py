"""Every figure of the data-path table, its goal beside it, in one run.

The instrument's own latency (kick to notify without a discard, and outside
the discard syscalls), how exactly an injected delay lands (in the backend's
measurement and in the guest's hold window), the real guest against QEMU's
built-in device, the backend's memory, many sessions at once, and the
floors: the bare discard syscalls and one eventfd hop. Each figure is the
median over --runs repetitions of the per-run median (p50) or percentile.

    .venv/bin/python benchmarks/data_path.py [--runs 3] [--reports 300] [--no-real]

The real-guest rows need a provisioned QEMU (root; `vhost-balloon
setup-qemu`); without one they are printed as skipped, with the reason.
Printed, never asserted: docs/performance.md quotes a run.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import wakeup_floor

from vhost_balloon.backend.balloon.records import hold_window_ns
from vhost_balloon.backend.libc import MADV_POPULATE_WRITE, buffer_address, madvise, punch_hole
from vhost_balloon.backend.qemu.provisioning import cache_dir, read_env

MiB = 1 << 20
SESSIONS = 8  # the many-VM row
SESSIONS_REPORTS = 100  # per guest in the many-VM rows
PACE_MS = 20  # between a paced guest's reports: 8 x 50/s, far from saturating 2 CPUs


@dataclass
class Row:
    name: str
    value: str
    goal: str


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


# -- one backend + one mocked guest -----------------------------------------------


@dataclass
class GuestRun:
    trace: list[dict[str, Any]]
    summary: dict[str, Any]
    backend_hwm_kib: int  # the backend's peak RSS


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def guest_run(
    workdir: Path, backend: Sequence[str], guest: Sequence[str], memory: str = "2G"
) -> GuestRun:
    sock = workdir / "b.sock"
    trace = workdir / "trace.jsonl"
    trace.unlink(missing_ok=True)
    with harness.backend(sock, "--trace", str(trace), *backend) as server:
        summary = harness.run_guest(sock, "--memory", memory, *guest)
        hwm = _hwm_kib(server.pid)
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    return GuestRun(records, summary, hwm)


def kick_to_notify_us(record: dict[str, Any]) -> float | None:
    window = hold_window_ns(record["t_kick_ns"], record["t_published_ns"], record["t_notified_ns"])
    return None if window is None else window / 1000


# A report's phases in the backend's trace: (name, from, to); the discard
# loop's own share is its span less the syscalls it timed.
PHASES = {
    "kick -> popped": ("t_kick_ns", "t_popped_ns"),
    "popped -> discard start": ("t_popped_ns", "t_discard_start_ns"),
    "discard loop - syscalls": ("t_discard_start_ns", "t_discard_done_ns"),
    "discard done -> published": ("t_discard_done_ns", "t_published_ns"),
    "published -> notified": ("t_published_ns", "t_notified_ns"),
}


def phases_us(trace: list[dict[str, Any]]) -> dict[str, float]:
    """Each phase's median over a run's reports (us)."""
    medians = {}
    for phase, (begin, end) in PHASES.items():
        less = "discard_syscall_ns" if phase == "discard loop - syscalls" else None
        medians[phase] = _median(
            [(r[end] - r[begin] - (r[less] if less else 0)) / 1000 for r in trace if r[end]]
        )
    return medians


def p50(values: Iterator[float | None]) -> float:
    return _median([v for v in values if v is not None])


# -- the rows ---------------------------------------------------------------------


def instrument_rows(workdir: Path, runs: int, reports: int) -> list[Row]:
    guest = ["--reports", str(reports)]
    none, none_still, outside, injected = [], [], [], []
    phases: dict[tuple[str, bool], list[float]] = {}
    holds: dict[int, list[float]] = {0: [], 1000: [], 5000: []}
    for _ in range(runs):
        run = guest_run(workdir, ["--discard", "none"], guest)
        none.append(p50(kick_to_notify_us(r) for r in run.trace))
        holds[0].append(run.summary["hold_us"]["p50"])
        run = guest_run(workdir, ["--discard", "none"], [*guest, "--no-populate"])
        none_still.append(p50(kick_to_notify_us(r) for r in run.trace))
        run = guest_run(workdir, ["--discard", "punch-hole"], guest)
        outside.append(
            p50(
                (k - r["discard_syscall_ns"] / 1000) if (k := kick_to_notify_us(r)) else None
                for r in run.trace
            )
        )
        for populated in (True, False):
            if not populated:
                run = guest_run(workdir, ["--discard", "punch-hole"], [*guest, "--no-populate"])
            for phase, us in phases_us(run.trace).items():
                phases.setdefault((phase, populated), []).append(us)
        for delay_us in (1000, 5000):
            run = guest_run(
                workdir,
                ["--discard", "none", "--delay", f"publish=const:{delay_us}us"],
                guest,
            )
            holds[delay_us].append(run.summary["hold_us"]["p50"])
            if delay_us == 5000:
                injected.append(p50(r["injected_ns"]["publish"] / 1000 for r in run.trace))
    rows = [
        Row("--discard none, kick to notify p50", f"{_median(none):.0f} us", "<= 80 us"),
        Row(
            "  the same, guest not writing its pages",
            f"{_median(none_still):.0f} us",
            "(information)",
        ),
        Row(
            "punch-hole, kick to notify - syscalls, p50",
            f"{_median(outside):.0f} us",
            "<= 100 us",
        ),
        Row(
            "publish=const:5ms, backend's injected_ns p50",
            f"{_median(injected):.0f} us",
            "5000 +- 50 us",
        ),
    ]
    for phase in PHASES:
        rows.append(
            Row(
                f"  punch-hole {phase} p50, pages written / not",
                f"{_median(phases[phase, True]):.0f} / {_median(phases[phase, False]):.0f} us",
                "(where the time goes)",
            )
        )
    for delay_us in (1000, 5000):
        errors = [d - b - delay_us for d, b in zip(holds[delay_us], holds[0], strict=True)]
        bound = max(0.02 * delay_us, 100)
        rows.append(
            Row(
                f"guest hold at publish=const:{delay_us // 1000}ms - without - D",
                f"{_median(errors):+.0f} us",
                f"|x| <= {bound:.0f} us",
            )
        )
    return rows


def memory_rows(workdir: Path, runs: int) -> list[Row]:
    rows = []
    for memory in ("1G", "16G"):
        peaks = [
            guest_run(
                workdir, ["--discard", "punch-hole"], ["--reports", "50"], memory
            ).backend_hwm_kib
            for _ in range(runs)
        ]
        rows.append(
            Row(
                f"backend peak RSS, {memory} guest", f"{_median(peaks) / 1024:.0f} MiB", "<= 60 MiB"
            )
        )
    return rows


def _cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def many_sessions_rows(workdir: Path, reports: int, runs: int) -> list[Row]:
    """One lone guest, then SESSIONS at once, none writing its pages: first
    as fast as each can go (which saturates a small host: eight Python guests
    and the backend share its CPUs), then paced (PACE_MS between reports), so
    that the host is not saturated and the rows measure the backend, not the
    CPUs it shares. The host's CPU use during each run is printed with it.

    Paced, the sessions run twice: against one backend (one interpreter, one
    GIL, as `serve` runs today) and against one backend process each, which
    is what a process per session would at best give. The backend's own
    share of the tail is its trace's kick to notify, per session."""
    rows = []
    for pause_ms, label, separate in (
        (0, "unpaced", False),
        (PACE_MS, f"paced {PACE_MS} ms", False),
        (PACE_MS, f"paced {PACE_MS} ms, a backend process each", True),
    ):
        measured = [_sessions_at_once(workdir, reports, pause_ms, separate) for _ in range(runs)]
        rows += _sessions_rows(label, measured)
    return rows


@dataclass
class SessionsRun:
    lone_rate: float  # reports/s
    lone_hold_p99_us: float  # the guest's
    lone_backend_p99_us: float  # kick to notify, the backend's trace
    rate: float  # all sessions' reports/s together
    worst_hold_p99_us: float
    worst_backend_p99_us: float
    host_busy: float  # 0..1


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _backend_p99s(traces: Sequence[Path]) -> list[float]:
    """Each session's kick-to-notify p99 (us), whichever trace it is in."""
    sessions: dict[tuple[int, str], list[float]] = {}
    for index, path in enumerate(traces):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if (us := kick_to_notify_us(record)) is not None:
                sessions.setdefault((index, record["session"]), []).append(us)
    return [_percentile(values, 0.99) for values in sessions.values()]


def _sessions_at_once(workdir: Path, reports: int, pause_ms: int, separate: bool) -> SessionsRun:
    options = ["--memory", "256M", "--no-populate", "--reports", str(reports)]
    options += ["--pause-ms", str(pause_ms)] if pause_ms else []
    count = SESSIONS if separate else 1
    socks = [workdir / f"many{i}.sock" for i in range(count)]
    traces = [workdir / f"many{i}.jsonl" for i in range(count)]
    lone_trace = workdir / "lone.jsonl"
    for path in [*traces, lone_trace]:
        path.unlink(missing_ok=True)
    with harness.backend(socks[0], "--discard", "punch-hole", "--trace", str(lone_trace)):
        lone = harness.run_guest(socks[0], *options)
    lone_backend = _backend_p99s([lone_trace])
    with ExitStack() as stack:
        for sock, trace in zip(socks, traces, strict=True):
            stack.enter_context(
                harness.backend(sock, "--discard", "punch-hole", "--trace", str(trace))
            )
        busy_before, total_before = _cpu_busy()
        procs = [
            subprocess.Popen(
                [*harness.guest_command(socks[i % count]), *options],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(SESSIONS)
        ]
        outputs = [proc.communicate()[0] for proc in procs]
        busy_after, total_after = _cpu_busy()
    summaries = [json.loads(text) for text in outputs]
    return SessionsRun(
        lone_rate=lone["reports"] / lone["duration_s"],
        lone_hold_p99_us=lone["hold_us"]["p99"],
        lone_backend_p99_us=max(lone_backend),
        rate=sum(s["reports"] / s["duration_s"] for s in summaries),
        worst_hold_p99_us=max(s["hold_us"]["p99"] for s in summaries),
        worst_backend_p99_us=max(_backend_p99s(traces)),
        host_busy=(busy_after - busy_before) / max(1, total_after - total_before),
    )


def _sessions_rows(label: str, runs: Sequence[SessionsRun]) -> list[Row]:
    def med(field: Callable[[SessionsRun], float]) -> float:
        return _median([field(run) for run in runs])

    lone_rate = med(lambda r: r.lone_rate)
    busy = med(lambda r: r.host_busy)
    return [
        Row(
            f"lone session, {label}: reports/s, hold p99",
            f"{lone_rate:.0f}/s, {med(lambda r: r.lone_hold_p99_us):.0f} us",
            "",
        ),
        Row(
            f"{SESSIONS} sessions, {label}: aggregate rate / lone",
            f"{med(lambda r: r.rate / r.lone_rate):.2f}x ({med(lambda r: r.rate):.0f}/s)",
            f">= 4x (host {busy:.0%} busy)",
        ),
        Row(
            f"{SESSIONS} sessions, {label}: worst session p99 / lone",
            f"{med(lambda r: r.worst_hold_p99_us / r.lone_hold_p99_us):.2f}x",
            "<= 1.5x",
        ),
        Row(
            "  the backend's share: worst kick-to-notify p99 / lone",
            f"{med(lambda r: r.worst_backend_p99_us / r.lone_backend_p99_us):.2f}x"
            f" ({med(lambda r: r.worst_backend_p99_us):.0f} /"
            f" {med(lambda r: r.lone_backend_p99_us):.0f} us)",
            "(information)",
        ),
    ]


def _launch(args: Sequence[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "vhost_balloon.backend", "launch", "--json", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def real_guest_rows(runs: int) -> list[Row]:
    why = _real_guest_unavailable()
    if why:
        return [Row("real guest rows", "skipped", why)]
    rows = []
    for workload, extra, goal in (
        ("gigantic", ["--duration", "30"], "<= 2.0x"),
        ("fill", ["--rounds", "2", "--size", "200"], "<= 1.0x"),
    ):
        ours, outside, builtin = [], [], []
        for _ in range(runs):  # alternated, so drift hits both alike
            summary = _launch(["--workload", workload, *extra])
            ours.append(summary["guest_hold_us"]["p50"])
            # What the guest waits for beyond our kick-to-notify: the kick's
            # and the call's trips through QEMU, and the guest's wake-up.
            outside.append(summary["guest_hold_us"]["p50"] - summary["hold_us"]["p50"])
            builtin.append(
                _launch(["--workload", workload, *extra, "--baseline"])["guest_hold_us"]["p50"]
            )
        rows.append(
            Row(
                f"real guest, {workload}: guest hold p50 ours / built-in",
                f"{_median(ours) / _median(builtin):.2f}x "
                f"({_median(ours):.0f} / {_median(builtin):.0f} us)",
                goal,
            )
        )
        rows.append(
            Row(
                "  of ours, outside the backend (guest hold - kick to notify)",
                f"{_median(outside):.0f} us",
                "(the vhost-user round trip)",
            )
        )
    return rows


def _real_guest_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root (QEMU runs in a chroot)"
    try:
        env = read_env(cache_dir() / "env.sh")
    except (OSError, ValueError) as error:
        return f"QEMU is not provisioned ({error}): run vhost-balloon setup-qemu"
    if not env.get("QEMU"):
        return "QEMU is not provisioned: run vhost-balloon setup-qemu"
    return ""


def bare_syscall_rows(runs: int) -> list[Row]:
    """32 or 16 punch-holes of 2 or 4 MiB, on populated and unpopulated pages."""
    rows = []
    for entries in (32, 16):
        for entry in (2 * MiB, 4 * MiB):
            for populated in (True, False):
                times = [_bare_punch_us(entries, entry, populated) for _ in range(runs)]
                state = "populated" if populated else "unpopulated"
                rows.append(
                    Row(
                        f"bare punch-hole, {entries} x {entry // MiB} MiB, {state}",
                        f"{_median(times):.0f} us",
                        "(floor)",
                    )
                )
    return rows


def _bare_punch_us(entries: int, entry: int, populated: bool, reports: int = 20) -> float:
    size = entries * entry
    fd = os.memfd_create("bare", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    samples = []
    try:
        with mmap.mmap(fd, size) as mapping:
            address = buffer_address(mapping)
            for _ in range(reports):
                if populated:
                    madvise(address, size, MADV_POPULATE_WRITE)
                begin = time.perf_counter_ns()
                for index in range(entries):
                    punch_hole(fd, index * entry, entry)
                samples.append((time.perf_counter_ns() - begin) / 1000)
    finally:
        os.close(fd)
    return _median(samples)


def floor_rows(runs: int) -> list[Row]:
    rows = []
    for name, echo in (
        ("eventfd hop, process -> process", wakeup_floor._echo_blocking),
        ("eventfd hop, to an asyncio receiver", wakeup_floor._echo_asyncio),
    ):
        halves = [
            _median([t / 2000 for t in wakeup_floor._in_child(echo, 2000)]) for _ in range(runs)
        ]
        rows.append(Row(name, f"{_median(halves):.1f} us", "(floor)"))
    return rows


@contextmanager
def _section(title: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"... {title}", file=sys.stderr, flush=True)
    yield
    print(f"    {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reports", type=int, default=300)
    parser.add_argument("--no-real", action="store_true", help="skip the real-guest rows")
    parser.add_argument(
        "--only",
        metavar="SECTION",
        help="one section: instrument, memory, sessions, syscalls, floor or real",
    )
    args = parser.parse_args()
    sections: list[tuple[str, Callable[[], list[Row]]]] = []
    with tempfile.TemporaryDirectory(prefix="vb-datapath-") as tmp:
        workdir = Path(tmp)
        sections = [
            ("the instrument", lambda: instrument_rows(workdir, args.runs, args.reports)),
            ("memory", lambda: memory_rows(workdir, args.runs)),
            ("many sessions", lambda: many_sessions_rows(workdir, SESSIONS_REPORTS, args.runs)),
            ("bare syscalls", lambda: bare_syscall_rows(args.runs)),
            ("floor", lambda: floor_rows(args.runs)),
        ]
        if not args.no_real:
            sections.append(("real guest", lambda: real_guest_rows(max(1, args.runs - 1))))
        if args.only:
            chosen = [(t, m) for t, m in sections if args.only in t]
            if not chosen:
                parser.error(f"--only {args.only!r}: no such section")
            sections = chosen
        rows: list[Row] = []
        for title, measure in sections:
            with _section(title):
                rows += measure()
    print(
        f"medians of {args.runs} runs; {args.reports} reports per mocked-guest run"
        f" ({SESSIONS_REPORTS} per guest in the many-sessions rows)"
    )
    width = max(len(row.name) for row in rows)
    print(f"{'figure':{width}}  {'measured':>24}  goal")
    for row in rows:
        print(f"{row.name:{width}}  {row.value:>24}  {row.goal}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
