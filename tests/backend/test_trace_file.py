"""The trace file is opened as the backend's own: no symbolic links, no one else's file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import open_fds
from vhost_balloon.backend.observe.trace import TraceWriter, open_for_append


def test_a_new_trace_is_created_and_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text("earlier\n")
    TraceWriter(path).close()
    assert path.read_text() == "earlier\n"  # appended, never truncated
    fresh = tmp_path / "new.jsonl"
    TraceWriter(fresh).close()
    assert fresh.exists()


def test_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    link = tmp_path / "trace.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError, match="is a symbolic link: refused"):
        TraceWriter(link)
    assert target.read_text() == "keep\n"


def test_a_file_someone_else_owns_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    path = tmp_path / "trace.jsonl"
    path.write_text("theirs\n")
    os.chown(path, 65534, 65534)
    before = open_fds()
    with pytest.raises(OSError, match="belongs to uid 65534"):
        TraceWriter(path)
    assert path.read_text() == "theirs\n"
    assert open_fds() <= before  # the refused fd is closed


def test_a_fifo_with_a_reader_is_opened_for_blocking_writes(tmp_path: Path) -> None:
    # Opened with O_NONBLOCK (a FIFO with no reader fails instead of hanging),
    # then blocking again: a full pipe makes the writer thread wait, not fail.
    path = tmp_path / "trace.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fd = open_for_append(path)
        try:
            assert os.get_blocking(fd)
        finally:
            os.close(fd)
    finally:
        os.close(reader)
