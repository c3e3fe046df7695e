"""Time to inflate 512 MiB on a real guest: ours against QEMU's built-in
virtio-balloon, on the same guest, in one run.

Each repetition runs `vhost-balloon launch --balloon 512M --mem 1G` twice,
once on the backend and once with `--baseline` (QEMU's own device, driven
through QMP), alternating so that drift of the machine hits both alike. The
time to target is the same measurement for both: from the `balloon` request
to the driver's `actual` equal to it, polled every 10 ms (the backend through
its device, the baseline with query-balloon). The guest first fills 700 MiB
and frees it, so the balloon takes memory the host really holds. Free page
reporting stays on for both (QEMU's device has it on in run-guest.sh).

Needs root and a provisioned QEMU (`vhost-balloon setup-qemu`); under TCG an
absolute time is not a KVM time: read the ratio. Do not run it beside a test
suite or another guest.

    .venv/bin/python benchmarks/inflation.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.2
ARGS = ["--balloon", "512M", "--mem", "1G", "--size", "700", "--json"]


def _launch(*extra: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "vhost_balloon.backend", "launch", *ARGS, *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"launch failed: {done.stderr.strip().splitlines()[-1:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    balloon: dict[str, Any] = summary["balloon"]
    if balloon.get("error"):
        raise SystemExit(f"launch's balloon steps failed: {balloon['error']}")
    return balloon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ours: list[float] = []
    builtin: list[float] = []
    freed: list[int] = []
    for run in range(args.runs):
        balloon = _launch()
        ours.append(balloon["seconds_to_target"])
        freed.append(balloon["backend"]["inflate_freed_bytes"])
        builtin.append(_launch("--baseline")["seconds_to_target"])
        print(f"run {run + 1}: ours {ours[-1]:.3f} s, built-in {builtin[-1]:.3f} s", flush=True)
    ours_s, builtin_s = statistics.median(ours), statistics.median(builtin)
    print()
    print("512 MiB of inflation, median of", args.runs, "runs each")
    freed_mib = int(statistics.median(freed)) >> 20
    print(f"  ours (backend)        {ours_s:.3f} s   (host freed {freed_mib} MiB)")
    print(f"  QEMU's built-in       {builtin_s:.3f} s")
    ratio = ours_s / builtin_s
    verdict = "met" if ratio <= GOAL else "NOT met"
    print(f"  ours / built-in       {ratio:.2f}x   (goal <= {GOAL}x: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
