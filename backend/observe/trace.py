"""The per-report trace: ReportRecords appended as JSON lines (invariant 5)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from vhost_balloon.backend.balloon.records import ReportRecord


class TraceWriter:
    """Appends records to a JSONL file; flushed on every record so a reader
    (or a crash) never loses a report that was published."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = path.open("a", encoding="utf-8")

    def write(self, record: ReportRecord) -> None:
        if self._file is None:
            return
        self._file.write(record.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_trace(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
