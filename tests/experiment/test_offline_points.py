"""A real-guest sweep of the offline workload: the spec's workload and
movable keys, the launch command they become, the row of an offline run
(its "failures" are the offlines that retried), the "try again -> works"
table and its splice, and setting keys that stay as they were for
gigantic sweeps run before the keys existed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vhost_balloon.backend.experiment.points import qemu_command, qemu_row
from vhost_balloon.backend.experiment.report import try_again_table
from vhost_balloon.backend.experiment.spec import SpecError, parse_spec
from vhost_balloon.backend.experiment.splice import splice
from vhost_balloon.backend.experiment.tables import summarise, write_jsonl

SPEC = (
    "[experiment]\nname = 'off'\nguest = 'qemu'\nrepeats = 1\nseed = 3\n"
    "[settings]\nworkload = 'offline'\nmovable = '{movable}'\nduration = '30s'\n"
    "[sweep]\ndelay = ['none', 'report=const:100ms']\n"
)


def test_an_offline_point_becomes_a_launch_of_the_offline_workload(tmp_path: Path) -> None:
    points = parse_spec(SPEC.format(movable="1G")).points()
    command = " ".join(qemu_command(points[0], tmp_path))
    assert "--workload offline" in command and "--movable 1G" in command
    assert "--append" not in command  # launch's own default for offline
    default = parse_spec(SPEC.format(movable="none")).points()
    assert "--movable" not in qemu_command(default[0], tmp_path)


@pytest.mark.parametrize("movable", ["1.5G", "0", "150%", "-1G", "lots"])
def test_a_bad_movable_is_refused_naming_it(movable: str) -> None:
    with pytest.raises(SpecError, match="movable"):
        parse_spec(SPEC.format(movable=movable))


def test_a_bad_workload_is_refused() -> None:
    with pytest.raises(SpecError, match="workload"):
        parse_spec(SPEC.format(movable="none").replace("'offline'", "'balloon'"))


def test_gigantic_keys_stay_as_they_were_before_workload_and_movable() -> None:
    spec = parse_spec(SPEC.format(movable="none").replace("'offline'", "'gigantic'"))
    key = spec.points()[0].setting_key
    assert "workload=" not in key and "movable=" not in key
    offline = parse_spec(SPEC.format(movable="1G")).points()[0].setting_key
    assert "workload=offline" in offline and "movable=1G" in offline


def _launch_summary(retried: int, time_ms: float) -> dict[str, Any]:
    return {
        "workload": "offline",
        "guest_reports": 20,
        "guest_hold_us": {"samples": [100_000.0]},
        "offline": {
            "attempts": 5000,
            "failures": 0,
            "isolation_failures": retried,
            "attributed": retried,
            "unattributed": 0,
            "not_tried": 0,
            "held_fraction": 0.0,
            "in_flight_fraction": 0.1,
            "passes": 10,
            "passes_with_failures": 8,
            "op_ms": {"p50": 2.0, "p90": 2.4, "max": time_ms, "samples": 5000},
            "try_again": {
                "requests_retried": retried,
                "never_succeeded": 0,
                "retries": {"p50": 140, "p90": 143, "max": 145},
                "time_to_success_ms": {"p50": time_ms, "p90": time_ms, "max": time_ms},
                "time_to_success_samples_ms": [time_ms] * retried,
            },
        },
    }


def test_an_offline_row_counts_the_offlines_that_retried_as_its_failures() -> None:
    row = qemu_row(_launch_summary(19, 102.0), {})
    assert row["failures"] == 19 and row["failure_rate"] == round(19 / 5000, 4)
    assert row["requests_failed"] == 0  # none failed outright
    assert row["retried"] == 19 and row["attributed"] == 19
    assert row["time_to_success_p50_ms"] == 102.0 and row["op_p50_ms"] == 2.0


def _row(label: str, seed: int, retried: int, time_ms: float) -> dict[str, Any]:
    return {
        "kind": "qemu",
        "label": label,
        "repeat": 0,
        "seed": seed,
        "setting_key": f"qemu delay={label}",
        "dir": f"qemu-{label}",
        "status": "ok",
        **qemu_row(_launch_summary(retried, time_ms), {}),
    }


def test_the_try_again_table_and_its_splice(tmp_path: Path) -> None:
    rows = [_row("none", 1, 0, 2.0), _row("100ms", 1, 19, 102.0), _row("100ms", 2, 21, 104.0)]
    for row in rows[:1]:
        row["time_to_success_p50_ms"] = None  # nothing retried: not measured
    table = try_again_table(summarise(rows))
    assert table is not None
    assert "| qemu | 100ms | 2 | 10000 | 20.00 | 103.00 | 2.00 |" in table
    assert "| none |" not in table
    assert try_again_table(summarise(rows[:1])) is None

    results = tmp_path / "doc"
    (results / "off").mkdir(parents=True)
    write_jsonl(results / "off" / "results.jsonl", rows)
    document = tmp_path / "doc.md"
    document.write_text(
        "a\n<!-- try-again:off -->\nold\n<!-- /try-again:off -->\n"
        "<!-- results:off -->\nold\n<!-- /results:off -->\n",
        encoding="utf-8",
    )
    assert splice(document, results) == 2
    text = document.read_text(encoding="utf-8")
    assert "| qemu | 100ms | 2 | 10000 | 20.00 | 103.00 | 2.00 |" in text
    assert "time held (%)" in text and "\nold\n" not in text
    json.dumps(rows)  # rows stay plain JSON
