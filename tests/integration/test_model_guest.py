"""The free-list model guest (guest/model_guest.py) against the real backend.

The backend holds every report 50 ms at its `report` injection point, so
reports of the 1 GiB target range are in flight long enough for some of
the 20 contiguous attempts per second to meet them. A 2 GiB guest with
64 MiB reserved has 496 order-10 blocks; with capacity 32 a list's budget
is ceil(496 / 512) = 1, so every pass of this size makes two reports, and
the first one takes the 32 highest blocks (boot frees upwards, each to the
head of the list).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import vhost_balloon.guest.model_guest
from tests.conftest import RunningBackend, StartBackend
from vhost_balloon.backend.latency.delays import parse_delay
from vhost_balloon.backend.latency.injection import LatencySettings, Point
from vhost_balloon.guest.contig import AttemptResult, ContigConfig
from vhost_balloon.guest.errors import BackendClosedError, ConfigError
from vhost_balloon.guest.model_guest import (
    ModelConfig,
    _clip,
    _measure,
    _overlap,
    format_model,
    run_model,
)
from vhost_balloon.guest.page_reporting import ReportingConfig

GiB = 1 << 30
MiB = 1 << 20
MEMORY = 2 * GiB
REPORT_DELAY_NS = 50_000_000
DURATION_S = 2.5
ROOT = Path(__file__).resolve().parents[2]
GUEST = [sys.executable, "-m", "vhost_balloon.guest"]
SEED = 20


def _config(retries: int = 0, duration_s: float = DURATION_S, seed: int = 0) -> ModelConfig:
    return ModelConfig(
        duration_s=duration_s,
        reporting=ReportingConfig(capacity=32, delay_s=0.1),
        contig=ContigConfig(rate=20.0, retries=retries),
        seed=seed,
    )


async def _backend(start_backend: StartBackend) -> RunningBackend:
    latency = LatencySettings(delays={Point.REPORT: parse_delay("const:50ms")})
    return await start_backend(latency=latency)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    assert path.is_file(), path
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_model_run_attributes_every_failure_to_a_held_report(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    backend = await _backend(start_backend)
    out = tmp_path / "point"
    summary = await run_model(backend.guest_options(MEMORY), _config(seed=SEED), out_dir=out)

    assert summary["model"] == "freelists"
    assert summary["memory_bytes"] == MEMORY
    assert summary["capacity"] == 32
    assert summary["targets"] == [[GiB, GiB]]  # [0, 1 GiB) holds the reserved 64 MiB

    attempts = summary["attempts"]
    failures = summary["failures"]
    assert attempts > 0
    assert summary["failure_rate"] == failures / attempts
    assert sum(summary["outcomes"].values()) == attempts
    assert set(summary["outcomes"]) <= {"ok", "held"}
    assert summary["outcomes"].get("held", 0) == failures
    assert summary["attributed_failures"] == failures
    assert summary["requests"] == attempts  # no retries
    assert summary["requests_failed"] == failures

    assert summary["target_reports"] > 0
    assert 0 < summary["target_held_fraction"] < 1
    assert 0 < summary["predicted_failure_rate"] < 1

    # A list of this zone gets budget + 1 = 2 reports per pass: the first pass
    # makes both, later ones at most that (a drained list or the stop ends one early).
    assert summary["pass_reports"][0] == 2
    assert all(n <= 2 for n in summary["pass_reports"])
    assert summary["reports"] == sum(summary["pass_reports"])

    reports = _jsonl(out / "reports.jsonl")
    assert len(reports) == summary["reports"]
    assert [r["seq"] for r in reports] == list(range(len(reports)))
    assert reports[0]["pageblocks"] == [[1022 - 2 * k, 10] for k in range(32)]
    assert reports[1]["pageblocks"] == [[958 - 2 * k, 10] for k in range(32)]
    assert reports[0]["overlaps_target"] and reports[0]["bytes"] == 128 * MiB
    assert sum(r["overlaps_target"] for r in reports) == summary["target_reports"]
    assert sum(r["bytes"] for r in reports) == summary["reported_bytes"]
    for record in reports:
        assert record["hold_ns"] >= REPORT_DELAY_NS  # measured, not assumed
        assert record["t_start_ns"] <= record["t_available_ns"] <= record["t_used_ns"]
        assert record["t_used_ns"] <= record["t_end_ns"]
    assert sorted(r["hold_ns"] for r in reports) == summary["hold_ns"]

    # The backend saw each report and held it at its `report` point.
    trace = backend.trace()
    assert len(trace) == len(reports)
    assert all(t["injected_ns"]["report"] >= REPORT_DELAY_NS for t in trace)

    logged = _jsonl(out / "attempts.jsonl")
    assert len(logged) == attempts
    assert failures > 0
    by_seq = {r["seq"]: r for r in reports}
    for item in logged:
        assert item["retry"] == 0
        if item["outcome"] == "ok":
            # Taken while no report over the range was in flight.
            assert item["start"] == 512 and item["first_busy"] is None
            assert not any(
                r["overlaps_target"] and r["t_start_ns"] <= item["t_ns"] <= r["t_end_ns"]
                for r in reports
            )
            continue
        assert item["outcome"] == "held"
        assert item["held_by"] is not None
        holder = by_seq[item["held_by"]]
        assert holder["overlaps_target"]
        assert any(
            start <= item["first_busy"] < start + (1 << (order - 9))
            for start, order in holder["pageblocks"]
        )
        assert holder["t_start_ns"] <= item["t_ns"] <= holder["t_end_ns"]

    held = _jsonl(out / "held.jsonl")
    assert len(held) == 2 * len(reports)  # one step up, one down per report
    assert all(0 <= h["bytes"] <= 128 * MiB for h in held)
    assert held[-1]["bytes"] == 0
    assert [h["t_ns"] for h in held] == sorted(h["t_ns"] for h in held)

    table = format_model(summary)
    for label in ("attempts", "failures", "target held", "reports", "passes"):
        assert label in table


async def test_model_run_with_retries_fails_fewer_requests_than_attempts(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    backend = await _backend(start_backend)
    summary = await run_model(backend.guest_options(MEMORY), _config(retries=3), out_dir=tmp_path)
    assert summary["attempts"] > 0
    assert summary["requests"] <= summary["attempts"]
    assert summary["requests_failed"] <= summary["failures"]
    assert summary["failure_rate"] == summary["failures"] / summary["attempts"]
    assert (
        sum(summary["retries_needed"].values()) + summary["requests_failed"]
        == (summary["requests"])
    )
    assert set(summary["retries_needed"]) <= {"0", "1", "2", "3"}
    assert summary["attributed_failures"] == summary["failures"]

    logged = _jsonl(tmp_path / "attempts.jsonl")
    requests: dict[int, list[dict[str, Any]]] = {}
    for item in logged:
        requests.setdefault(item["request"], []).append(item)
    assert sorted(requests) == list(range(summary["requests"]))
    for tries in requests.values():
        assert [t["retry"] for t in tries] == list(range(len(tries)))
        assert len(tries) <= 4
        # Only a failure is retried.
        assert all(t["outcome"] == "held" for t in tries[:-1])


async def test_model_refuses_a_guest_without_a_target_range(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    # 1 GiB of RAM, a 1 GiB range: the only one holds the reserved memory.
    with pytest.raises(ConfigError, match="give it more memory"):
        await run_model(backend.guest_options(GiB), _config(duration_s=0.5))


async def _guest_cli(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *GUEST,
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_cli_model_json(start_backend: StartBackend, tmp_path: Path) -> None:
    backend = await _backend(start_backend)
    out = tmp_path / "cli-point"
    status, stdout, stderr = await _guest_cli(
        "--socket-path",
        str(backend.socket_path),
        "--memory",
        "2G",
        "--model",
        "--duration",
        "1.5",
        "--pass-delay",
        "0.1",
        "--attempt-rate",
        "20",
        "--json",
        "--out-dir",
        str(out),
    )
    assert status == 0, stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    assert summary["model"] == "freelists"
    assert summary["memory_bytes"] == MEMORY
    assert summary["attempts"] == len(_jsonl(out / "attempts.jsonl")) > 0
    assert summary["reports"] == len(_jsonl(out / "reports.jsonl")) > 0
    assert summary["pass_reports"][0] == 2
    assert summary["failure_rate"] == summary["failures"] / summary["attempts"]
    assert len(backend.trace()) == summary["reports"]


async def test_cli_model_without_a_target_range_says_so(start_backend: StartBackend) -> None:
    backend = await start_backend()
    status, stdout, stderr = await _guest_cli(
        "--socket-path", str(backend.socket_path), "--memory", "1G", "--model", "--duration", "1"
    )
    assert status == 1
    assert stdout == ""
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("guest: error: ")
    assert "give it more memory" in stderr


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--contig-size", "3M"], 1, "contiguous size must be a multiple of 2 MiB"),
        (["--contig-align", "6M"], 1, "is not a power of two"),
        (["--retries", "-1"], 1, "cannot be negative"),
        (["--duration", "0"], 2, "must be positive"),
        (["--attempt-rate", "fast"], 2, "is not a number"),
        (["--churn", "64M,0.5"], 2, "SIZE,EVERY_S,HOLD_S"),
        (["--churn", "3M,0.5,1"], 2, "churn size must be a multiple of 2 MiB"),
    ],
)
async def test_cli_model_bad_input_is_one_sentence(
    tmp_path: Path, args: list[str], status: int, message: str
) -> None:
    # Checked before connecting: the socket does not even exist.
    sock = tmp_path / "nobody.sock"
    code, stdout, stderr = await _guest_cli("--socket-path", str(sock), "--model", *args)
    assert code == status, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("guest: error: ")
    assert message in stderr
    assert "nobody.sock" not in stderr


async def test_a_backend_that_goes_away_ends_the_run_with_its_error(
    start_backend: StartBackend,
) -> None:
    backend = await _backend(start_backend)
    run = asyncio.get_running_loop().create_task(
        run_model(backend.guest_options(MEMORY), _config(duration_s=60.0))
    )
    while not backend.trace():  # one report went through
        assert not run.done()
        await asyncio.sleep(0.01)
    await backend.server.close()
    # Reporting is dead, so the run stops now instead of measuring for 60 s.
    with pytest.raises(BackendClosedError):
        await asyncio.wait_for(run, 15.0)


async def test_a_model_over_two_regions_reports_only_guest_ram(
    start_backend: StartBackend,
) -> None:
    # Two regions of 1 GiB: guest RAM is [0, 1 GiB) and [3 GiB, 4 GiB) (a
    # 2 GiB hole before the second, as q35 does above 4 GiB). Refusing such
    # a guest is acceptable; reporting addresses in the hole is not.
    backend = await start_backend()
    options = backend.guest_options(MEMORY, regions=2)
    try:
        summary = await run_model(options, _config(duration_s=1.0, seed=SEED))
    except ConfigError:
        return
    ram = [(0, GiB), (3 * GiB, 4 * GiB)]
    for start, size in summary["targets"]:
        assert any(lo <= start and start + size <= hi for lo, hi in ram), (start, size)
    trace = backend.trace()
    assert trace
    outside = [(r["seq"], r["skipped_outside"]) for r in trace if r["skipped_outside"]]
    assert outside == [], "reports named guest-physical addresses outside guest RAM"


async def test_a_crashed_allocation_workload_is_not_silently_dropped(
    start_backend: StartBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever kills the attempts task (here a stand-in for a bug in it),
    # the run must not come back as a summary of a guest that stopped trying.
    def broken(*_args: object) -> AttemptResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(vhost_balloon.guest.model_guest, "attempt", broken)
    backend = await start_backend()
    with pytest.raises(RuntimeError, match="boom"):
        await run_model(backend.guest_options(MEMORY), _config(duration_s=1.0))


async def test_a_failed_attempt_costs_its_attempt_cost_before_the_next(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    backend = await _backend(start_backend)
    config = ModelConfig(
        duration_s=1.5,
        reporting=ReportingConfig(capacity=32, delay_s=0.1),
        contig=ContigConfig(rate=1000.0, hold_s=0.0, cost_s=0.04),
    )
    summary = await run_model(backend.guest_options(MEMORY), config, out_dir=tmp_path)
    attempts = _jsonl(tmp_path / "attempts.jsonl")
    assert summary["failures"] > 0
    for earlier, later in itertools.pairwise(attempts):
        if earlier["outcome"] != "ok":
            assert later["t_ns"] - earlier["t_ns"] >= 40_000_000


def test_interval_arithmetic_of_the_prediction() -> None:
    merged = _clip([(5, 9), (0, 2), (1, 3), (20, 30)], 0, 25)
    assert merged == [(0, 3), (5, 9), (20, 25)]
    assert _measure(merged) == 12
    assert _overlap(merged, [(2, 6), (8, 21)]) == 1 + 1 + 1 + 1
