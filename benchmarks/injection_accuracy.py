"""How exactly an injected delay shows up in the hold window the guest sees.

For each injection point and each constant delay D (100 us .. 100 ms), run
`vhost-balloon serve --delay POINT=const:D` and the mocked guest in separate
processes (`--discard none`, so the discard syscalls add no noise of their
own), and compare each report's guest-measured hold window against the
zero-delay baseline measured in the same run:

    error = (hold - median(baseline hold)) - injected

(`entry` injects D before each of the report's 32 entries, so injected is
32 * D there). Printed per point and delay: the error's p50 and p99 over
all reports of all runs, in microseconds.

    .venv/bin/python benchmarks/injection_accuracy.py [--runs 3] [--reports 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import harness

from vhost_balloon.protocol.samples import percentiles

POINTS = ("kick", "report", "entry", "publish", "notify")
DELAYS_US = (100, 1_000, 10_000, 100_000)
ENTRIES = 32


def holds_us(delay: str | None, reports: int, workdir: Path) -> list[float]:
    """Guest-measured hold windows (us) of one backend+guest run."""
    sock = workdir / "b.sock"
    log = workdir / "guest.jsonl"
    options = ["--discard", "none"] + (["--delay", delay] if delay is not None else [])
    with harness.backend(sock, *options):
        harness.run_guest(
            sock,
            "--memory",
            "256M",
            "--reports",
            str(reports),
            "--report-log",
            str(log),
            "--report-timeout",
            "60",
        )
    return [json.loads(line)["hold_ns"] / 1000 for line in log.read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reports", type=int, default=40)
    parser.add_argument("--points", default=",".join(POINTS))
    args = parser.parse_args()
    points = args.points.split(",")
    errors: dict[tuple[str, int], list[float]] = {}
    baselines: list[float] = []
    with tempfile.TemporaryDirectory(prefix="vb-accuracy-") as tmp:
        workdir = Path(tmp)
        for run in range(args.runs):
            baseline = statistics.median(holds_us(None, args.reports, workdir))
            baselines.append(baseline)
            for point in points:
                for delay_us in DELAYS_US:
                    # entry delays repeat per entry: keep the report under ~1 s
                    per = delay_us if point != "entry" or delay_us <= 10_000 else None
                    if per is None:
                        continue
                    injected = per * (ENTRIES if point == "entry" else 1)
                    reports = args.reports if injected < 50_000 else max(10, args.reports // 4)
                    holds = holds_us(f"{point}=const:{per}us", reports, workdir)
                    errors.setdefault((point, delay_us), []).extend(
                        hold - baseline - injected for hold in holds
                    )
                print(
                    f"run {run + 1}/{args.runs}: {point} done, baseline {baseline:.0f} us",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"zero-delay baseline hold (median per run): {', '.join(f'{b:.0f}' for b in baselines)} us"
    )
    print(
        f"{'point':<8} {'delay':>9} {'injected':>10} {'n':>5} {'err p50 us':>11} {'err p99 us':>11}"
    )
    for (point, delay_us), values in errors.items():
        injected = delay_us * (ENTRIES if point == "entry" else 1)
        errors_us = percentiles(values)
        print(
            f"{point:<8} {delay_us:>7}us {injected:>8}us {len(values):>5} "
            f"{errors_us['p50']:>11.0f} {errors_us['p99']:>11.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
