"""Copy each experiment's summary table into a document, between markers:

    <!-- results:mock-delay -->
    ...replaced by the table of docs/results/mock-delay/results.jsonl...
    <!-- /results:mock-delay -->

    python -m vhost_balloon.backend.experiment.splice docs/results.md

so the tables in docs/results.md are regenerated with the figures
(scripts/results.sh runs the experiments, then this).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from vhost_balloon.backend.experiment.report import (
    prediction_table,
    price_table,
    summary_table,
    try_again_table,
)
from vhost_balloon.backend.experiment.runner import load_rows
from vhost_balloon.backend.experiment.tables import summarise

# <!-- results:NAME --> the summary table; <!-- try-again:NAME --> its
# "try again -> works" table; <!-- price:NAME --> its price of reporting;
# <!-- model:NAME --> its predicted against measured failure rates.
_BLOCK = re.compile(
    r"(<!-- (results|try-again|price|model):([\w.-]+) -->\n).*?(<!-- /\2:\3 -->)", re.DOTALL
)
_TABLES = {
    "results": summary_table,
    "try-again": try_again_table,
    "price": price_table,
    "model": prediction_table,
}


def _warn(text: str) -> None:
    print(f"splice: {text}", file=sys.stderr)


def splice(document: Path, results: Path) -> int:
    """Replace every marked block; returns how many were replaced."""
    text = document.read_text(encoding="utf-8")
    count = 0

    def table(match: re.Match[str]) -> str:
        nonlocal count
        rows = [row for row in load_rows(results / match[3], _warn) if row["status"] == "ok"]
        count += 1
        summary = summarise(rows)
        table = _TABLES[match[2]](summary)
        return f"{match[1]}{table or '(not measured)'}\n{match[4]}"

    document.write_text(_BLOCK.sub(table, text), encoding="utf-8")
    return count


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: python -m vhost_balloon.backend.experiment.splice DOCUMENT.md", file=sys.stderr
        )
        return 2
    document = Path(args[0])
    try:
        count = splice(document, document.parent / document.stem)
    except OSError as error:
        print(f"splice: {error}", file=sys.stderr)
        return 1
    print(f"splice: {count} table(s) updated in {document}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
