"""Per-report trace records, appended as JSON lines (invariant 5).

Every timestamp is time.monotonic_ns(), the same clock in every process on
the host, so records can be matched against the guest's and QEMU's views.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass(slots=True)
class ReportRecord:
    session: str
    queue: int
    seq: int
    head: int
    entries: int
    bytes: int
    ranges: list[tuple[int, int]]
    discard: str
    t_kick_ns: int
    t_popped_ns: int
    t_start_ns: int = 0  # this report's turn began (after a kick delay or earlier reports)
    t_discard_start_ns: int = 0
    t_discard_done_ns: int = 0
    t_published_ns: int = 0
    t_notified_ns: int = 0  # 0 when no notification was sent
    discard_syscall_ns: int = 0
    discarded_entries: int = 0
    freed_bytes: int = 0
    skipped_outside: int = 0
    skipped_unaligned: int = 0
    poison_ack: bool = False
    injected_ns: dict[str, int] = field(default_factory=dict)  # measured, per point
    bql_wait_ns: dict[str, int] = field(default_factory=dict)  # per BQL phase
    settings: dict[str, Any] = field(default_factory=dict)  # LatencySettings in force
    errors: list[str] = field(default_factory=list)

    @property
    def kick_to_notify_ns(self) -> int:
        end = self.t_notified_ns or self.t_published_ns
        return end - self.t_kick_ns

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


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
