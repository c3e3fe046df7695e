"""A launch's progress: the step its workload is at, from the console's VB
lines, and plain lines (no escape codes) when not on a terminal."""

from __future__ import annotations

import io

from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.progress import LaunchProgress, workload_steps


def fed(*lines: tuple[str, float]) -> GuestConsole:
    guest = GuestConsole()
    for line, t in lines:
        guest.feed(line, t)
    return guest


def test_fill_counts_rounds_done() -> None:
    guest = fed(("VB init t=1.0 kernel=6.12", 1.0))
    assert workload_steps("fill", 3, guest, 2.0) == (0, 3, "booting")
    guest.feed("VB params workload=fill rounds=3 size_mib=64 pause_s=1", 3.0)
    assert workload_steps("fill", 3, guest, 3.0) == (0, 3, "round 1/3")
    guest.feed("VB round=1 paused t=9.0 memfree_kib=1", 9.0)
    assert workload_steps("fill", 3, guest, 9.0) == (1, 3, "round 2/3")


def test_gigantic_counts_seconds_of_its_loop() -> None:
    guest = fed(("VB params workload=gigantic duration_s=30", 1.0))
    assert workload_steps("gigantic", 2, guest, 2.0) == (0, None, "settling")
    guest.feed("VB gigantic_loop=start t=5.0 settle_s=20 duration_s=30 memfree_kib=1", 10.0)
    assert workload_steps("gigantic", 2, guest, 22.0) == (12.0, 30.0, "loop 12/30 s")
    guest.feed("VB gigantic_loop=end t=40.0 attempts=9 failures=1", 41.0)
    assert workload_steps("gigantic", 2, guest, 41.0) == (30.0, 30.0, "loop done")


def test_pattern_counts_its_rounds() -> None:
    guest = fed(("VB params workload=pattern", 1.0))
    guest.feed("VB pattern_round=1 freed_mib=64 checked_mib=64 corrupted_pages=0 t=2.0", 5.0)
    assert workload_steps("pattern", 2, guest, 5.0) == (1, 2, "round 2/2")


def test_a_log_gets_one_plain_line_per_round_with_an_eta() -> None:
    log = io.StringIO()
    progress = LaunchProgress("fill", 3, log, io.StringIO())
    assert not progress.live
    guest = GuestConsole()
    with progress:
        for line, t in (
            ("VB params workload=fill rounds=3", 10.0),
            ("VB round=1 fill_start t=1", 10.0),
            ("VB round=1 paused t=2", 20.0),
            ("VB round=2 paused t=3", 30.0),
        ):
            guest.feed(line, t)
            progress.update(guest, t)
    lines = log.getvalue().splitlines()
    assert lines == [
        "launch: 1 of 3 rounds done, elapsed 0m10s, ETA 0m20s",
        "launch: 2 of 3 rounds done, elapsed 0m20s, ETA 0m10s",
    ]
    assert "\x1b" not in log.getvalue()


def test_on_terminals_the_console_goes_above_a_live_bar() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = LaunchProgress("fill", 2, screen, Terminal())
    assert progress.live
    guest = GuestConsole()
    with progress:
        progress.console_line("[    1.000] VB params workload=fill [s1]\n")
        guest.feed("VB params workload=fill", 1.0)
        progress.update(guest, 1.0)
    assert "VB params workload=fill [s1]" in screen.getvalue()  # text, not markup
    assert "\x1b[" in screen.getvalue()
