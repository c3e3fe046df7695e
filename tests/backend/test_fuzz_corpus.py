"""Every input of the fuzz corpus (tests/fuzz/corpus/, the seeds and what
fuzzing found worth keeping, crashes included once fixed) through its
target: a regression test for each. scripts/fuzz.py is the fuzzer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus"
INPUTS = sorted(path for path in CORPUS.glob("*/*") if path.is_file())


def test_every_target_with_state_has_a_corpus() -> None:
    for target in ("session", "balloon", "stats"):
        assert any(path.parent.name == target for path in INPUTS), target


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_corpus_input_runs_clean(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())
