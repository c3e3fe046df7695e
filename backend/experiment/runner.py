"""`vhost-balloon experiment SPEC.toml`: run every point (skipping finished
ones), then write the tables, the figures and the report.

Layout of the output directory:
    spec.toml             the spec as given
    points/NNN-KIND-rR/   one directory per run: raw traces, logs, result.json
    results.csv/.jsonl    one row per run
    summary.csv           one row per setting: mean and standard error over repeats
    figures/*.png         see backend/experiment/figures.py
    report.md             tables, figures, command, machine, versions, seeds
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from vhost_balloon.backend.experiment.executors import Executor, Job, Serial
from vhost_balloon.backend.experiment.points import (
    RESULT,
    finished_runs,
    own_result,
    point_dir,
    run_point,
)
from vhost_balloon.backend.experiment.progress import SweepProgress
from vhost_balloon.backend.experiment.report import write_report
from vhost_balloon.backend.experiment.rows import RowError, read_rows
from vhost_balloon.backend.experiment.spec import ExperimentSpec, Point, SpecError
from vhost_balloon.backend.experiment.tables import summarise, write_csv, write_jsonl


def prepare_output(spec: ExperimentSpec, out: Path) -> None:
    """Create `out` and keep the spec; refuse a directory that is not an experiment's."""
    if out.exists() and not out.is_dir():
        raise SpecError(f"the output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "spec.toml").exists():
        raise SpecError(f"the output {out} holds files but no spec.toml: not an experiment's")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "spec.toml").write_text(spec.source, encoding="utf-8")


def run_experiment(
    spec: ExperimentSpec,
    out: Path,
    *,
    rerun: bool = False,
    stream: TextIO = sys.stderr,
    run: Callable[[Point, Path], dict[str, Any]] = run_point,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every point, here or on `executor`; returns the rows
    in point order, whatever order the points finished in."""
    prepare_output(spec, out)
    points = spec.points()

    def warn(text: str) -> None:
        stream.write(f"experiment: {text}\n")

    done = {} if rerun else finished_runs(out, warn)
    stored = [done.get((point.setting_key, point.seed)) for point in points]
    rows: dict[int, dict[str, Any]] = {i: row for i, row in enumerate(stored) if row is not None}
    jobs = [Job(i, point) for i, point in enumerate(points) if stored[i] is None]
    labels = {job.index: job.label for job in jobs}
    where = executor if executor is not None else Serial(run)
    with SweepProgress(len(points), len(rows), stream) as progress:
        if jobs and not isinstance(where, Serial):
            progress.note(f"running on {where.description}")
        for finished in where.run(jobs, out, lambda job: progress.running(job.label)):
            row = finished.row
            ok = row.get("status") == "ok"
            error = "" if ok else f"point {finished.index}: {row.get('error')}"
            progress.finished(labels[finished.index], finished.seconds, ok, error)
            rows[finished.index] = row
    ordered = [rows[i] for i in range(len(points)) if i in rows]
    write_results(spec, out, ordered)
    return ordered


def write_results(spec: ExperimentSpec, out: Path, rows: list[dict[str, Any]]) -> None:
    """Tables, figures and the report from the rows (all derived, all rewritten)."""
    write_jsonl(out / "results.jsonl", rows)
    write_csv(out / "results.csv", rows)
    summary = summarise([row for row in rows if row.get("status") == "ok"])
    write_csv(out / "summary.csv", summary)
    # Imported here: matplotlib (and numpy) would add about 40 MiB to every
    # process that builds the command line, `serve` included.
    from vhost_balloon.backend.experiment.figures import draw_all  # noqa: PLC0415

    figures = draw_all(spec, out, rows, summary)
    write_report(spec, out, rows, summary, figures, command=_command_line())


def _command_line() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv else "vhost-balloon", *sys.argv[1:]]
    if argv[0] in ("__main__.py", "-c"):
        argv[0] = "vhost-balloon"
    return " ".join(argv)


def describe_points(spec: ExperimentSpec) -> str:
    points = spec.points()
    lines = [f"{len(points)} points ({spec.repeats} repeats):"]
    lines += [f"  {p.kind:<10} r{p.repeat} seed {p.seed}  {p.label}" for p in points]
    return "\n".join(lines)


def load_rows(out: Path, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """The good rows of out/results.jsonl; each bad line is skipped, told to `warn`."""
    rows, problems = read_rows(out / "results.jsonl")
    for problem in problems:
        warn(f"{problem}: skipped")
    return rows


def report_rows(
    spec: ExperimentSpec, out: Path, warn: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The rows to report on: results.jsonl, or, when it is missing or any of
    its lines is not a row, the rows rebuilt from each point's own result.json
    (the run's record; results.jsonl is derived from them)."""
    rows, problems = read_rows(out / "results.jsonl")
    if not problems:
        return rows
    for problem in problems:
        warn(problem)
    warn(f"the rows are rebuilt from {out / 'points'}/*/{RESULT}")
    rebuilt = []
    for point in spec.points():
        path = point_dir(out, point) / RESULT
        if not path.exists():
            continue
        try:
            rebuilt.append(own_result(path))
        except (OSError, RowError) as error:
            warn(f"{path}: {error}: left out of the report")
    if not rebuilt:
        raise SpecError(f"nothing to report in {out}: no row in results.jsonl or under points/")
    return rebuilt
