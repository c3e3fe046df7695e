"""report.md: the experiment's tables and figures with how they were made."""

from __future__ import annotations

import math
import os
import platform
import socket
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from vhost_balloon.backend.experiment.spec import ExperimentSpec


def machine() -> dict[str, str]:
    """What ran the experiment: host kernel, CPU, cores, memory, Python."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
            if line.startswith("MemTotal:")
        )
        memory = f"{mem_kib / (1 << 20):.1f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "unknown"
    return {
        "host kernel": platform.release(),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "python": platform.python_version(),
    }


def _pct(value: float, error: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{100 * value:.1f} ± {100 * error:.1f}"


def _ms(value: float) -> str:
    """Two decimals, or "-" for what a run could not measure."""
    return "-" if math.isnan(value) else f"{value:.2f}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def summary_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| run | setting | repeats | attempts | failed (%) | time held (%) | injected/report (ms) "
        "| hold p50 (ms) | passes/run | passes with failures | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['kind']} | {e['label']} | {e['repeats']} | {e['total_attempts']} "
            f"| {_pct(e['failure_rate'], e['failure_rate_se'])} "
            f"| {_pct(e['held_fraction'], e['held_fraction_se'])} "
            f"| {_ms(e['injected_ms'])} | {_ms(e['hold_p50_ms'])} | {_ms(e['passes'])} "
            f"| {_count(e['total_passes_with_failures'])} | {e['seeds']} |"
        )
    return "\n".join(lines)


def try_again_table(summary: list[dict[str, Any]]) -> str | None:
    """The review's "fails. Try again -> works" per setting, for the real
    guest's loops (None when no row measured it)."""
    entries = [e for e in summary if not math.isnan(e.get("time_to_success_p50_ms", math.nan))]
    if not entries:
        return None
    lines = [
        "| run | setting | repeats | attempts | retried (mean/run) "
        "| time to success p50 (ms) | attempt p50 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['kind']} | {e['label']} | {e['repeats']} | {e['total_attempts']} "
            f"| {_ms(e['retried'])} | {_ms(e['time_to_success_p50_ms'])} "
            f"| {_ms(e['op_p50_ms'])} |"
        )
    return "\n".join(lines)


# The study's bar for a model that predicts (issue: +-0.05 absolute).
PREDICTION_TOLERANCE = 0.05


def prediction_table(summary: list[dict[str, Any]]) -> str | None:
    """Predicted against measured failure rates, per real-guest setting: the
    free-list model run under the same setting (a `model` row of the same
    label; `within` is its error against PREDICTION_TOLERANCE) and the
    time-held model from the run's own trace (`model_p_fail`). None when no
    real row has a prediction."""
    models = {e["label"]: e for e in summary if e["kind"] == "model"}
    real = [e for e in summary if e["kind"] == "qemu" and not math.isnan(e["failure_rate"])]
    rows = [
        e for e in real if e["label"] in models or not math.isnan(e.get("model_p_fail", math.nan))
    ]
    if not rows:
        return None
    lines = [
        "| setting | measured (%) | free-list model (%) | error | time-held model (%) "
        f"| error | free-list within ±{PREDICTION_TOLERANCE:g} |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in rows:
        measured = e["failure_rate"]
        model = models.get(e["label"], {"failure_rate": math.nan, "failure_rate_se": 0.0})
        free_list = model["failure_rate"]
        held = e.get("model_p_fail", math.nan)
        within = "-" if math.isnan(free_list) else _yes(free_list - measured)
        lines.append(
            f"| {e['label']} | {_pct(measured, e['failure_rate_se'])} "
            f"| {_pct(free_list, model['failure_rate_se'])} | {_signed(free_list - measured)} "
            f"| {_pct(held, e.get('model_p_fail_se', 0.0))} | {_signed(held - measured)} "
            f"| {within} |"
        )
    return "\n".join(lines)


def _yes(error: float) -> str:
    return "yes" if abs(error) <= PREDICTION_TOLERANCE else "no"


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.3f}"


def price_table(summary: list[dict[str, Any]]) -> str | None:
    """The price of reporting per setting: the fill workload's allocate-and-
    touch time, round 1 and the later rounds (which touch memory reporting
    gave back), each run's median and their median against the no-balloon
    control's (None when no row measured it). Medians: one run slowed by
    the host shows in its own column without moving the ratio."""
    entries = [e for e in summary if e.get("fill_later_runs_ms")]
    if not entries:
        return None
    bases = [
        statistics.median(e["fill_later_runs_ms"]) for e in entries if e["kind"] == "no_balloon"
    ]
    lines = [
        "| run | setting | repeats | MiB/round | given back/round (MiB) | round 1 (ms) "
        "| later rounds p50, each run (ms) | median of runs (ms) | against no balloon |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for e in entries:
        runs = e["fill_later_runs_ms"]
        median = statistics.median(runs)
        ratio = f"{median / bases[0]:.3f}x" if bases else "-"
        lines.append(
            f"| {e['kind']} | {e['label']} | {e['repeats']} | {e.get('set_size', '-')} "
            f"| {_ms(e['given_back_mib'])} | {_ms(e['fill_first_ms'])} "
            f"| {' '.join(f'{v:.0f}' for v in runs)} | {median:.0f} | {ratio} |"
        )
    return "\n".join(lines)


def _where_points_ran(rows: list[dict[str, Any]]) -> list[str]:
    """Which hosts (and Dask workers) ran the points, when a row says so;
    the machine facts above are the reporting host's."""
    hosts = Counter(str(row["host"]) for row in rows if row.get("host"))
    workers = {str(row["worker"]) for row in rows if row.get("worker")}
    if not hosts:
        return []
    here = socket.gethostname()
    listed = ", ".join(
        f"{host}{' (this one)' if host == here else ''}: {count}"
        for host, count in sorted(hosts.items())
    )
    lines = [f"- points ran on: {listed}"]
    if workers:
        lines.append(f"- Dask workers: {len(workers)}")
    return lines


def write_report(
    spec: ExperimentSpec,
    out: Path,
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    figures: list[Path],
    *,
    command: str,
) -> Path:
    failed = [row for row in rows if row.get("status") != "ok"]
    versions = sorted(
        {
            f"QEMU {row.get('qemu_version')}, guest kernel {row.get('guest_kernel')}, "
            f"accelerator {row.get('accel')}"
            for row in rows
            if row.get("qemu_version")
        }
    )
    parts = [
        f"# Experiment `{spec.name}`",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{command}`.",
        f"Guest: **{spec.guest}**; {spec.repeats} repeats per setting, seeds "
        f"{spec.seed}..{spec.seed + spec.repeats - 1}.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in machine().items()],
        *[f"- {line}" for line in versions],
        *_where_points_ran(rows),
        "",
        "## Results (mean ± standard error over repeats)",
        "",
        summary_table(summary),
        "",
        "`failed` counts attempts that did not get the range; `time held` is the "
        "fraction of the run during which a report holding part of the target range "
        "was in flight. Failures cluster per reporting pass: `passes with failures` "
        "(summed over the repeats) is the number of independent failure events. "
        "Raw rows: `results.csv`; per-run traces under `points/`.",
        "",
    ]
    again = try_again_table(summary)
    if again is not None:
        parts += [
            "## Try again -> works",
            "",
            again,
            "",
            "`retried`: requests that failed first (gigantic: a run of failed attempts; "
            "offline: an offline that offline_pages() had to retry). `time to success`: "
            "from the first failure to the success, median over the requests of a run, "
            "mean over repeats; the CDF is figures/time_to_success_cdf.png.",
            "",
        ]
    price = price_table(summary)
    if price is not None:
        parts += [
            "## The price of reporting",
            "",
            price,
            "",
            "Each round writes its MiB into a tmpfs file (allocate and touch, timed by "
            "ftrace markers in the guest), frees it, and waits for reporting to hand it "
            "back. Round 1 touches memory the host never backed, in every run; the later "
            "rounds touch what the last round freed: given back to the host (and faulted "
            "in again) only where reporting freed it. Under TCG the absolute times are "
            "not KVM's: compare the ratios.",
            "",
        ]
    if failed:
        parts += ["## Runs that failed", ""]
        parts += [
            f"- `{row.get('dir')}` ({row.get('label')}): {row.get('error')}" for row in failed
        ]
        parts.append("")
    parts += ["## Figures", ""]
    parts += [f"![{path.stem}](figures/{path.name})" for path in figures]
    parts += ["", "## Spec", "", "```toml", spec.source.strip(), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
