"""End-to-end fixtures: a real QEMU (qemu-configs/provision.sh) and the
project's real Linux test guest, beside the backend.

Every test here is marked `e2e`. Provisioning runs once per session; when it
fails the tests FAIL with provision.sh's reason (never a silent skip). Guest
runs that several tests can share are session-scoped: one `launch` run feeds
the reporting test and the guest-versus-backend test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vhost_balloon.backend.qemu.provisioning import cache_dir, configs_dir, read_env, run_provision

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "vhost_balloon.backend", "launch"]
MiB = 1 << 20
# Small rounds keep the suite short under TCG: boot ~5 s, a 200 MiB round ~7 s.
ROUNDS = 2
SIZE_MIB = 200
PAUSE_S = 5
RUN_TIMEOUT_S = 240
# Per test, fixtures included: the first one provisions QEMU and the guest.
E2E_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))


@dataclass
class LaunchRun:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    console: str
    trace: list[dict[str, Any]]  # the reports
    seconds: float
    chains: list[dict[str, Any]]  # every other record: inflate, deflate, stats

    @property
    def summary(self) -> dict[str, Any]:
        assert self.stdout.strip(), f"launch printed no summary; stderr:\n{self.stderr[-3000:]}"
        parsed: dict[str, Any] = json.loads(self.stdout)
        return parsed

    def last_error_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_launch(tmp: Path, *args: str, timeout: float = RUN_TIMEOUT_S) -> LaunchRun:
    """`vhost-balloon launch --json ...` as a user runs it (a separate process)."""
    tmp.mkdir(parents=True, exist_ok=True)
    trace = tmp / "trace.jsonl"
    console = tmp / "console.log"
    command = [*LAUNCH, "--json", "--console-log", str(console)]
    if "--baseline" not in args:
        command += ["--trace", str(trace)]
    command += list(args)
    start = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT
    )
    lines = trace.read_text().splitlines() if trace.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return LaunchRun(
        args=command,
        returncode=result.returncode,
        stdout=result.stdout,
        stderr=result.stderr,
        console=console.read_text(errors="replace") if console.exists() else "",
        trace=[r for r in records if r.get("kind", "report") == "report"],
        seconds=time.monotonic() - start,
        chains=[r for r in records if r.get("kind", "report") != "report"],
    )


def guest_args(rounds: int = ROUNDS, size: int = SIZE_MIB, pause: int = PAUSE_S) -> list[str]:
    return ["--rounds", str(rounds), "--size", str(size), "--pause", str(pause)]


@pytest.fixture(scope="session")
def provisioned() -> dict[str, str]:
    """CACHE/env.sh after provision.sh (seconds when cached). Fails, never skips."""
    if os.geteuid() != 0:
        pytest.fail(
            "the e2e tests need root (provision.sh installs packages, QEMU runs in a chroot); "
            "run them as root: .venv/bin/pytest tests/e2e"
        )
    failure = run_provision(configs_dir() / "provision.sh")
    if failure is not None:
        pytest.fail(f"provisioning failed, so no real guest can run: {failure}")
    return read_env(cache_dir() / "env.sh")


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def reporting_run(provisioned: dict[str, str], session_tmp: Path) -> LaunchRun:
    """One punch-hole run shared by the reporting and guest-vs-backend tests."""
    run = run_launch(session_tmp / "punch-hole", *guest_args())
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def baseline_run(provisioned: dict[str, str], session_tmp: Path) -> LaunchRun:
    run = run_launch(session_tmp / "baseline", "--baseline", *guest_args())
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture
def run_dir(provisioned: dict[str, str]) -> Iterator[Path]:
    """VB_RUN_DIR: a directory QEMU (even in its chroot) sees at the same path."""
    path = Path(provisioned["VB_RUN_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    yield path
