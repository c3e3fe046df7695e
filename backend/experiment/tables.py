"""Result rows to CSV/JSONL, and the per-setting summary over repeats."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

# Mean and standard error over repeats for these columns.
AVERAGED = (
    "failure_rate",
    "held_fraction",
    "model_p_fail",
    "injected_ms",
    "hold_p50_ms",
    "kick_to_notify_p50_ms",
    "attempts",
    "failures",
    "reports",
    "passes",
    "retried",
    "time_to_success_p50_ms",
    "op_p50_ms",
    "fill_first_ms",
    "fill_later_p50_ms",
    "given_back_mib",
)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return value


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 with one value)."""
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting (kind + settings), in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["setting_key"], []).append(row)
    summary = []
    for group in groups.values():
        first = group[0]
        entry: dict[str, Any] = {
            "kind": first["kind"],
            "label": first["label"],
            "setting_key": first["setting_key"],
            "repeats": len(group),
            "seeds": " ".join(str(row["seed"]) for row in group),
        }
        entry |= {k: v for k, v in first.items() if k.startswith("set_")}
        for column in AVERAGED:
            mean, error = mean_and_error(_numbers(group, column))
            entry[column] = mean
            entry[f"{column}_se"] = error
        attempts = sum(_counts(group, "attempts"))
        failures = sum(_counts(group, "failures"))
        entry["pooled_failure_rate"] = failures / attempts if attempts else math.nan
        entry["total_attempts"] = attempts
        entry["total_failures"] = failures
        entry["total_attributed"] = sum(_counts(group, "attributed"))
        counted = _counts(group, "passes_with_failures")
        entry["total_passes_with_failures"] = sum(counted) if counted else None
        # The price of reporting quotes every run: one slow run shows as such.
        entry["fill_later_runs_ms"] = _numbers(group, "fill_later_p50_ms")
        summary.append(entry)
    return summary


def _numbers(rows: list[dict[str, Any]], column: str) -> list[float]:
    """The column's numbers; what is missing, null or not a number is left out
    (rows read back are checked, but a summary must not fail on one that is not)."""
    values = (row.get(column) for row in rows)
    return [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]


def _counts(rows: list[dict[str, Any]], column: str) -> list[int]:
    return [int(v) for v in _numbers(rows, column) if math.isfinite(v)]
