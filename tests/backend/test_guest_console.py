"""Parsing the guest's `VB ` console lines, including garbled ones."""

from __future__ import annotations

from backend.guest_console import GuestConsole


def test_a_printk_inside_a_vb_line_is_recorded_not_raised() -> None:
    console = GuestConsole()
    console.feed("VB round=1 filled_mib=12[   5.1] virtio_balloon virtio0: oops", 1.0)
    console.feed("VB report_us=12.5 t_start_mono=3.0 cpu=0", 2.0)
    assert console.errors and "unparseable VB line" in console.errors[0]
    assert len(console.reports) == 1  # later lines are still parsed


def test_lines_that_are_not_vb_lines_are_ignored() -> None:
    console = GuestConsole()
    console.feed("[    1.0] Linux version 6.12", 0.5)
    console.feed("something VB report_us=1", 0.6)
    assert console.vb_lines == 0 and not console.errors
