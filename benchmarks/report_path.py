"""What the backend adds to a report, against the bare discard syscalls.

For each run, in the same process tree and the same minute:
  baseline  -- a forked child ("the guest") maps a memfd and populates
               32 x 2 MiB, then this process times the 32 bare
               fallocate(PUNCH_HOLE) calls (what any backend must pay);
               also the same with the pages populated by this process
               (no other page tables to zap);
  backend   -- `vhost-balloon serve` in its own process with a trace, and the
               mocked guest (`python -m vhost_balloon.guest`) in another, sending the same
               reports; per report the trace gives kick->notify and the time
               spent inside the discard syscalls.
  overhead  -- the same with `--discard none`: the pure per-report Python
               path (kick, pop, publish, notify) with no syscall at all;
  guarded   -- `--discard none` again over unsealed RAM (as hugetlbfs or
               tmpfs RAM is): every ring access is a copy that cannot fault
               (process_vm_readv/writev), what fault isolation costs.

Printed: medians over reports, then the median over runs, and the ratio of
backend kick->notify to the bare cross-process syscalls (`bare_us`).
Machines here are noisy: read the median of runs, not one run.

    .venv/bin/python benchmarks/report_path.py [--runs 5] [--reports 100]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path

import harness

from vhost_balloon.backend.balloon.records import hold_window_ns
from vhost_balloon.backend.libc import punch_hole

ENTRY = 2 << 20
ENTRIES = 32


def _punch_all(fd: int) -> float:
    begin = time.perf_counter_ns()
    for entry in range(ENTRIES):
        punch_hole(fd, entry * ENTRY, ENTRY)
    return (time.perf_counter_ns() - begin) / 1000


def bare_punch_hole_us(reports: int, *, populated_by_other_process: bool) -> float:
    """Median time of 32 bare punch-holes over freshly populated 2 MiB blocks.

    With `populated_by_other_process`, a forked child maps the memfd and
    writes the pages (as the guest, i.e. QEMU, does): punching then has to
    zap another process's page tables, which is the backend's situation.
    """
    size = ENTRY * ENTRIES
    fd = os.memfd_create("baseline", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fill = b"\xa5" * size
    samples = []
    try:
        if not populated_by_other_process:
            with mmap.mmap(fd, size) as mapping:
                for _ in range(reports):
                    mapping[:] = fill
                    samples.append(_punch_all(fd))
            return statistics.median(samples)
        from_parent, to_child = os.pipe()
        from_child, to_parent = os.pipe()
        pid = os.fork()
        if pid == 0:  # the "guest": populate on request, keep the mapping
            with mmap.mmap(fd, size) as mapping:
                while os.read(from_parent, 1) == b"p":
                    mapping[:] = fill
                    os.write(to_parent, b"k")
            os._exit(0)
        for _ in range(reports):
            os.write(to_child, b"p")
            os.read(from_child, 1)
            samples.append(_punch_all(fd))
        os.write(to_child, b"q")
        os.waitpid(pid, 0)
        for end in (to_child, from_parent, from_child, to_parent):
            os.close(end)
    finally:
        os.close(fd)
    return statistics.median(samples)


def backend_run(
    discard: str, reports: int, workdir: Path, *, sealed: bool = True
) -> dict[str, float]:
    name = discard if sealed else f"{discard}-unsealed"
    sock = workdir / f"{name}.sock"
    trace = workdir / f"{name}.jsonl"
    trace.unlink(missing_ok=True)
    serve = ["--discard", discard, "--trace", str(trace)]
    guest = ["--memory", "512M", "--reports", str(reports)]
    if not sealed:
        serve.append("--allow-unsealed-memory")
        guest.append("--no-seal")
    with harness.backend(sock, *serve):
        summary = harness.run_guest(sock, *guest)
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    measured = [
        (hold_ns / 1000, r["discard_syscall_ns"] / 1000)
        for r in records
        if (hold_ns := hold_window_ns(r["t_kick_ns"], r["t_published_ns"], r["t_notified_ns"]))
        is not None
    ]
    kick_to_notify = [hold_us for hold_us, _ in measured]
    syscall = [syscall_us for _, syscall_us in measured]
    return {
        "kick_to_notify_us": statistics.median(kick_to_notify),
        "syscall_us": statistics.median(syscall),
        "outside_syscall_us": statistics.median(
            k - s for k, s in zip(kick_to_notify, syscall, strict=True)
        ),
        "guest_hold_us": float(summary["hold_us"]["p50"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reports", type=int, default=100)
    args = parser.parse_args()
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="vb-bench-") as tmp:
        for run in range(args.runs):
            bare_same = bare_punch_hole_us(args.reports, populated_by_other_process=False)
            bare = bare_punch_hole_us(args.reports, populated_by_other_process=True)
            punched = backend_run("punch-hole", args.reports, Path(tmp))
            nothing = backend_run("none", args.reports, Path(tmp))
            guarded = backend_run("none", args.reports, Path(tmp), sealed=False)
            row = {
                "bare_same_process_us": bare_same,
                "bare_us": bare,
                "backend_us": punched["kick_to_notify_us"],
                "backend_syscall_us": punched["syscall_us"],
                "backend_outside_syscall_us": punched["outside_syscall_us"],
                "guest_hold_us": punched["guest_hold_us"],
                "none_path_us": nothing["kick_to_notify_us"],
                "none_guest_hold_us": nothing["guest_hold_us"],
                "guarded_none_path_us": guarded["kick_to_notify_us"],
                "ratio": punched["kick_to_notify_us"] / bare,
            }
            rows.append(row)
            print(
                f"run {run + 1}: "
                + "  ".join(
                    f"{k}={v:.1f}" if k != "ratio" else f"{k}={v:.3f}" for k, v in row.items()
                ),
                flush=True,
            )
    print(f"\nmedian of {args.runs} runs ({args.reports} reports of {ENTRIES} x 2 MiB each):")
    for key in rows[0]:
        value = statistics.median(row[key] for row in rows)
        print(f"  {key:<28} {value:10.3f}" if key == "ratio" else f"  {key:<28} {value:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
