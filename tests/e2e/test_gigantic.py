"""The gigantic-page experiment on a real guest: a 1 GiB hugetlb page allocated
and freed in a loop while the backend holds reported pages for 100 ms, each
failed isolation test attributed to the report that held its first busy page.

One run, `launch --workload gigantic` as a user runs it (guest RAM 2560M,
`nokaslr init_on_alloc=0` by default). See docs/qemu.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import LaunchRun, run_launch

# 20 s of attempts after the default 20 s settle: ~50 s of wall time under TCG.
DURATION_S = 20
# A held report makes every attempt during it fail (an attempt takes ~20-40 ms
# under TCG): 100 ms per report gave 23 failures in 4 of 4 passes in 30 s,
# against none in 814 attempts without a delay (reports then last 1-25 ms).
DELAY = "report=const:100ms"
GiB_PFNS = (1 << 30) // 4096


def test_gigantic_page_failures_are_attributed_to_reports(
    provisioned: dict[str, str], session_tmp: Path
) -> None:
    run: LaunchRun = run_launch(
        session_tmp / "gigantic",
        "--workload",
        "gigantic",
        "--duration",
        str(DURATION_S),
        "--delay",
        DELAY,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    g = summary["gigantic"]
    print(json.dumps({k: v for k, v in g.items() if k != "failures_detail"}, indent=1))
    for item in g["failures_detail"][:20]:
        print(item)
    assert summary["workload"] == "gigantic" and summary["mode"] == "vhost-user"
    assert summary["integrity_ok"] is True and summary["guest_done"] is True
    assert g["trace"] == "on"

    # Attempts happened, each one reached the isolation test or was counted
    # as not tried, and the tracepoint fired on the one 1 GiB-aligned range
    # that is all RAM (GPA 1-2 GiB).
    assert g["attempts"] > 0
    assert g["isolation_tests"] > 0
    assert g["target_pfns"] == [GiB_PFNS, 2 * GiB_PFNS]
    assert abs(g["duration_s"] - DURATION_S) < 2
    assert g["failures"] == len(g["failures_detail"])
    assert g["failures"] >= g["isolation_failures"] + g["not_tried"]
    assert g["attributed"] + g["unattributed"] == g["isolation_failures"]
    assert g["failure_rate"] == round(g["failures"] / g["attempts"], 4)

    # The guest's report windows and the backend's records are the same
    # reports, so each failure's page can be looked up in its report's ranges.
    assert g["attribution"] == "report-ranges", g["alignment"]
    assert 0 <= g["held_fraction"] <= g["in_flight_fraction"] <= 1

    # Every failed isolation test is attributed, without tolerance. The guest
    # has one vCPU: the isolation test (the shell's write) runs only while the
    # reporting worker is off the CPU, which while it holds pages is in
    # practice its sleep in virtballoon_free_page_report, a window. Measured
    # (3 runs, TCG, 100 ms held, 4-23 failures each): every failure inside its
    # report's window (>= 17 ms after it began, >= 2 ms before it ended), on
    # a page of that record's ranges; and no failure at all in ~800 attempts
    # each with no balloon device or QEMU's own device, so nothing else in
    # this guest makes the test fail. An unattributed failure is a bug in the
    # attribution or a new cause worth looking at. (Failures themselves are
    # likely, not certain: a pass takes the range only if it is free when
    # the worker scans it; zero failures leaves this part vacuous.)
    assert g["unattributed"] == 0, [d for d in g["failures_detail"] if d["report"] is None]
    for item in g["failures_detail"]:
        if item["test"] != "fail":
            continue
        record = run.trace[item["report"]]
        address = item["fin_pfn"] * 4096
        assert any(gpa <= address < gpa + length for gpa, length in record["ranges"]), item
        assert item["pass"] is not None
    assert g["passes_with_failures"] <= g["passes"]
