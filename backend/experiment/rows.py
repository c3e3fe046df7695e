"""Result rows as read back from disk (a point's result.json, a line of
results.jsonl): checked field by field, so a file edited by hand, cut short
or from another version is "not a row" with a reason, never a crash later
in the resume, the summary or the figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KINDS = ("mock", "model", "qemu", "no_balloon", "builtin")
STATUSES = ("ok", "failed")
MAX_ROW_BYTES = 16 << 20  # a row is a few KiB; a bigger file is not one

# Measured counts (int >= 0, or null when a run could not measure them).
COUNTS = (
    "retried",
    "attempts",
    "failures",
    "requests",
    "requests_failed",
    "attributed",
    "unattributed",
    "isolation_failures",
    "not_tried",
    "reports",
    "target_reports",
    "passes",
    "passes_with_failures",
    "backend_reports",
    "freed_bytes",
)
# Measured figures (a number, or null).
FIGURES = (
    "time_to_success_p50_ms",
    "time_to_success_max_ms",
    "op_p50_ms",
    "failure_rate",
    "held_fraction",
    "model_p_fail",
    "in_flight_fraction",
    "hold_p50_ms",
    "injected_ms",
    "kick_to_notify_p50_ms",
    "seconds",
    "fill_mib",
    "fill_first_ms",
    "fill_later_p50_ms",
    "given_back_mib",
)
TEXTS = ("error", "qemu_version", "guest_kernel", "accel", "host", "worker")


class RowError(ValueError):
    """Not a usable row; the message says which field and why."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _require(row: dict[str, Any], key: str, kind: type, accepted: tuple[object, ...] = ()) -> None:
    if key not in row:
        raise RowError(f"no {key!r}")
    value = row[key]
    typed = isinstance(value, kind) and not isinstance(value, bool)
    if not typed or (accepted and value not in accepted):
        raise RowError(f"{key!r} is {value!r}")


def check_row(data: object) -> dict[str, Any]:
    """`data` as a row, or RowError naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise RowError(f"not a JSON object but {type(data).__name__}")
    row: dict[str, Any] = data
    _require(row, "kind", str, KINDS)
    _require(row, "status", str, STATUSES)
    for key in ("label", "setting_key"):
        _require(row, key, str)
    if not isinstance(row.get("dir", ""), str):
        raise RowError(f"'dir' is {row['dir']!r}")
    for key in ("repeat", "seed"):
        _require(row, key, int)
    if row["repeat"] < 0:
        raise RowError(f"'repeat' is {row['repeat']!r}")
    if not row["setting_key"].startswith(row["kind"] + " "):
        raise RowError(f"'setting_key' is not a {row['kind']} point's")
    _check_measured(row)
    if row["status"] == "ok":
        for key in ("attempts", "failures"):
            _require(row, key, int)
    return row


def _check_measured(row: dict[str, Any]) -> None:
    for key in COUNTS:
        value = row.get(key)
        if value is not None and not (_is_int(value) and value >= 0):
            raise RowError(f"{key!r} is {value!r}, not a count")
    for key in FIGURES:
        value = row.get(key)
        if value is not None and not _is_number(value):
            raise RowError(f"{key!r} is {value!r}, not a number")
    for key in TEXTS:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise RowError(f"{key!r} is {value!r}, not text")


def parse_row(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as error:  # JSONDecodeError, and a bad surrogate or number
        raise RowError(f"not JSON ({error})") from None
    return check_row(data)


def read_result(path: Path) -> dict[str, Any]:
    """A point's result.json as a row; RowError (or OSError) says why not."""
    with path.open("rb") as handle:
        data = handle.read(MAX_ROW_BYTES + 1)
    if len(data) > MAX_ROW_BYTES:
        raise RowError(f"larger than {MAX_ROW_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RowError("not UTF-8 text") from None
    return parse_row(text)


def read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The good rows of a results.jsonl and, per bad line, "PATH:LINE: why"."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(parse_row(line))
                except RowError as error:
                    problems.append(f"{path}:{number}: {error}")
    except OSError as error:
        problems.append(f"{path}: {error.strerror or error}")
    return rows, problems
