"""The per-report trace: ReportRecords appended as JSON lines (invariant 5)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import TextIO

from vhost_balloon.backend.balloon.records import ReportRecord


class TraceWriter:
    """Appends records to a JSONL file; flushed on every record so a reader
    (or a crash) never loses a report that was published."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = open_for_append(path)

    def write(self, record: ReportRecord) -> None:
        if self._file is None:
            return
        self._file.write(record.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_for_append(path: Path) -> TextIO:
    """Open (or create, mode 0644) a trace for appending, as the backend's user.

    The backend often runs as root and the docs suggest /tmp: never follow a
    symbolic link (O_NOFOLLOW), and refuse a file someone else owns, so that
    a local user cannot point root's trace at a file of their choosing.
    """
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(error.errno, f"trace {path} is a symbolic link: refused") from None
        raise OSError(error.errno, f"cannot open trace {path}: {error.strerror}") from None
    owner = os.fstat(fd).st_uid
    if owner != os.geteuid():
        os.close(fd)
        raise OSError(
            errno.EPERM, f"trace {path} belongs to uid {owner}, not to this user: refused"
        )
    return os.fdopen(fd, "a", encoding="utf-8")


def read_trace(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
