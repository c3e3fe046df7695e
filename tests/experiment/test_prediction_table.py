"""Predicted against measured: each real-guest setting's failure rate
beside the free-list model's under the same setting and the time-held
model's from its own trace, each error in absolute terms, checked
against the study's +-0.05; and the splice that puts it in a document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vhost_balloon.backend.experiment.report import prediction_table
from vhost_balloon.backend.experiment.splice import splice
from vhost_balloon.backend.experiment.tables import summarise, write_jsonl


def _row(kind: str, label: str, rate: float, held: float | None, seed: int = 1) -> dict[str, Any]:
    return {
        "kind": kind,
        "label": label,
        "setting_key": f"{kind} {label}",
        "status": "ok",
        "seed": seed,
        "repeat": seed - 1,
        "attempts": 1000,
        "failures": round(rate * 1000),
        "failure_rate": rate,
        "model_p_fail": held,
    }


def test_each_real_setting_is_paired_with_its_model_and_checked() -> None:
    rows = [
        _row("qemu", "delay=none", 0.0, 0.003),
        _row("model", "delay=none", 0.003, 0.001),
        _row("qemu", "delay=400ms", 0.09, 0.066),
        _row("qemu", "delay=400ms", 0.11, 0.070, seed=2),
        _row("model", "delay=400ms", 0.17, 0.11),  # 0.07 off: outside the bar
        _row("no_balloon", "base", 0.0, None),
    ]
    table = prediction_table(summarise(rows))
    assert table is not None
    lines = table.splitlines()
    assert "within ±0.05" in lines[0] and len(lines) == 4  # header, rule, two qemu settings
    none, slow = lines[2:]
    assert none.startswith("| delay=none | 0.0 ± 0.0 | 0.3 ± 0.0 | +0.003 | 0.3 ± 0.0 | +0.003 |")
    assert none.endswith("| yes |")
    assert "| 10.0 ± 1.0 | 17.0 ± 0.0 | +0.070 |" in slow and slow.endswith("| no |")
    assert "| 6.8 ± 0.2 | -0.032 |" in slow  # the time-held model, from the run's own trace


def test_a_workload_without_a_free_list_model_shows_the_time_held_one_only() -> None:
    table = prediction_table(summarise([_row("qemu", "delay=20ms", 0.004, 0.004)]))
    assert table is not None and table.splitlines()[2].endswith(
        "| - | - | 0.4 ± 0.0 | +0.000 | - |"
    )
    assert prediction_table(summarise([_row("qemu", "delay=20ms", 0.004, None)])) is None
    assert prediction_table(summarise([_row("builtin", "base", 0.0, 0.0)])) is None


def test_the_splice_fills_a_model_marker(tmp_path: Path) -> None:
    results = tmp_path / "results" / "real"
    results.mkdir(parents=True)
    write_jsonl(results / "results.jsonl", [_row("qemu", "delay=none", 0.0, 0.003)])
    document = tmp_path / "results.md"
    document.write_text("<!-- model:real -->\nold\n<!-- /model:real -->\n", encoding="utf-8")
    assert splice(document, tmp_path / "results") == 1
    text = document.read_text(encoding="utf-8")
    assert "old" not in text and "| delay=none | 0.0 ± 0.0 |" in text
