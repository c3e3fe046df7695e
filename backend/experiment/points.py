"""Running one point: the processes it needs, where its raw output goes,
and the one result row it yields.

Each point gets its own directory holding everything it produced (the
backend's trace and log, the guest's or QEMU's output) and, last,
`result.json`; a directory with a `result.json` for the same settings is a
finished point and is not run again.

Mock points run `vhost-balloon serve` and `python -m vhost_balloon.guest --model` as two
processes, as QEMU and the backend would be; real-guest points run
`vhost-balloon launch` (which holds the backend) per point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vhost_balloon.backend.balloon.records import hold_window_ns
from vhost_balloon.backend.experiment.rows import RowError, check_row, read_result
from vhost_balloon.backend.experiment.spec import REAL_KINDS, Point, Value
from vhost_balloon.backend.latency.delays import parse_duration
from vhost_balloon.backend.observe.trace import read_trace
from vhost_balloon.backend.qemu.command import DEFAULT_APPEND
from vhost_balloon.protocol.units import parse_size

SOCKET_WAIT_S = 10.0
STOP_WAIT_S = 60.0
RESULT = "result.json"


class PointError(Exception):
    """A point that ran and failed: the reason, with where to look."""


def _dir_name(kind: str, setting_key: str, seed: int, repeat: int) -> str:
    digest = hashlib.sha256(f"{setting_key}\0{seed}".encode()).hexdigest()[:10]
    return f"{kind}-{digest}-r{repeat}"


def point_dir(out: Path, point: Point) -> Path:
    """A directory named by what the run is (its settings and seed), not by
    its position, so a spec that gains a value never reuses another's."""
    return out / "points" / _dir_name(point.kind, point.setting_key, point.seed, point.repeat)


def _warn_stderr(text: str) -> None:
    print(f"experiment: {text}", file=sys.stderr)


def finished_runs(
    out: Path, warn: Callable[[str], None] = _warn_stderr
) -> dict[tuple[str, int], dict[str, Any]]:
    """Every run under out/points that finished ok, by (settings, seed).

    A result.json that is not a row, or not the row of its own directory, is
    not a finished run: `warn` is told which file and why, and the point
    runs again (its directory is rewritten)."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for path in sorted((out / "points").glob(f"*/{RESULT}")):
        try:
            stored = own_result(path)
        except (OSError, RowError) as error:
            why = error.strerror if isinstance(error, OSError) and error.strerror else error
            warn(f"{path}: {why}: the point is run again")
            continue
        if stored["status"] == "ok":
            done[(stored["setting_key"], stored["seed"])] = stored
    return done


def own_result(path: Path) -> dict[str, Any]:
    """The row in `path` (DIR/result.json), which must be DIR's own run."""
    row = read_result(path)
    own = _dir_name(row["kind"], row["setting_key"], row["seed"], row["repeat"])
    if path.parent.name != own or row.get("dir") != own:
        raise RowError(f"its kind, settings, seed and repeat are those of {own}, not of this point")
    return row


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _seconds(value: Value) -> float:
    return parse_duration(str(value)) / 1e9


def _latency_args(settings: dict[str, Value]) -> list[str]:
    args = ["--discard", str(settings["discard"]), "--bql-phases", str(settings["bql_phases"])]
    if settings["delay"] != "none":
        for part in str(settings["delay"]).split():
            args += ["--delay", part]
    for key, flag in (("bql", "--bql"), ("mmap_contention", "--mmap-contention")):
        if settings[key] != "none":
            args += [flag, str(settings[key])]
    return args


# Spec key -> `python -m vhost_balloon.guest --model` flag, as given or as seconds.
_GUEST_AS_IS = ("memory", "capacity", "order", "contig_size", "contig_align", "retries", "reserved")
_GUEST_SECONDS = ("duration", "pass_delay", "backoff", "contig_hold", "attempt_cost")


def _guest_args(settings: dict[str, Value], seed: int, out: Path) -> list[str]:
    args = ["--model", "--json"]
    for key in _GUEST_AS_IS:
        args += [_flag(key), str(settings[key])]
    for key in _GUEST_SECONDS:
        args += [_flag(key), f"{_seconds(settings[key]):g}"]
    args += ["--attempt-rate", f"{settings['attempt_rate']:g}", "--seed", str(seed)]
    args += ["--out-dir", str(out), "--report-timeout", "120"]
    if settings["touch"]:
        args.append("--touch")
    workload = str(settings["workload"])
    if workload.startswith("churn:"):
        size, every, hold = workload.removeprefix("churn:").split(",")
        args += ["--churn", f"{size},{_seconds(every):g},{_seconds(hold):g}"]
    return args


def run_mock(point: Point, directory: Path) -> dict[str, Any]:
    """The backend and the modelled guest as two processes; the result row."""
    with tempfile.TemporaryDirectory(prefix="vbx-") as tmp:
        socket_path = Path(tmp) / "s.sock"
        trace = directory / "backend-trace.jsonl"
        trace.unlink(missing_ok=True)
        backend_log = (directory / "backend.log").open("w", encoding="utf-8")
        backend = subprocess.Popen(
            ends_with_us(
                [
                    *(sys.executable, "-m", "vhost_balloon.backend", "serve"),
                    *("--socket-path", str(socket_path)),
                    *("--trace", str(trace), "--seed", str(point.seed)),
                    *_latency_args(point.settings),
                ]
            ),
            stdin=subprocess.DEVNULL,
            stdout=backend_log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_socket(socket_path, backend, directory / "backend.log")
            guest = subprocess.run(
                ends_with_us(
                    [
                        *(sys.executable, "-m", "vhost_balloon.guest"),
                        *("--socket-path", str(socket_path)),
                        *_guest_args(point.settings, point.seed, directory / "guest"),
                    ]
                ),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_seconds(point.settings["duration"]) + 300,
                check=False,
            )
        finally:
            _stop(backend)
            backend_log.close()
    (directory / "guest.json").write_text(guest.stdout, encoding="utf-8")
    (directory / "guest.log").write_text(guest.stderr, encoding="utf-8")
    if guest.returncode != 0:
        reason = guest.stderr.strip().splitlines()[-1:] or [f"status {guest.returncode}"]
        raise PointError(f"the modelled guest failed: {reason[0]} (see {directory}/guest.log)")
    summary: dict[str, Any] = json.loads(guest.stdout)
    return mock_row(summary, backend_figures(trace))


def mock_row(summary: dict[str, Any], backend: dict[str, Any]) -> dict[str, Any]:
    holds = summary["hold_ns"]
    return {
        "attempts": summary["attempts"],
        "failures": summary["failures"],
        "failure_rate": summary["failure_rate"],
        "requests": summary["requests"],
        "requests_failed": summary["requests_failed"],
        "attributed": summary["attributed_failures"],
        "held_fraction": summary["target_held_fraction"],
        "model_p_fail": summary["predicted_failure_rate"],
        "reports": summary["reports"],
        "target_reports": summary["target_reports"],
        "passes": summary["passes"],
        "passes_with_failures": summary["passes_with_failures"],
        "hold_p50_ms": _median(holds) / 1e6,
        **backend,
    }


def backend_figures(trace: Path) -> dict[str, Any]:
    """What the backend's trace says: its reports, kick-to-notify and the
    delay it really injected (measured, not configured), per report."""
    records: list[Any] = []
    with contextlib.suppress(OSError, ValueError):
        records = list(read_trace(trace))
    injected = [sum(r["injected_ns"].values()) for r in records]
    k2n = [
        ns
        for r in records
        if (ns := hold_window_ns(r["t_kick_ns"], r["t_published_ns"], r["t_notified_ns"]))
        is not None
    ]
    if not records:  # no backend (a control) or no report: nothing measured
        return {
            "backend_reports": 0,
            "injected_ms": None,
            "kick_to_notify_p50_ms": None,
            "freed_bytes": 0,
        }
    return {
        "backend_reports": len(records),
        "injected_ms": sum(injected) / len(injected) / 1e6,
        "kick_to_notify_p50_ms": _median(k2n) / 1e6,
        "freed_bytes": sum(r["freed_bytes"] for r in records),
    }


def _median(values: list[int] | list[float]) -> float:
    """The median, 0.0 for a run with no sample."""
    return float(statistics.median(values)) if values else 0.0


def ends_with_us(command: list[str]) -> list[str]:
    """`command` set to get SIGTERM if the thread that started it dies (a
    Dask worker killed mid-point), through util-linux's setpriv (prctl
    PR_SET_PDEATHSIG, kept across its exec; a preexec_fn would not be safe
    in a worker's threads). Every command a point runs takes SIGTERM as a
    request to stop cleanly; launch stops its QEMU first. Without setpriv,
    `command` as it is."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", *command] if setpriv else command


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SOCKET_WAIT_S
    while not path.exists():
        if process.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            raise PointError(f"the backend exited: {tail[0] if tail else process.returncode}")
        if time.monotonic() > deadline:
            raise PointError(f"the backend did not listen within {SOCKET_WAIT_S:g} s")
        time.sleep(0.02)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def qemu_command(point: Point, directory: Path) -> list[str]:
    settings = point.settings
    workload = str(settings["workload"])
    duration = _seconds(settings["duration"])
    settle = _seconds(settings["settle"])
    command = [
        sys.executable,
        "-m",
        "vhost_balloon.backend",
        "launch",
        "--json",
        "--workload",
        workload,
        "--duration",
        f"{round(duration)}",
        "--settle",
        f"{round(settle)}",
        "--mem",
        f"{parse_size(str(settings['memory'])) >> 20}M",
        "--timeout",
        f"{round(_seconds(settings['timeout']))}",
        "--console-log",
        str(directory / "console.log"),
    ]
    if settings["order"] != 9:
        # --append replaces launch's defaults for the workload, so repeat them.
        order = f"page_reporting.page_reporting_order={settings['order']}"
        command += ["--append", f"{DEFAULT_APPEND[workload]} {order}"]
    if settings["movable"] != "none":
        command += ["--movable", str(settings["movable"])]
    if workload == "fill":
        size_mib = parse_size(str(settings["size"])) >> 20
        command += ["--rounds", str(settings["rounds"]), "--size", str(size_mib)]
        command += ["--pause", f"{round(_seconds(settings['pause']))}"]
    if point.kind == "no_balloon":
        return [*command, "--no-balloon"]
    if point.kind == "builtin":
        return [*command, "--baseline"]
    trace = directory / "backend-trace.jsonl"
    trace.unlink(missing_ok=True)
    return [
        *command,
        "--trace",
        str(trace),
        "--seed",
        str(point.seed),
        *_latency_args(settings),
    ]


def run_qemu(point: Point, directory: Path) -> dict[str, Any]:
    """`vhost-balloon launch` with the gigantic-page workload; the result row."""
    settings = point.settings
    limit = _seconds(settings["timeout"]) + 120
    launched = run_stopping_gracefully(qemu_command(point, directory), limit)
    (directory / "launch.json").write_text(launched.stdout, encoding="utf-8")
    (directory / "launch.log").write_text(launched.stderr, encoding="utf-8")
    if launched.returncode != 0:
        lines = [line for line in launched.stderr.splitlines() if line.strip()]
        raise PointError(
            f"launch failed ({lines[-1] if lines else launched.returncode}); "
            f"see {directory}/launch.log"
        )
    summary: dict[str, Any] = json.loads(launched.stdout)
    return qemu_row(summary, backend_figures(directory / "backend-trace.jsonl"))


def qemu_row(summary: dict[str, Any], backend: dict[str, Any]) -> dict[str, Any]:
    workload = str(summary.get("workload", "gigantic"))
    if workload == "fill":
        return _fill_row(summary, backend)
    if workload == "vmem":
        summary = summary | {"vmem": _vmem_as_attempts(summary.get("vmem") or {})}
    gigantic = summary.get(workload) or {}
    if not gigantic.get("attempts"):
        raise PointError(f"the guest made no {workload} attempt (see console.log)")
    if workload == "offline":
        gigantic = _offline_as_failures(gigantic)
    again = gigantic.get("try_again") or {}

    def number(key: str) -> float | None:
        value = gigantic.get(key)  # null for the controls (no backend ranges, no trace)
        return float(value) if value is not None else None

    def count(key: str) -> int | None:
        value = number(key)
        return None if value is None else int(value)

    return {
        "attempts": gigantic["attempts"],
        "failures": gigantic["failures"],
        "failure_rate": number("failure_rate"),
        "requests": gigantic["attempts"],
        "requests_failed": gigantic.get("requests_failed", gigantic["failures"]),
        "attributed": count("attributed"),
        "unattributed": count("unattributed"),
        "isolation_failures": count("isolation_failures"),
        "not_tried": count("not_tried"),
        "held_fraction": number("held_fraction"),
        "model_p_fail": number("held_fraction"),
        "in_flight_fraction": number("in_flight_fraction"),
        "reports": summary.get("guest_reports", 0),
        "target_reports": count("target_reports"),
        "passes": count("passes"),
        "passes_with_failures": count("passes_with_failures"),
        "hold_p50_ms": _guest_hold_p50_ms(summary),
        "retried": again.get("requests_retried"),
        "time_to_success_p50_ms": (again.get("time_to_success_ms") or {}).get("p50"),
        "time_to_success_max_ms": (again.get("time_to_success_ms") or {}).get("max"),
        "op_p50_ms": (gigantic.get("op_ms") or {}).get("p50"),
        "qemu_version": summary.get("qemu_version"),
        "guest_kernel": summary.get("guest_kernel"),
        "accel": summary.get("accel"),
        **backend,
    }


def _guest_hold_p50_ms(summary: dict[str, Any]) -> float | None:
    """The guest's median hold per report (its ftrace durations), ms."""
    holds = summary.get("guest_hold_us", {}).get("samples", [])
    return _median(holds) / 1e3 if holds else None


def _fill_row(summary: dict[str, Any], backend: dict[str, Any]) -> dict[str, Any]:
    """A fill run in a row: the price of reporting. Each round is an
    attempt that cannot fail (a fill that fails ends the guest's run);
    what it measures is the round's allocate-and-touch time
    (docs/experiments.md)."""
    fill = summary.get("fill") or {}
    rounds = fill.get("round_ms") or []
    if len(rounds) < 2:
        raise PointError("the guest timed fewer than two fill rounds (see console.log)")
    later = fill.get("later_ms") or {}
    given = [
        r["given_back_bytes"] for r in summary.get("memfd_freed", []) if "given_back_bytes" in r
    ]
    return {
        "attempts": len(rounds),
        "failures": 0,
        "failure_rate": 0.0,
        "requests": len(rounds),
        "reports": summary.get("guest_reports", 0),
        "hold_p50_ms": _guest_hold_p50_ms(summary),
        "fill_mib": fill.get("size_mib"),
        "fill_first_ms": fill.get("first_ms"),
        "fill_later_p50_ms": later.get("p50"),
        "given_back_mib": _median(given) / (1 << 20) if given else None,
        "qemu_version": summary.get("qemu_version"),
        "guest_kernel": summary.get("guest_kernel"),
        "accel": summary.get("accel"),
        **backend,
    }


def _vmem_as_attempts(vmem: dict[str, Any]) -> dict[str, Any]:
    """A vmem run in a row: each unplug is an attempt, and a "failure" an
    unplug that met a held page (its driver retried, or waited for its
    retry timer); `requests_failed` the unplugs not done when the loop
    ended (docs/experiments.md)."""
    if vmem.get("error"):
        raise PointError(f"the virtio-mem steps failed: {vmem['error']}")
    unplugs = vmem.get("unplugs") or 0
    again = vmem.get("try_again") or {}
    retried = again.get("requests_retried", 0)
    seconds = vmem.get("unplug_seconds") or {}
    return vmem | {
        "attempts": unplugs,
        "failures": retried,
        "failure_rate": round(retried / unplugs, 4) if unplugs else None,
        "requests_failed": vmem.get("unfinished"),
        "not_tried": 0,
        "op_ms": {"p50": seconds["p50"] * 1000} if seconds else None,
    }


def _offline_as_failures(offline: dict[str, Any]) -> dict[str, Any]:
    """An offline does not fail on a busy page, it retries until the range
    is isolated: in a row, its "failures" are the offlines that had to
    retry (the event the study counts), and "requests_failed" those that
    failed outright (docs/experiments.md)."""
    attempts = offline["attempts"]
    retried = offline.get("isolation_failures")
    retried = retried if retried is not None else 0
    return offline | {
        "failures": retried,
        "failure_rate": round(retried / attempts, 4) if attempts else None,
        "requests_failed": offline["failures"],
        "passes_with_failures": offline.get("passes_with_failures"),
    }


def run_stopping_gracefully(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `command`; on a timeout or Ctrl-C ask it to stop (SIGINT, as
    launch expects: it stops QEMU first) and kill it only after STOP_WAIT_S.
    subprocess.run would SIGKILL it at once and orphan its QEMU."""
    process = subprocess.Popen(
        ends_with_us(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def rederive(out: Path, row: dict[str, Any]) -> dict[str, Any]:
    """A finished run's row computed again from its raw output (for
    --report-only after a change in what a row holds); as stored otherwise."""
    directory = out / "points" / str(row.get("dir", ""))
    if row.get("status") != "ok":
        return row
    # The raw files may be cut short or edited: any surprise in them (a list
    # where a dict was, a number as text) keeps the stored row.
    try:
        trace = backend_figures(directory / "backend-trace.jsonl")
        if row["kind"] in REAL_KINDS:
            summary = json.loads((directory / "launch.json").read_text(encoding="utf-8"))
            return check_row(row | qemu_row(summary, trace))
        summary = json.loads((directory / "guest.json").read_text(encoding="utf-8"))
        return check_row(row | mock_row(summary, trace))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, PointError):
        return row


def point_row(point: Point, directory: Path) -> dict[str, Any]:
    """What a row says of its point before anything is measured."""
    return {
        "kind": point.kind,
        "label": point.label,
        "repeat": point.repeat,
        "seed": point.seed,
        "setting_key": point.setting_key,
        "dir": directory.name,
        **{f"set_{key}": value for key, value in point.settings.items()},
    }


def write_result(directory: Path, row: dict[str, Any]) -> None:
    """The point's result.json, written last: its presence is what marks a
    finished point."""
    with contextlib.suppress(OSError):
        (directory / RESULT).write_text(json.dumps(row, indent=1), encoding="utf-8")


def run_point(point: Point, directory: Path) -> dict[str, Any]:
    """Run one point into `directory`; the row (status "ok" or "failed")."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RESULT).unlink(missing_ok=True)
    (directory / "point.json").write_text(
        json.dumps({"kind": point.kind, "settings": point.settings, "seed": point.seed}, indent=1),
        encoding="utf-8",
    )
    started = time.monotonic()
    row = point_row(point, directory) | {"host": socket.gethostname()}
    try:
        real = point.kind in REAL_KINDS
        measured = run_qemu(point, directory) if real else run_mock(point, directory)
        row |= {"status": "ok", **measured}
    except (PointError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as error:
        row |= {"status": "failed", "error": str(error)}
    row["seconds"] = round(time.monotonic() - started, 2)
    write_result(directory, row)
    return row
