"""A trace that cannot be written never stops the device (issue 10, item 3).

The trace is written by its own thread: a full disk, a failing write or a
FIFO whose reader stopped drops records (counted, logged once), and the
event loop, the control socket and the guests go on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningBackend, open_fds
from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.observe import trace as trace_module
from vhost_balloon.backend.observe.control import control_request
from vhost_balloon.backend.observe.trace import TraceWriter, read_trace
from vhost_balloon.backend.server import Server, ServerSettings, listen_unix
from vhost_balloon.guest.runner import MockGuest

PIPE_BYTES = 4096  # the smallest pipe buffer: a few records fill it
WATCHDOG_S = 20.0  # only ever reached by a trace writer that blocks the event loop
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def record(seq: int, entries: int = 32) -> ReportRecord:
    return ReportRecord(
        session="s0",
        queue=2,
        seq=seq,
        head=seq % 64,
        entries=entries,
        bytes=entries << 22,
        ranges=[(index << 22, 1 << 22) for index in range(entries)],
        discard="punch-hole",
        t_kick_ns=10**12,
        t_popped_ns=10**12 + 1,
    )


class ScriptedWrite:
    """os.write, except for the calls the script names: ("short", n) writes
    only n bytes, ("fail", error) raises; then it writes normally."""

    def __init__(self, *script: tuple[str, Any]) -> None:
        self.script = list(script)

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if not self.script:
            return os.write(fd, data)
        action, value = self.script.pop(0)
        if action == "short":
            return os.write(fd, data[:value])
        raise value


def always_full(fd: int, data: bytes | memoryview) -> int:
    raise ENOSPC


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def lines_of(path: Path) -> list[str]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"the trace ends mid-line: {text[-40:]!r}"
    return text.splitlines()


@contextmanager
def stalled_fifo(path: Path) -> Iterator[Callable[[], None]]:
    """A FIFO with a reader that never reads, and a one-page pipe. Yields a
    function that makes the reader leave; a watchdog makes it leave anyway,
    so that a writer blocking the test's own thread fails the test instead
    of hanging it."""
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    lock = threading.Lock()
    open_ = [True]

    def leave() -> None:
        with lock:
            if open_[0]:
                open_[0] = False
                os.close(reader)

    watchdog = threading.Timer(WATCHDOG_S, leave)
    watchdog.start()
    try:
        yield leave
    finally:
        watchdog.cancel()
        leave()


# --- the writer alone --------------------------------------------------------


def test_a_record_serialises_to_the_line_asdict_gives_with_its_kind() -> None:
    one = record(7)
    one.injected_ns["kick"] = 5
    one.errors.append("EINVAL")
    line = {"kind": "report"} | dataclasses.asdict(one)
    assert one.to_json() == json.dumps(line, separators=(",", ":"))


def test_a_full_disk_drops_and_counts_records_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "trace.jsonl"
    writer = TraceWriter(path, write=always_full, retry_after_s=0.0)
    with caplog.at_level(logging.WARNING, logger="vhost_balloon.trace"):
        for seq in range(1, 51):
            writer.write(record(seq))  # never raises
        assert writer.flush()
        counters = writer.counters()
        assert (counters.written, counters.dropped) == (0, 50)
        assert counters.error == "No space left on device"
        (warning,) = warnings_of(caplog)  # one, not one per record
        assert str(path) in warning and "No space left on device" in warning
        writer.close()
    assert warnings_of(caplog)[-1] == (
        f"trace {path}: 50 records dropped (first error: No space left on device)"
    )
    assert lines_of(path) == []


def test_writing_resumes_once_the_disk_has_space_again(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    writer = TraceWriter(path, write=ScriptedWrite(("fail", ENOSPC)), retry_after_s=0.0)
    writer.write(record(1))
    assert writer.flush()
    writer.write(record(2))
    writer.close()
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [2]
    counters = writer.counters()
    assert (counters.written, counters.dropped) == (1, 1)


def test_a_line_cut_short_by_an_error_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"earlier":1}\n')
    writer = TraceWriter(
        path, write=ScriptedWrite(("short", 100), ("fail", ENOSPC)), retry_after_s=0.0
    )
    writer.write(record(1))
    assert writer.flush()
    assert lines_of(path) == ['{"earlier":1}']  # mid-outage: whole lines only
    writer.write(record(2))
    writer.close()
    assert [json.loads(line).get("seq") for line in lines_of(path)] == [None, 2]
    counters = writer.counters()
    assert (counters.written, counters.dropped) == (1, 1)


def test_the_whole_lines_of_a_batch_cut_short_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    first = len(record(1).to_json()) + 1
    fd = trace_module.open_for_append(path)
    lines = trace_module._LineWriter(
        fd, path, ScriptedWrite(("short", first + 100), ("fail", ENOSPC)), 0.0
    )
    lines.put([record(1), record(2)])  # as the writer thread does, here in the test's thread
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [1]
    lines.put([record(3)])
    lines.close()
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [1, 3]
    assert (lines.written, lines.dropped) == (2, 1)


def test_a_fragment_that_cannot_be_removed_is_ended_before_the_next_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EINVAL, "not a regular file")

    monkeypatch.setattr(os, "ftruncate", no_truncate)
    path = tmp_path / "trace.jsonl"
    writer = TraceWriter(
        path, write=ScriptedWrite(("short", 10), ("fail", ENOSPC)), retry_after_s=0.0
    )
    writer.write(record(1))
    assert writer.flush()
    writer.write(record(2))
    writer.close()
    fragment, *rest = lines_of(path)
    assert fragment == record(1).to_json()[:10]
    assert [json.loads(line)["seq"] for line in rest] == [2]


def test_read_trace_waits_for_the_records_enqueued_so_far(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    release = threading.Event()

    def slow_write(fd: int, data: bytes | memoryview) -> int:
        release.wait(WATCHDOG_S)
        return os.write(fd, data)

    writer = TraceWriter(path, write=slow_write)
    for seq in range(1, 101):
        writer.write(record(seq))
    threading.Timer(0.2, release.set).start()
    assert [line["seq"] for line in read_trace(path)] == list(range(1, 101))
    writer.close()


def test_a_fifo_with_no_reader_is_refused_promptly(tmp_path: Path) -> None:
    path = tmp_path / "trace.fifo"
    os.mkfifo(path)
    outcome: list[BaseException | TraceWriter] = []

    def open_it() -> None:
        try:
            outcome.append(TraceWriter(path))
        except OSError as error:
            outcome.append(error)

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(WATCHDOG_S)
    if opener.is_alive():  # a blocking open: let it through, then fail
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        pytest.fail("opening a FIFO with no reader hangs")
    (error,) = outcome
    assert isinstance(error, OSError)
    assert str(error) == f"[Errno {errno.ENXIO}] trace {path} is a FIFO with no reader: refused"


def test_close_gives_up_on_a_fifo_whose_reader_stopped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "trace.fifo"
    before = open_fds()
    with stalled_fifo(path) as leave:
        writer = TraceWriter(path, queue_records=2)
        for seq in range(1, 21):  # each record is larger than the pipe: the writer blocks
            writer.write(record(seq, entries=1024))  # and this returns at once
        with caplog.at_level(logging.WARNING, logger="vhost_balloon.trace"):
            writer.close(timeout=0.2)
        assert writer.counters().as_dict() == {
            "path": str(path),
            "written": 0,
            "dropped": 20,
            "error": trace_module.QUEUE_FULL,
        }
        assert warnings_of(caplog)[-2:] == [
            f"trace {path}: writer still blocked after 0.2s: giving up",
            f"trace {path}: 20 records dropped (first error: {trace_module.QUEUE_FULL})",
        ]
        leave()  # the blocked write fails (EPIPE): the thread closes the fd and ends
        writer._thread.join(WATCHDOG_S)
        assert not writer._thread.is_alive()
    assert open_fds() <= before


# --- the writer in a server, with a mocked guest -----------------------------


@asynccontextmanager
async def serving(
    tmp_path: Path, trace: Path, open_trace: Callable[[Path], TraceWriter] = TraceWriter
) -> AsyncIterator[RunningBackend]:
    settings = ServerSettings(
        trace_path=trace,
        control_socket=tmp_path / "control.sock",
    )
    listener = listen_unix(tmp_path / "backend.sock")
    server = Server(settings, open_trace=open_trace)
    try:
        await server.start_services()
        server.start(listener)
        yield RunningBackend(server, tmp_path / "backend.sock", trace)
    finally:
        await server.close()
        listener.close()


async def stats(tmp_path: Path) -> dict[str, Any]:
    return await asyncio.to_thread(control_request, tmp_path / "control.sock", {"cmd": "stats"})


@pytest.mark.skipif(os.geteuid() != 0, reason="/dev/full is root's: the trace refuses it otherwise")
async def test_a_full_disk_never_breaks_the_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reports = 5
    with caplog.at_level(logging.WARNING):
        async with serving(tmp_path, Path("/dev/full")) as backend:
            async with MockGuest(backend.guest_options(report_timeout=5.0)) as guest:
                summary = guest.summary(await guest.run(reports))
            assert summary["reports"] == reports
            assert backend.server.totals().queue_errors == 0
            reply = await stats(tmp_path)
            metrics = backend.server.render_metrics()
    assert reply["trace"] == {
        "path": "/dev/full",
        "written": 0,
        "dropped": reports,
        "error": "No space left on device",
    }
    dropped = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "vhost_balloon_trace_records_dropped_total"
    ]
    assert dropped == [reports]
    trace_warnings = [w for w in warnings_of(caplog) if w.startswith("trace /dev/full")]
    assert trace_warnings[0].startswith("trace /dev/full: cannot write (No space left on device)")
    assert trace_warnings[1:] == [
        "trace /dev/full: 5 records dropped (first error: No space left on device)"
    ]
    assert not [w for w in warnings_of(caplog) if "broken" in w]


async def test_a_fifo_whose_reader_stopped_never_stalls_the_server(tmp_path: Path) -> None:
    path = tmp_path / "trace.fifo"
    reports = 20
    with stalled_fifo(path) as leave:
        small = functools.partial(TraceWriter, queue_records=2)
        async with serving(tmp_path, path, open_trace=small) as backend:
            async with MockGuest(backend.guest_options()) as guest:
                summary = guest.summary(await guest.run(reports))
                reply = await stats(tmp_path)  # answered while the writer is blocked
            assert summary["reports"] == reports
            assert reply["ok"] and reply["totals"]["reports"] == reports
            assert reply["trace"]["dropped"] > 0
            assert reply["trace"]["error"] == trace_module.QUEUE_FULL
            assert reply["trace"]["written"] + reply["trace"]["dropped"] <= reports
            leave()  # so that closing the server does not wait out the writer
