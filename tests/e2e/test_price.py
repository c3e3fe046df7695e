"""The price of reporting on a real Linux 6.12 guest, a short `launch
--workload fill` as a user runs it (docs/results.md, section 7): each
round's allocate-and-touch is timed on the guest's ftrace clock; with our
backend the memory each round frees is reported and given back to the
host before the next round touches it again, and with no balloon device
nothing is given back. The times themselves are not asserted (speed
lives in the benchmarks and the experiment)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import LaunchRun, MiB, run_launch

ROUNDS = 3
SIZE_MIB = 128
FILL = ("--workload", "fill", "--rounds", str(ROUNDS), "--size", str(SIZE_MIB), "--pause", "3")


def _timed_rounds(run: LaunchRun) -> dict[str, object]:
    assert run.returncode == 0, run.stderr[-3000:]
    fill = run.summary["fill"]
    print(json.dumps(fill, indent=1))
    assert fill["size_mib"] == SIZE_MIB
    assert [r["round"] for r in fill["round_ms"]] == list(range(1, ROUNDS + 1))
    assert all(r["ms"] > 0 for r in fill["round_ms"])
    assert fill["first_ms"] == fill["round_ms"][0]["ms"]
    later = sorted(r["ms"] for r in fill["round_ms"][1:])
    assert fill["later_ms"]["max"] == later[-1]  # round 1 is not among the later rounds
    assert fill["later_mib_per_s"] > 0
    return dict(fill)


def test_each_round_is_timed_and_what_it_freed_is_given_back_first(
    provisioned: dict[str, str], session_tmp: Path
) -> None:
    run = run_launch(session_tmp / "price-ours", *FILL, "--mem", "512M")
    _timed_rounds(run)
    given = run.summary["memfd_freed"]
    assert len(given) == ROUNDS
    # Reporting handed most of each freed round back before the next one
    # (measured: about 108 of 128 MiB; only free 2 MiB blocks are reported).
    assert all(r.get("given_back_bytes", 0) >= SIZE_MIB * MiB // 2 for r in given), given
    assert run.trace and all(not r["errors"] for r in run.trace)


def test_without_a_balloon_device_nothing_is_given_back(
    provisioned: dict[str, str], session_tmp: Path
) -> None:
    run = run_launch(session_tmp / "price-none", *FILL, "--mem", "512M", "--no-balloon")
    _timed_rounds(run)
    assert run.summary["mode"] == "none" and run.summary["guest_reports"] == 0
    given = run.summary["memfd_freed"]
    assert all(r.get("given_back_bytes", 0) < SIZE_MIB * MiB // 8 for r in given), given
