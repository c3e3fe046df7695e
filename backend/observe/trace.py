"""The per-chain trace: ReportRecords, and the BalloonRecords of inflate and
deflate chains, appended as JSON lines (invariant 5); each line's "kind"
says which ("report", "inflate", "deflate").

Recording must never stop the device. A queue's thread only enqueues a
record (put_nowait), after the report's notify; one writer thread
serialises records and writes whole lines with os.write. When the queue is
full (a slow disk, a FIFO whose reader stopped) the record is dropped and
counted. A write error (ENOSPC, EIO, EPIPE, EFBIG...) is logged once;
records are dropped and counted from then on, and writing is tried again
on the first batch RETRY_AFTER_S after the last failure, so a disk that
gets space back (or a FIFO that gets a new reader) resumes. A line cut
short by an error is truncated away (regular files); where that is
impossible (pipes, devices) a newline is written first on resume, so every
later record starts a line of its own.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from vhost_balloon.backend.balloon.records import TraceRecord

LOG = logging.getLogger("vhost_balloon.trace")

QUEUE_RECORDS = 4096  # about 6 MiB of 32-range records waiting at most
BATCH_RECORDS = 256  # records joined into one write
RETRY_AFTER_S = 1.0
CLOSE_TIMEOUT_S = 2.0
READ_WAIT_S = 10.0  # read_trace's wait for a writer of this process
QUEUE_FULL = "queue full (the trace is written slower than reports arrive)"

WriteFn = Callable[[int, bytes | memoryview], int]  # os.write's shape; tests inject faults

_LIVE: list[TraceWriter] = []  # open writers, so that read_trace can wait for them


@dataclass(frozen=True, slots=True)
class TraceCounters:
    path: str
    written: int
    dropped: int
    error: str | None  # the first reason a record was dropped

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "written": self.written,
            "dropped": self.dropped,
            "error": self.error,
        }


class TraceWriter:
    """A record hook that never blocks and never raises: records go through a
    bounded queue to a writer thread, which owns the file descriptor."""

    def __init__(
        self,
        path: Path,
        *,
        queue_records: int = QUEUE_RECORDS,
        retry_after_s: float = RETRY_AFTER_S,
        write: WriteFn = os.write,
    ) -> None:
        self.path = path
        fd = open_for_append(path)
        self._identity = _identity(os.fstat(fd))
        self._lines = _LineWriter(fd, path, write, retry_after_s)
        self._queue: queue.Queue[TraceRecord | None] = queue.Queue(queue_records)
        # The enqueueing side, under _enqueue: every queue thread of every session writes.
        self._enqueue = threading.Lock()
        self._accepted = 0
        self._refused = 0  # queue full, or after close
        self._refused_at: float | None = None  # monotonic time of the first refusal
        self._handled = 0  # writer side, under _progress
        self._progress = threading.Condition()
        self._abandoned = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)
        self._thread.start()
        _LIVE.append(self)

    def write(self, record: TraceRecord) -> None:
        """Enqueue one record (the record is not changed after publish, so
        the writer thread may serialise it later)."""
        with self._enqueue:
            if self._closed:
                self._refused += 1
                return
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                self._refused += 1
                if self._refused_at is not None:
                    return
                self._refused_at = time.monotonic()
            else:
                self._accepted += 1
                return
        LOG.warning(
            "trace %s: %s, %d records waiting: dropping and counting records",
            self.path,
            QUEUE_FULL,
            self._queue.maxsize,
        )

    def flush(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Wait until every record enqueued so far is written (or dropped);
        False if the writer is still busy after `timeout` seconds."""
        target = self._accepted
        with self._progress:
            return self._progress.wait_for(lambda: self._handled >= target, timeout)

    def counters(self) -> TraceCounters:
        dropped = self._refused + self._lines.dropped
        if self._abandoned.is_set():  # close gave up on what was still queued
            dropped += self._accepted - self._handled
        return TraceCounters(str(self.path), self._lines.written, dropped, self._first_error())

    def _first_error(self) -> str | None:
        """The earlier of the first write error and the first full queue."""
        errors: list[tuple[float, str]] = []
        if (failed := self._lines.first_error) is not None:
            errors.append(failed)
        if self._refused_at is not None:
            errors.append((self._refused_at, QUEUE_FULL))
        return min(errors)[1] if errors else None

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Drain the queue for at most `timeout` seconds, then stop the writer.
        A writer still blocked (a FIFO reader that stopped reading) is left to
        close the fd itself when its write returns: closing it here could let
        that write land in whatever file reuses the fd number."""
        with self._enqueue:  # no record is queued behind the close marker
            if self._closed:
                return
            self._closed = True
        if self in _LIVE:
            _LIVE.remove(self)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):  # the writer is stuck: joined below, in vain
            self._queue.put(None, timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandoned.set()
            LOG.warning("trace %s: writer still blocked after %gs: giving up", self.path, timeout)
        counters = self.counters()
        if counters.dropped:
            LOG.warning(
                "trace %s: %d records dropped (first error: %s)",
                self.path,
                counters.dropped,
                counters.error,
            )

    def _run(self) -> None:
        try:
            while not self._abandoned.is_set():
                batch, stop = self._next_batch()
                self._lines.put(batch)
                with self._progress:
                    self._handled += len(batch)
                    self._progress.notify_all()
                if stop:
                    break
        finally:
            self._lines.close()

    def _next_batch(self) -> tuple[list[TraceRecord], bool]:
        """Block for one record, then take what else is queued; True once the
        close marker (None) was taken."""
        batch: list[TraceRecord] = []
        item = self._queue.get()
        while item is not None:
            batch.append(item)
            if len(batch) >= BATCH_RECORDS:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True


class _LineWriter:
    """The writer thread's side: whole lines to the fd, errors counted."""

    def __init__(self, fd: int, path: Path, write: WriteFn, retry_after_s: float) -> None:
        self._fd = fd
        self._path = path
        self._write = write
        self._retry_after_s = retry_after_s
        self.written = 0
        self.dropped = 0
        self.first_error: tuple[float, str] | None = None  # (monotonic time, reason)
        self._failed_at: float | None = None  # monotonic time of the last failure
        self._mid_line = False  # the output ends in a fragment that could not be removed

    def put(self, records: Sequence[TraceRecord]) -> None:
        if self._failed_at is not None and (
            time.monotonic() - self._failed_at < self._retry_after_s
        ):
            self.dropped += len(records)
            return
        lines = self._serialise(records)
        if lines:
            self._write_lines(lines)

    def close(self) -> None:
        os.close(self._fd)

    def _serialise(self, records: Sequence[TraceRecord]) -> list[bytes]:
        lines = []
        for record in records:
            try:
                lines.append(record.to_json().encode() + b"\n")
            except (TypeError, ValueError, RuntimeError) as error:  # a bug; never kill the thread
                self.dropped += 1
                self._note_error(f"record {record.seq} not serialisable: {error}")
        return lines

    def _write_lines(self, lines: list[bytes]) -> None:
        prefix = b"\n" if self._mid_line else b""
        data = prefix + b"".join(lines)
        ends = _line_ends(len(prefix), lines)
        done = 0
        try:
            while done < len(data):
                done += self._write_some(memoryview(data)[done:])
        except OSError as error:
            self._cut(done, len(prefix), ends)
            self.written += bisect.bisect_right(ends, done)
            self.dropped += len(lines) - bisect.bisect_right(ends, done)
            self._failed(error)
            return
        self._mid_line = False
        self.written += len(lines)
        if self._failed_at is not None:
            LOG.info(
                "trace %s: writing again (%d records dropped so far)", self._path, self.dropped
            )
            self._failed_at = None

    def _write_some(self, data: memoryview) -> int:
        written = self._write(self._fd, data)
        if written <= 0:  # would loop forever
            raise OSError(errno.EIO, f"write returned {written}")
        return written

    def _cut(self, done: int, prefix: int, ends: list[int]) -> None:
        """After an error `done` bytes in: remove the fragment of a line."""
        if done < prefix:
            return  # the pending newline itself did not land: still mid-line
        complete = bisect.bisect_right(ends, done)
        start = ends[complete - 1] if complete else prefix
        fragment = done - start
        self._mid_line = False
        if fragment:
            try:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - fragment)
            except OSError:  # a pipe or a device: end the fragment on resume
                self._mid_line = True

    def _failed(self, error: OSError) -> None:
        reason = error.strerror or str(error)
        if self._note_error(reason):
            LOG.warning(
                "trace %s: cannot write (%s): dropping and counting records, retrying every %gs",
                self._path,
                reason,
                self._retry_after_s,
            )
        elif self._failed_at is None:  # it had resumed: no warning per flap
            LOG.info("trace %s: cannot write again (%s)", self._path, reason)
        self._failed_at = time.monotonic()

    def _note_error(self, reason: str) -> bool:
        """Keep the first reason; True if this was it."""
        if self.first_error is not None:
            return False
        self.first_error = (time.monotonic(), reason)  # one assignment: read by the loop
        return True


def _line_ends(start: int, lines: list[bytes]) -> list[int]:
    ends = []
    for line in lines:
        start += len(line)
        ends.append(start)
    return ends


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def open_for_append(path: Path) -> int:
    """Open (or create, mode 0644) a trace for appending, as the backend's user;
    the fd is blocking once open.

    The backend often runs as root and the docs suggest /tmp: never follow a
    symbolic link (O_NOFOLLOW), and refuse a file someone else owns, so that
    a local user cannot point root's trace at a file of their choosing.
    O_NONBLOCK makes a FIFO with no reader fail (ENXIO) instead of hanging.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(error.errno, f"trace {path} is a symbolic link: refused") from None
        if error.errno == errno.ENXIO:
            raise OSError(error.errno, f"trace {path} is a FIFO with no reader: refused") from None
        raise OSError(error.errno, f"cannot open trace {path}: {error.strerror}") from None
    try:
        _check_owner(fd, path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except OSError:
        os.close(fd)
        raise
    return fd


def _check_owner(fd: int, path: Path) -> None:
    owner = os.fstat(fd).st_uid
    if owner != os.geteuid():
        raise OSError(
            errno.EPERM, f"trace {path} belongs to uid {owner}, not to this user: refused"
        )


def read_trace(path: Path, kinds: Collection[str] = ("report",)) -> list[dict[str, object]]:
    """The records of `kinds` in the trace at `path` (reports by default; a
    line without a kind, from an older trace, is a report), including those a
    writer of this process has enqueued but not yet written (it is waited for)."""
    with path.open(encoding="utf-8") as handle:
        identity = _identity(os.fstat(handle.fileno()))
        for writer in list(_LIVE):
            if writer._identity == identity:
                writer.flush(READ_WAIT_S)
        records = [json.loads(line) for line in handle if line.strip()]
    return [record for record in records if record.get("kind", "report") in kinds]


__all__ = ["TraceCounters", "TraceWriter", "open_for_append", "read_trace"]
