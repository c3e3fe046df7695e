"""Sweeps on a Dask cluster: a local cluster of two worker processes on
loopback running mocked-guest points, as `--executor dask://HOST:PORT`
and `--jobs N` run them. The rows, resume and seeds are a serial sweep's;
each row names the host and worker it ran on; a worker killed mid-point
loses only that point, which runs again elsewhere (or, once Dask gives up
on it, is a failed row while the rest goes on); bad addresses and workers
that cannot run the sweep are refused before any point starts."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, LocalCluster

from vhost_balloon.backend.experiment import executors, remote
from vhost_balloon.backend.experiment.executors import DaskCluster, parse_executor
from vhost_balloon.backend.experiment.runner import run_experiment
from vhost_balloon.backend.experiment.spec import ExperimentSpec, SpecError, parse_spec

SPEC = """
[experiment]
name = "cluster"
guest = "mock"
repeats = {repeats}
seed = 11

[settings]
duration = "{duration}"
pass_delay = "200ms"
attempt_rate = 20.0
memory = "2G"

[sweep]
delay = ["none", "report=const:20ms"]
"""


def _spec(repeats: int = 1, duration: str = "2s") -> ExperimentSpec:
    return parse_spec(SPEC.format(repeats=repeats, duration=duration))


def _local_cluster() -> LocalCluster:
    return LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        memory_limit=0,
    )


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with _local_cluster() as local:
        yield local


def _dask_url(cluster: LocalCluster) -> str:
    return cluster.scheduler_address.replace("tcp://", "dask://")


def _results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("dask://127.0.0.1:8786", "tcp://127.0.0.1:8786"),
        ("dask://sched.example:1234", "tcp://sched.example:1234"),
        ("dask://[::1]:8786", "tcp://[::1]:8786"),
    ],
)
def test_a_dask_url_names_the_scheduler(text: str, address: str) -> None:
    assert parse_executor(text) == address


@pytest.mark.parametrize(
    "text",
    ["tcp://127.0.0.1:8786", "dask://127.0.0.1", "dask://:8786", "dask://h:port", "dask://h:1/x"],
)
def test_a_bad_executor_is_refused_naming_it(text: str) -> None:
    with pytest.raises(SpecError, match=r"expected dask://HOST:PORT"):
        parse_executor(text)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhost_balloon.backend", "experiment", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--jobs", "0"], "--jobs: at least 1, not 0"),
        (["--jobs", "two"], "--jobs: not a whole number: 'two'"),
        (["--jobs", "2", "--executor", "dask://h:1"], "not allowed with argument"),
        (["--executor", "http://h:1"], "expected dask://HOST:PORT"),
    ],
)
def test_bad_cluster_options_are_refused_before_anything_starts(
    tmp_path: Path, options: list[str], message: str
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(repeats=1, duration="2s"), encoding="utf-8")
    run = _cli(str(spec), "--out", str(tmp_path / "out"), *options)
    assert run.returncode == 2
    assert message in run.stderr
    assert not (tmp_path / "out" / "points").exists()


def test_an_unreachable_scheduler_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with (
        pytest.raises(
            SpecError, match=rf"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}"
        ),
        DaskCluster(address=f"tcp://127.0.0.1:{port}"),
    ):
        pass


def test_a_sweep_on_two_workers_matches_a_serial_one_and_resumes(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(repeats=2, duration="2s"), encoding="utf-8")
    out = tmp_path / "out"
    run = _cli(str(spec), "--out", str(out), "--executor", _dask_url(cluster))
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"running on the Dask scheduler at {cluster.scheduler_address}" in run.stderr
    assert "4/4 points ok" in run.stderr
    rows = _results(out)
    workers = set(cluster.scheduler_info["workers"])
    # In point order, whatever order they finished in; seeds as a serial sweep's.
    assert [(r["label"], r["seed"]) for r in rows] == [
        ("delay=none", 11),
        ("delay=report=const:20ms", 11),
        ("delay=none", 12),
        ("delay=report=const:20ms", 12),
    ]
    for row in rows:
        assert row["status"] == "ok"
        assert row["host"] == socket.gethostname()
        assert row["worker"] in workers
        point = out / "points" / row["dir"]
        # Shipped back whole: the raw traces, the logs, the guest's files.
        assert (point / "backend-trace.jsonl").stat().st_size > 0
        assert (point / "guest" / "attempts.jsonl").exists()
        assert json.loads((point / "result.json").read_text()) == row
    assert {r["worker"] for r in rows} == workers  # both workers took points
    assert "points ran on: " in (out / "report.md").read_text()
    assert "Dask workers: 2" in (out / "report.md").read_text()

    again = _cli(str(spec), "--out", str(out), "--jobs", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 of 4 points already done" in again.stderr
    assert [r["seconds"] for r in _results(out)] == [r["seconds"] for r in rows]


def _kill_a_worker_mid_point(client: Client, done: threading.Event) -> str:
    """Wait for a worker to be running a point for a second, SIGKILL its
    process; the killed worker's address."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not done.is_set():
        processing: dict[str, list[str]] = client.processing()  # type: ignore[no-untyped-call]
        busy = [worker for worker, keys in processing.items() if keys]
        if busy:
            time.sleep(1.0)  # the point's backend and guest are up
            pids: dict[str, int] = client.run(os.getpid)
            killed: str = busy[0]
            os.kill(pids[killed], signal.SIGKILL)
            return killed
        time.sleep(0.05)
    raise AssertionError("no worker ever ran a point")


def _sweep_in_thread(
    spec: ExperimentSpec, out: Path, address: str
) -> tuple[threading.Thread, threading.Event, list[Any]]:
    result: list[Any] = []
    done = threading.Event()

    def sweep() -> None:
        try:
            with DaskCluster(address=address) as where:
                result.append(run_experiment(spec, out, executor=where, stream=io.StringIO()))
        except BaseException as error:  # shown by the test
            result.append(error)
        finally:
            done.set()

    thread = threading.Thread(target=sweep)
    thread.start()
    return thread, done, result


def _no_point_processes_left() -> bool:
    """No backend or guest of a shipped point (their paths hold the
    worker's scratch prefix) outlives its worker."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"vbx-point-" in (entry / "cmdline").read_bytes():
                    return False
            except OSError:
                continue
    return True


def test_a_worker_killed_mid_point_loses_only_that_point(
    tmp_path: Path, cluster: LocalCluster
) -> None:
    out = tmp_path / "out"
    thread, done, result = _sweep_in_thread(_spec(duration="4s"), out, cluster.scheduler_address)
    with Client(cluster.scheduler_address) as client:  # type: ignore[no-untyped-call]
        killed = _kill_a_worker_mid_point(client, done)
    thread.join(timeout=240)
    assert not thread.is_alive()
    rows = result[0]
    assert not isinstance(rows, BaseException), rows
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert killed not in {row["worker"] for row in rows}  # the killed point ran again elsewhere
    # The killed worker's backend and guest got SIGTERM with it.
    deadline = time.monotonic() + 10
    while not _no_point_processes_left():
        assert time.monotonic() < deadline, "a killed worker's point processes are still running"
        time.sleep(0.2)


def test_a_point_dask_gives_up_on_is_a_failed_row_and_the_rest_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # The scheduler (made here, in this process) gives a task whose worker
    # died no second chance.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        _local_cluster() as cluster,
    ):
        thread, done, result = _sweep_in_thread(
            _spec(duration="4s"), out, cluster.scheduler_address
        )
        with Client(cluster.scheduler_address) as client:  # type: ignore[no-untyped-call]
            _kill_a_worker_mid_point(client, done)
        thread.join(timeout=240)
    rows = result[0]
    assert not isinstance(rows, BaseException), rows
    assert sorted(row["status"] for row in rows) == ["failed", "ok"]
    failed = next(row for row in rows if row["status"] == "failed")
    assert "its Dask workers died under it" in failed["error"]
    stored = json.loads((out / "points" / failed["dir"] / "result.json").read_text())
    assert stored["status"] == "failed"  # a resume runs it again
    assert "## Runs that failed" in (out / "report.md").read_text()


@pytest.fixture
def threads_cluster() -> Iterator[LocalCluster]:
    """Workers in this process, so that a monkeypatch reaches them."""
    with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as local:
        yield local


def test_workers_with_another_version_are_refused_naming_them(
    threads_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "__version__", "0.0.1")
    refused = r"Dask workers run another vhost-balloon .*has 0\.0\.1"
    with (
        pytest.raises(SpecError, match=refused),
        DaskCluster(address=threads_cluster.scheduler_address),
    ):
        pass


def _refuse() -> None:
    raise SpecError("a real-guest sweep needs root")


def test_a_worker_that_cannot_run_the_sweep_is_refused_before_any_point(
    threads_cluster: LocalCluster,
) -> None:
    refused = r"a Dask worker: a real-guest sweep needs root"
    with (
        DaskCluster(address=threads_cluster.scheduler_address) as where,
        pytest.raises(SpecError, match=refused),
    ):
        where.check_each_worker(_refuse)


def test_an_error_on_the_worker_outside_the_point_is_a_failed_row(
    tmp_path: Path, threads_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(point: object, name: str, worker: str) -> remote.Shipped:
        raise RuntimeError("no space left in the scratch directory")

    monkeypatch.setattr(remote, "run_shipped", broken)
    out = tmp_path / "out"
    with DaskCluster(address=threads_cluster.scheduler_address) as where:
        rows = run_experiment(_spec(), out, executor=where, stream=io.StringIO())
    assert [row["status"] for row in rows] == ["failed", "failed"]
    assert all(
        row["error"] == "on its Dask worker: RuntimeError: no space left in the scratch directory"
        for row in rows
    )
