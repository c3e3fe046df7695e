"""virtio-mem beside the backend on a real Linux 6.12 guest, a short
`launch --workload vmem` as a user runs it: the host plugs 256 MiB of a
1 GiB virtio-mem device through QMP, waits 2.5 s and unplugs it, while the
backend holds each report 400 ms. The backend maps the device's memory (no
report is skipped as outside guest RAM); every isolation test that failed
during an unplug is attributed to the report that held its page; and an
unplug that met a held page waited for the driver's 50 s retry timer
(measured: 2 of 2 unplugs in 60 s at 400 ms, 0 of 33 without a delay)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import LaunchRun, run_launch


def test_unplugs_that_meet_a_held_report_are_attributed_to_it(
    provisioned: dict[str, str], session_tmp: Path
) -> None:
    run: LaunchRun = run_launch(
        session_tmp / "vmem",
        *("--workload", "vmem", "--duration", "60", "--settle", "10"),
        *("--vmem-size", "256M", "--delay", "report=const:400ms"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    v = summary["vmem"]
    print(json.dumps({k: x for k, x in v.items() if k not in ("unplug_detail",)}, indent=1))
    assert v["error"] is None and summary["integrity_ok"] is True
    assert v["plug_bytes"] == 256 << 20 and v["block_bytes"] == 2 << 20
    plugs = [r for r in v["requests"] if r["kind"] == "plug"]
    assert plugs and all(r["seconds"] is not None for r in plugs)  # every plug was done
    assert v["unplugs"] >= 1
    # The device's memory is in the backend's map: its reports were discarded.
    assert all(r["skipped_outside"] == 0 for r in run.trace)
    assert any(gpa >= 4 << 30 for r in run.trace for gpa, _ in r["ranges"])  # above 4 GiB
    # Every failed isolation test of an unplug met a page a report held.
    assert v["unattributed"] == 0, [u for u in v["unplug_detail"] if u["failed_tests"]]
    for unplug in v["unplug_detail"]:
        waited = unplug["seconds"] is None or unplug["seconds"] >= 50
        fast = unplug["seconds"] is not None and unplug["seconds"] < 5
        assert waited or fast, unplug  # done at once, or after the retry timer
        if waited:
            assert unplug["failed_tests"], unplug  # only a busy page makes it wait
        for failed in unplug["failed_tests"]:
            record = run.trace[failed["report"]]
            pfn = failed["fin_pfn"] * 4096
            assert any(gpa <= pfn < gpa + length for gpa, length in record["ranges"])
