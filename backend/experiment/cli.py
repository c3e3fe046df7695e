"""`vhost-balloon experiment SPEC.toml`: the parser and the checks made
before anything starts."""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from vhost_balloon.backend.experiment.executors import DaskCluster, parse_executor
from vhost_balloon.backend.experiment.points import rederive
from vhost_balloon.backend.experiment.runner import (
    describe_points,
    report_rows,
    run_experiment,
    write_results,
)
from vhost_balloon.backend.experiment.spec import ExperimentSpec, SpecError, load_spec
from vhost_balloon.backend.qemu.provisioning import (
    LaunchError,
    check_device,
    ensure_provisioned,
    qemu_version,
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "experiment",
        help="run a sweep from a TOML spec: results, figures, report (docs/experiments.md)",
        description="Run every point of SPEC (mocked guest or real QEMU guest), skipping "
        "points already finished in the output directory, then write results.csv, "
        "summary.csv, figures/*.png and report.md.",
    )
    parser.add_argument("spec", type=Path, metavar="SPEC.toml")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="output directory (default results/NAME)"
    )
    parser.add_argument("--rerun", action="store_true", help="run finished points again")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the spec, list the points, run nothing"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--jobs",
        type=_jobs,
        metavar="N",
        help="run N points at once on a local Dask cluster of N workers",
    )
    where.add_argument(
        "--executor",
        type=_executor,
        metavar="dask://HOST:PORT",
        help="run the points on the Dask scheduler at HOST:PORT (docs/experiments.md)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="redraw tables, figures and report.md from results.jsonl without running",
    )


def _jobs(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, not {value}")
    return value


def _executor(text: str) -> str:
    try:
        return parse_executor(text)
    except SpecError as error:
        raise argparse.ArgumentTypeError(
            str(error).removeprefix(f"--executor {text!r}: ")
        ) from None


def check_runnable(spec: ExperimentSpec) -> None:
    """Everything a real-guest sweep needs, before the first point starts."""
    if spec.guest != "qemu":
        return
    if os.geteuid() != 0:
        raise SpecError("a real-guest sweep needs root (QEMU's shared memory, provisioning)")
    if shutil.which("bash") is None:
        raise SpecError("a real-guest sweep needs bash (qemu-configs/run-guest.sh)")
    try:
        env = ensure_provisioned(lambda text: print(f"experiment: {text}", file=sys.stderr))
        qemu = env.get("QEMU", "")
        check_device(qemu, qemu_version(qemu))
    except LaunchError as error:
        raise SpecError(f"QEMU is not usable for a real-guest sweep: {error}") from None


def _run(spec: ExperimentSpec, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Here, or on a Dask cluster whose every worker passed the same checks."""
    if args.jobs is None and args.executor is None:
        check_runnable(spec)
        return run_experiment(spec, out, rerun=args.rerun)
    with DaskCluster(address=args.executor, jobs=args.jobs) as cluster:
        cluster.check_each_worker(functools.partial(check_runnable, spec))
        return run_experiment(spec, out, rerun=args.rerun, executor=cluster)


def _warn(text: str) -> None:
    print(f"experiment: {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
    except SpecError as error:
        print(f"vhost-balloon experiment: {args.spec}: {error}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else Path("results") / spec.name
    if args.dry_run:
        print(describe_points(spec))
        return 0
    try:
        if args.report_only:
            stored = out / "spec.toml"  # the spec these rows were run with
            ran = load_spec(stored) if stored.is_file() else spec
            rows = [rederive(out, row) for row in report_rows(ran, out, _warn)]
            write_results(ran, out, rows)
            print(f"experiment: report in {out / 'report.md'}", file=sys.stderr)
            return 0
        # SIGTERM arrives as KeyboardInterrupt too (backend/cli/main.py installs it).
        rows = _run(spec, out, args)
    except SpecError as error:
        print(f"vhost-balloon experiment: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "vhost-balloon experiment: interrupted; finished points are kept, "
            "the same command resumes",
            file=sys.stderr,
        )
        return 130
    failed = sum(1 for row in rows if row.get("status") != "ok")
    print(
        f"experiment: {len(rows) - failed}/{len(rows)} points ok; report in {out / 'report.md'}",
        file=sys.stderr,
    )
    return 1 if failed else 0
