"""docs/results.md's tables come from the experiments' results, between markers."""

from __future__ import annotations

import json
from pathlib import Path

from vhost_balloon.backend.experiment.splice import main, splice


def _row(seed: int, failures: int) -> dict[str, object]:
    return {
        "kind": "mock",
        "label": "delay=report=const:5ms",
        "setting_key": "mock delay=report=const:5ms",
        "repeat": seed,
        "seed": seed,
        "status": "ok",
        "attempts": 100,
        "failures": failures,
        "failure_rate": failures / 100,
        "held_fraction": 0.1,
        "injected_ms": 5.0,
        "hold_p50_ms": 6.0,
        "passes": 10,
        "passes_with_failures": 0,
    }


def test_marked_blocks_are_replaced_and_the_rest_is_kept(tmp_path: Path) -> None:
    results = tmp_path / "results" / "study"
    results.mkdir(parents=True)
    rows = [_row(1, 10), _row(2, 30), {"status": "failed", "seed": 3}]
    (results / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    document = tmp_path / "results.md"
    document.write_text(
        "# Results\nintro stays\n<!-- results:study -->\nold table\n<!-- /results:study -->\nend\n"
    )
    assert splice(document, tmp_path / "results") == 1
    text = document.read_text()
    assert text.startswith("# Results\nintro stays\n<!-- results:study -->\n| run |")
    assert "old table" not in text
    # Mean 20 %, standard error 10 % over the two successful repeats; 200 attempts.
    assert "| mock | delay=report=const:5ms | 2 | 200 | 20.0 ± 10.0 |" in text
    assert "| 10.00 | 0 | 1 2 |" in text  # passes per run, passes with failures, seeds
    assert text.endswith("<!-- /results:study -->\nend\n")


def test_a_missing_document_is_one_line_and_status_1(tmp_path: Path) -> None:
    assert main([str(tmp_path / "absent.md")]) == 1
    assert main([]) == 2
