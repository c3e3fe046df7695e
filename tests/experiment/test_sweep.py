"""A short mocked-guest sweep end to end, as a user runs it: the real
backend and the modelled guest as processes, then the CSV, the figures and
the report; a second run resumes; a point that fails is recorded and the
others still run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vhost_balloon.backend.experiment import cli as experiment_cli
from vhost_balloon.backend.experiment.spec import SpecError, parse_spec
from vhost_balloon.backend.qemu.provisioning import LaunchError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = """
[experiment]
name = "short"
guest = "mock"
repeats = 2
seed = 3

[settings]
duration = "2s"
pass_delay = "200ms"
attempt_rate = 20.0
memory = "{memory}"

[sweep]
delay = ["none", "report=const:40ms"]
"""


def _experiment(
    spec: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "vhost_balloon.backend",
            "experiment",
            str(spec),
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=None if env is None else os.environ | env,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_a_short_sweep_writes_results_figures_and_report_and_resumes(tmp_path: Path) -> None:
    spec = tmp_path / "short.toml"
    spec.write_text(SPEC.format(memory="2G"), encoding="utf-8")
    out = tmp_path / "out"
    run = _experiment(spec, out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "4/4 points ok" in run.stderr
    assert "ETA" in run.stderr  # the progress line

    rows = _rows(out / "results.csv")
    assert len(rows) == 4
    assert {row["status"] for row in rows} == {"ok"}
    assert sorted(row["seed"] for row in rows) == ["3", "3", "4", "4"]
    for row in rows:
        attempts, failures = int(row["attempts"]), int(row["failures"])
        assert attempts > 0
        assert float(row["failure_rate"]) == pytest.approx(failures / attempts, abs=1e-5)
        assert int(row["backend_reports"]) == int(row["reports"])  # both sides agree
        point = out / "points" / row["dir"]
        assert (point / "backend-trace.jsonl").stat().st_size > 0
        assert (point / "guest" / "attempts.jsonl").exists()
        assert json.loads((point / "result.json").read_text())["status"] == "ok"
    delayed = [row for row in rows if row["set_delay"] != "none"]
    # The backend measured the delay it injected, per report.
    assert all(float(row["injected_ms"]) >= 40.0 for row in delayed)
    assert all(float(row["hold_p50_ms"]) >= 40.0 for row in delayed)
    # Every failure of a delayed run is a report holding the range, attributed.
    assert all(row["attributed"] == row["failures"] for row in delayed)

    summary = _rows(out / "summary.csv")
    assert [row["label"] for row in summary] == ["delay=none", "delay=report=const:40ms"]
    assert all(row["repeats"] == "2" for row in summary)
    for name in ("hold_cdf", "held_over_time", "failure_vs_delay", "measured_vs_model"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "| mock | delay=report=const:40ms | 2 |" in report
    assert "figures/failure_vs_delay.png" in report
    assert "seeds 3..4" in report

    # Resume: every point is already finished, nothing runs again.
    before = {row["dir"]: row["seconds"] for row in rows}
    again = _experiment(spec, out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 of 4 points already done" in again.stderr
    assert {row["dir"]: row["seconds"] for row in _rows(out / "results.csv")} == before

    # The tables and figures are derived again from the raw output, same numbers.
    (out / "figures" / "hold_cdf.png").unlink()
    redrawn = _experiment(spec, out, "--report-only")
    assert redrawn.returncode == 0, redrawn.stderr[-2000:]
    assert (out / "figures" / "hold_cdf.png").read_bytes()[:8] == PNG_MAGIC
    assert [r["failures"] for r in _rows(out / "results.csv")] == [r["failures"] for r in rows]


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    spec = tmp_path / "small.toml"
    spec.write_text(
        SPEC.format(memory="2G").replace("repeats = 2", "repeats = 1"), encoding="utf-8"
    )
    # A socket directory longer than a unix socket path may be: the backend
    # cannot listen, every point fails with its reason, none is lost.
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    out = tmp_path / "out"
    run = _experiment(spec, out, env={"TMPDIR": str(deep)})
    assert run.returncode == 1
    rows = _rows(out / "results.csv")
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert all("the backend exited" in row["error"] for row in rows)
    assert "## Runs that failed" in (out / "report.md").read_text()


def test_a_bad_spec_is_refused_before_anything_starts(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text("[sweep]\ndelay = ['report=const:1ms']\nspeed = [1]\n", encoding="utf-8")
    out = tmp_path / "out"
    run = _experiment(spec, out)
    assert run.returncode == 2
    assert "[sweep] speed: unknown key" in run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_an_output_directory_that_is_not_an_experiments_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "ok.toml"
    spec.write_text(SPEC.format(memory="2G"), encoding="utf-8")
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("precious", encoding="utf-8")
    run = _experiment(spec, out)
    assert run.returncode == 2
    assert "not an experiment's" in run.stderr
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_real_guest_sweep_without_qemu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(_note: object) -> dict[str, str]:
        raise LaunchError("provision.sh failed: no network")

    monkeypatch.setattr(experiment_cli, "ensure_provisioned", missing)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    spec = parse_spec("[experiment]\nguest = 'qemu'\n[sweep]\ndelay = ['none']\n")
    with pytest.raises(SpecError, match=r"QEMU is not usable.*no network"):
        experiment_cli.check_runnable(spec)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(SpecError, match="needs root"):
        experiment_cli.check_runnable(spec)
