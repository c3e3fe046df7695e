"""The integrity soak's real-guest variant: a Linux guest writes patterns,
frees half of them so that they are reported, checks the rest page by page
and writes the freed ones again, while the backend serves its reports under
random delays. No page may change."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import MiB, run_launch

# Random delays at three points; a report is held 0-40 ms longer than it would be.
DELAYS = ("kick=exp:2ms", "entry=uniform:0ms..500us", "publish=uniform:0ms..20ms")
SIZE_MIB = 128  # 1 MiB files: 64 freed and 64 checked per round
MEM = "256M"  # tight enough that pages which were reported are written again
DURATION_S = 45


def test_a_real_guests_patterns_survive_reporting_under_random_delays(
    provisioned: dict[str, str], tmp_path: Path
) -> None:
    delays = [arg for delay in DELAYS for arg in ("--delay", delay)]
    run = run_launch(
        tmp_path,
        "--workload",
        "pattern",
        "--size",
        str(SIZE_MIB),
        "--mem",
        MEM,
        "--pause",
        "3",
        "--duration",
        str(DURATION_S),
        "--seed",
        "7",
        *delays,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    print(json.dumps(summary.get("pattern"), indent=1))
    pattern = summary["pattern"]
    assert pattern["complete"] and pattern["corrupted_pages"] == 0, pattern["bad_files"]
    assert pattern["rounds"] >= 2 and pattern["files"] == SIZE_MIB
    # Every round checked the half it kept, and the end checked every file.
    assert pattern["checked_mib"] == pattern["rounds"] * SIZE_MIB // 2 + SIZE_MIB
    assert summary["integrity_ok"] is True and summary["guest_done"] is True
    # Reports ran meanwhile, under the delays, and freed memory.
    assert summary["reports"] >= pattern["rounds"], summary["reports"]
    # Most of each freed half went back to the host (whole 2 MiB blocks only).
    assert summary["freed_bytes"] >= pattern["rounds"] * 16 * MiB, summary["freed_bytes"]
    injected = [r["injected_ns"] for r in run.trace]
    assert any(sum(i.values()) > 0 for i in injected)
    assert all(
        r["t_discard_done_ns"] <= r["t_published_ns"] for r in run.trace if r["discarded_entries"]
    )
