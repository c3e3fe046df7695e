"""Issue 10, items 10 and 11: corrupt files left in an output directory
never crash a resume or --report-only (the point is run again, or the rows
are rebuilt, and the file is named), and a spec whose values cannot run is
refused before anything starts, --dry-run included."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from vhost_balloon.backend.experiment import cli as experiment_cli
from vhost_balloon.backend.experiment import points as points_module
from vhost_balloon.backend.experiment.points import RESULT, finished_runs, point_dir, run_point
from vhost_balloon.backend.experiment.rows import read_rows
from vhost_balloon.backend.experiment.runner import run_experiment
from vhost_balloon.backend.experiment.spec import (
    MAX_SPEC_BYTES,
    ExperimentSpec,
    Point,
    SpecError,
    load_spec,
    parse_spec,
)
from vhost_balloon.backend.experiment.tables import summarise

REPO = Path(__file__).resolve().parents[2]
SPEC = """
[experiment]
name = "corrupt"
repeats = 1
[settings]
duration = "2s"
[sweep]
delay = ["none", "report=const:5ms", "report=const:10ms"]
"""


def _measured(point: Point, _directory: Path) -> dict[str, Any]:
    """What run_mock returns, without the processes: enough for every table."""
    return {
        "attempts": 10,
        "failures": point.seed,
        "failure_rate": point.seed / 10,
        "held_fraction": 0.1,
        "model_p_fail": 0.1,
        "reports": 3,
        "passes": 2,
        "passes_with_failures": 1,
        "hold_p50_ms": 1.0,
        "backend_reports": 3,
        "injected_ms": 0.0,
        "kick_to_notify_p50_ms": 0.5,
        "freed_bytes": 0,
    }


@pytest.fixture
def finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ExperimentSpec, Path]:
    """A sweep of three points run to the end through the real run_point
    (result.json, results.jsonl), with the processes replaced."""
    monkeypatch.setattr(points_module, "run_mock", _measured)
    spec = parse_spec(SPEC)
    out = tmp_path / "out"
    rows = run_experiment(spec, out, stream=io.StringIO(), run=run_point)
    assert [row["status"] for row in rows] == ["ok"] * 3
    return spec, out


def _result(spec: ExperimentSpec, out: Path, index: int) -> Path:
    return point_dir(out, spec.points()[index]) / RESULT


def _edit(path: Path, **changes: object) -> None:
    row = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(row | changes), encoding="utf-8")


def _counting_run(ran: list[str]) -> Any:
    def run(point: Point, directory: Path) -> dict[str, Any]:
        ran.append(point.label)
        return run_point(point, directory)

    return run


CORRUPTIONS: dict[str, tuple[Any, str]] = {
    "a seed that is text": (lambda p: _edit(p, seed="x"), "'seed' is 'x'"),
    "a failure rate that is text": (lambda p: _edit(p, failure_rate="abc"), "'failure_rate'"),
    "a count that is negative": (lambda p: _edit(p, attempts=-1), "'attempts' is -1"),
    "a missing key": (lambda p: p.write_text('{"status": "ok"}'), "no 'kind'"),
    "not JSON": (lambda p: p.write_text('{"status": "ok", '), "not JSON"),
    "a list": (lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    "not UTF-8": (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
    "another point's row": (lambda p: _edit(p, repeat=7), "not of this point"),
    "an unknown status": (lambda p: _edit(p, status="done"), "'status' is 'done'"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_result_is_named_and_its_point_runs_again(
    finished: tuple[ExperimentSpec, Path], corruption: str
) -> None:
    spec, out = finished
    corrupt, why = CORRUPTIONS[corruption]
    path = _result(spec, out, 1)
    corrupt(path)
    ran: list[str] = []
    stream = io.StringIO()
    rows = run_experiment(spec, out, stream=stream, run=_counting_run(ran))
    assert ran == [spec.points()[1].label]  # only the corrupt point, once
    warnings = [line for line in stream.getvalue().splitlines() if str(path) in line]
    assert len(warnings) == 1
    assert why in warnings[0]
    assert "run again" in warnings[0]
    assert [row["status"] for row in rows] == ["ok"] * 3
    # The rerun rewrote a good result.json: the next resume runs nothing.
    assert set(finished_runs(out, pytest.fail)) == {(p.setting_key, p.seed) for p in spec.points()}


def test_a_text_seed_is_not_a_finished_run(finished: tuple[ExperimentSpec, Path]) -> None:
    """The issue's case: `"seed": "x"` gave "internal error: ValueError" and
    the sweep could never resume."""
    spec, out = finished
    _edit(_result(spec, out, 0), seed="x")
    assert finished_runs(out, lambda _text: None).keys() == {
        (p.setting_key, p.seed) for p in spec.points()[1:]
    }


def _report_only(spec_path: Path, out: Path) -> int:
    args = argparse.Namespace(spec=spec_path, out=out, rerun=False, dry_run=False, report_only=True)
    return experiment_cli.run(args)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not JSON"),
        ('"a string"', "not a JSON object"),
        ('{"kind": "mock"}', "no 'status'"),
    ],
)
def test_report_only_rebuilds_the_rows_when_a_results_line_is_bad(
    finished: tuple[ExperimentSpec, Path],
    capsys: pytest.CaptureFixture[str],
    line: str,
    why: str,
) -> None:
    spec, out = finished
    results = out / "results.jsonl"
    lines = results.read_text(encoding="utf-8").splitlines()
    results.write_text("\n".join([lines[0], line, lines[2]]) + "\n", encoding="utf-8")
    assert _report_only(out / "spec.toml", out) == 0
    err = capsys.readouterr().err
    assert f"{results}:2: {why}" in err
    assert "rebuilt from" in err
    assert "Traceback" not in err
    # All three points are back, from their own result.json.
    rows, problems = read_rows(results)
    assert problems == []
    assert [row["label"] for row in rows] == [p.label for p in spec.points()]


def test_report_only_survives_a_non_numeric_figure(
    finished: tuple[ExperimentSpec, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's `"failure_rate": "abc"` crashed in summarise."""
    _spec, out = finished
    results = out / "results.jsonl"
    rows = [json.loads(text) for text in results.read_text(encoding="utf-8").splitlines()]
    rows[0]["failure_rate"] = "abc"
    results.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert _report_only(out / "spec.toml", out) == 0
    assert f"{results}:1: 'failure_rate' is 'abc', not a number" in capsys.readouterr().err
    assert "| mock | delay=none | 1 | 10 | 10.0" in (out / "report.md").read_text()


def test_report_only_with_nothing_to_report_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "empty"
    out.mkdir()
    assert _report_only(spec, out) == 2
    assert "nothing to report" in capsys.readouterr().err


def test_summarise_leaves_out_what_is_not_a_number() -> None:
    base = {"kind": "mock", "label": "x", "setting_key": "mock x", "seed": 1, "status": "ok"}
    rows = [
        base | {"failure_rate": 0.5, "attempts": 4, "failures": 2},
        base | {"failure_rate": "abc", "attempts": "many", "failures": None, "seed": 2},
        base | {"failure_rate": True, "attributed": [1], "seed": 3},
    ]
    (entry,) = summarise(rows)
    assert entry["failure_rate"] == 0.5
    assert entry["total_attempts"] == 4
    assert entry["total_attributed"] == 0
    assert math.isnan(entry["held_fraction"])


# ---------------------------------------------------------------- item 11


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[settings]\nworkload = 'churn:0,1ns,0s'", "churn size in 'churn:0,1ns,0s'"),
        ("[settings]\nworkload = 'churn:3M,1s,1s'", "multiple of 2M"),
        ("[settings]\nworkload = 'churn:64M,1ns,1s'", "churn interval in 'churn:64M,1ns,1s'"),
        ("[settings]\nworkload = 'churn:64M,0s,1s'", "churn interval"),
        ("[settings]\nworkload = 'churn:64M,1s,0s'", "churn hold in 'churn:64M,1s,0s'"),
        ("[settings]\nworkload = 'churn:64M,2d,1s'", "churn interval"),
        ("[settings]\nworkload = 'churn:64M,1s,99999999999s'", "churn hold"),
        ("[settings]\nworkload = 'churn:4G,1s,1s'", "allocates more than the 2G guest"),
        ("[settings]\nmemory = '99999999999999999999T'", "is larger than 1024T"),
        ("[settings]\nmemory = '9' * 5000", "[settings] memory"),
        ("[settings]\nmemory = '2T'", "not between 1 byte and 1T"),
        ("[settings]\ncontig_size = '99999999999999999999T'", "[settings] contig_size"),
        ("[settings]\nduration = '99999999999s'", "'99999999999s' is not between 1ms and 86400s"),
        ("[settings]\nduration = '0s'", "[settings] duration"),
        ("[settings]\npass_delay = '99999999999s'", "[settings] pass_delay"),
        ("[settings]\ncontig_hold = '2000000s'", "[settings] contig_hold"),
        ("[settings]\nattempt_rate = 1e300", "[settings] attempt_rate"),
        ("[settings]\nretries = 100000000000", "[settings] retries"),
        ("[experiment]\nguest = 'qemu'\n[settings]\nduration = '99999999999s'", "duration"),
        ("[experiment]\nguest = 'qemu'\n[settings]\nmemory = '2T'", "[settings] memory"),
        ("[experiment]\nguest = 'qemu'\n[settings]\ntimeout = '864000s'", "[settings] timeout"),
    ],
)
def test_a_value_that_would_fail_after_the_start_is_refused(text: str, reason: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(text.replace("'9' * 5000", "'" + "9" * 5000 + "'"))
    assert reason in str(caught.value)


def test_a_bql_hold_longer_than_the_run_is_refused_naming_the_point() -> None:
    """const:60s@1000 with a 2 s duration ran 183 s and then failed. (Its
    lock load, 60000, is refused by parse_bql; a load the lock can carry,
    with holds longer than the run, is this check's.)"""
    with pytest.raises(SpecError) as caught:
        parse_spec(
            "[settings]\nduration = '2s'\n"
            "[sweep]\nbql = ['none', 'const:60s@0.01,threads=64']\ncapacity = [16, 32]\n"
        )
    message = str(caught.value)
    assert message.startswith("mock bql=const:60s@0.01,threads=64 capacity=16:")
    assert "holds the lock 60s per acquisition" in message
    assert "duration = '2s'" in message


def test_a_bql_hold_is_checked_against_the_models_own_duration() -> None:
    real = "[experiment]\nguest = 'qemu'\n[settings]\nduration = '60s'\nbql = 'const:10s@0.01'\n"
    parse_spec(real)  # 10 s holds in a 60 s run: long, but a run
    with pytest.raises(SpecError, match=r"^model .*longer than the run's duration = '5s'"):
        parse_spec(real + "[model]\nduration = '5s'\n")


@pytest.mark.parametrize(
    "text",
    [
        "[settings]\nworkload = 'churn:64M,1ms,1ms'",
        "[settings]\nworkload = 'churn:1G,86400s,86400s'",
        "[settings]\nduration = '86400s'\nmemory = '1T'",
        "[settings]\nduration = '2s'\nbql = 'const:2s@0.1'",
        "[settings]\nduration = '2s'\nbql = 'exp:1ms@100,threads=2'",
    ],
)
def test_values_at_the_bounds_are_accepted(text: str) -> None:
    parse_spec(text)


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.toml")))
def test_the_shipped_specs_still_load(path: Path) -> None:
    assert load_spec(path).points()


def _load_within(path: Path, seconds: float = 30.0) -> BaseException | None:
    """load_spec in a thread, so a regression that blocks fails instead of hanging."""
    caught: list[BaseException] = []

    def load() -> None:
        try:
            load_spec(path)
        except BaseException as error:  # handed to the test
            caught.append(error)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"load_spec({path}) blocked"
    return caught[0] if caught else None


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    error = _load_within(fifo)
    assert isinstance(error, SpecError)
    assert str(error) == f"{fifo} is not a regular file (a FIFO): refused"


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"), ("/", "a dir")])
def test_a_device_or_directory_is_refused(path: str, kind: str) -> None:
    error = _load_within(Path(path))
    assert isinstance(error, SpecError)
    assert f"{path} is not a regular file ({kind}" in str(error)


def test_a_huge_spec_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * MAX_SPEC_BYTES + "\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"big.toml is larger than 1 MiB"):
        load_spec(big)


def _cli(spec: Path, tmp_path: Path, *, dry_run: bool = True) -> int:
    args = argparse.Namespace(
        spec=spec, out=tmp_path / "out", rerun=False, dry_run=dry_run, report_only=False
    )
    return experiment_cli.run(args)


def test_the_command_refuses_dev_zero_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(Path("/dev/zero"), tmp_path) == 2
    err = capsys.readouterr().err
    assert err == (
        "vhost-balloon experiment: /dev/zero: /dev/zero is not a regular file "
        "(a character device): refused\n"
    )


@pytest.mark.parametrize(
    "settings",
    [
        "workload = 'churn:0,1ns,0s'",
        "memory = '99999999999999999999T'",
        "duration = '99999999999s'",
        "duration = '2s'\nbql = 'const:60s@1000,threads=64'",
        "duration = '2s'\nbql = 'const:60s@0.01,threads=64'",
    ],
)
def test_dry_run_refuses_what_the_run_would_fail_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: str
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(f"[settings]\n{settings}\n", encoding="utf-8")
    assert _cli(spec, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vhost-balloon experiment: {spec}: ")
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_nul_in_the_name_is_refused_not_an_internal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text('[experiment]\nname = "a\\u0000b"\n', encoding="utf-8")
    assert _cli(spec, tmp_path, dry_run=False) == 2
    assert "not a plain name" in capsys.readouterr().err
