"""The sweep's progress: a live bar with ETA on a terminal, plain lines in a log."""

from __future__ import annotations

import io

from vhost_balloon.backend.experiment.progress import SweepProgress
from vhost_balloon.backend.observe.progress_bar import clock


def run_three(stream: io.StringIO, already: int = 0) -> None:
    with SweepProgress(3 + already, already, stream) as progress:
        for number in range(3):
            progress.running(f"real delay=5ms r{number}")
            progress.finished(f"real delay=5ms r{number}", 2.0, ok=number != 1, error="boom")


def test_a_log_gets_one_plain_line_per_point() -> None:
    log = io.StringIO()  # not a terminal, as in CI
    run_three(log)
    lines = log.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("point 1/3 real delay=5ms r0: ok (2.0 s)")
    assert "FAILED: boom" in lines[1]
    assert lines[0].endswith("ETA 0m04s")  # two more points of 2 s each
    assert lines[2].endswith("ETA 0m00s")
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_a_resumed_sweep_counts_only_what_it_runs() -> None:
    log = io.StringIO()
    run_three(log, already=5)
    lines = log.getvalue().splitlines()
    assert lines[0] == "5 of 8 points already done: resuming"
    assert lines[1].startswith("point 6/8 ")
    assert lines[1].endswith("ETA 0m04s")  # the 5 done take no time


def test_a_terminal_gets_a_live_bar() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    run_three(screen)
    text = screen.getvalue()
    assert "\x1b[" in text  # redrawn in place
    assert "3/3" in text and "ETA" in text
    assert "point 3/3 real delay=5ms r2: ok" in text


def test_clock() -> None:
    assert clock(0) == "0m00s" and clock(61.4) == "1m01s" and clock(3600) == "60m00s"


def test_labels_and_errors_are_text_not_markup() -> None:
    log = io.StringIO()
    with SweepProgress(1, 0, log) as progress:
        progress.finished("real [s1] r0", 1.0, ok=False, error="[/tmp/x] queue 0 broken")
    assert "real [s1] r0: FAILED: [/tmp/x] queue 0 broken" in log.getvalue()


def test_points_running_at_once_are_all_shown_and_shorten_the_eta() -> None:
    log = io.StringIO()
    with SweepProgress(6, 0, log) as progress:
        progress.running("mock a r0")
        progress.running("mock b r0")
        assert progress._bar.tasks[0].description == "running 2: mock a r0, mock b r0"
        progress.finished("mock b r0", 4.0, ok=True)
        assert progress._bar.tasks[0].description == "running mock a r0"
        progress.finished("mock a r0", 4.0, ok=True)
        assert progress._bar.tasks[0].description == "sweep"
    lines = log.getvalue().splitlines()
    assert lines[0].endswith("ETA 0m10s")  # 5 left x 4 s / 2 at once
    assert lines[1].endswith("ETA 0m08s")
