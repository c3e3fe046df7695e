"""Parsing the guest's `VB ` console lines, including garbled ones."""

from __future__ import annotations

from vhost_balloon.backend.qemu.command import LaunchOptions
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.notes import RunGuestNotes
from vhost_balloon.backend.qemu.summary import launch_failure, pattern_summary


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


def test_the_gigantic_workloads_lines() -> None:
    console = GuestConsole()
    for t, line in enumerate(
        [
            "VB params workload=gigantic rounds=2 size_mib=300 pause_s=5 settle_s=20 "
            "duration_s=30 keep_mib=16 trace=1",
            "VB balloon=none t=3.29",
            "VB gigantic_trace=on event=page_isolation:test_pages_isolated",
            "VB gigantic_loop=start t=7.77 settle_s=20 duration_s=30 memfree_kib=2481140",
            "VB gigantic_loop=end t=37.82 attempts=2 failures=1",
            "VB gigantic_attempt i=1 t_mono=7.805690 t_end_mono=7.834576 ok=1 test=success",
            "VB gigantic_attempt i=2 t_mono=7.845064 t_end_mono=none ok=0 test=fail",
            "VB gigantic_event t_mono=7.827412 start_pfn=0x40000 end_pfn=0x80000 "
            "fin_pfn=0x80000 ret=success attempt=1",
            "VB gigantic_event t_mono=7.86 start_pfn=0x40000 end_pfn=0x80000 "
            "fin_pfn=0x40a00 ret=fail attempt=2",
            "VB gigantic attempts=2 failures=1 isolation_failures=1 events=2 "
            "t_start_mono=7.804695 t_end_mono=37.822870",
        ]
    ):
        console.feed(line, float(t))
    assert not console.errors
    assert console.workload == "gigantic" and console.balloon_absent
    run = console.gigantic
    assert run is not None
    assert run.trace == "on" and run.settle_s == 20 and run.duration_s == 30
    assert run.t_loop_start == 3.0 and run.t_loop_end == 4.0
    assert (run.attempts, run.failures, run.isolation_failures, run.events_count) == (2, 1, 1, 2)
    assert (run.t_start_mono, run.t_end_mono) == (7.804695, 37.82287)
    first, second = run.attempt_list
    assert first.ok and first.test == "success" and first.t_end_mono == 7.834576
    assert not second.ok and second.test == "fail" and second.t_end_mono is None
    success, failure = run.events
    assert success.ok and success.fin_pfn == success.end_pfn == 0x80000
    assert not failure.ok and failure.fin_pfn == 0x40A00 and failure.start_pfn == 0x40000
    assert failure.attempt == 2


def test_the_fill_workload_has_no_gigantic_run() -> None:
    console = GuestConsole()
    console.feed("VB params workload=fill rounds=2 size_mib=300", 0.0)
    console.feed("VB round=1 filled_mib=300 t=5.0 memfree_kib=1", 1.0)
    assert console.workload == "fill" and console.gigantic is None
    assert console.rounds[1].size_mib == 300


PATTERN_LINES = [
    "VB params workload=pattern rounds=2 size_mib=8 pause_s=3 settle_s=0 "
    "duration_s=20 keep_mib=16 trace=1",
    "VB pattern_round=1 freed_mib=4 checked_mib=4 corrupted_pages=0 t=9.1 memfree_kib=400000",
    "VB pattern_bad file=3 round=1 pages=2",
    "VB pattern_round=2 freed_mib=4 checked_mib=4 corrupted_pages=2 t=14.2 memfree_kib=400000",
    "VB pattern rounds=2 files=8 checked_mib=16 corrupted_pages=2",
    "VB done t=20.0",
]


def _pattern_verdict(console: GuestConsole) -> str | None:
    return launch_failure(
        LaunchOptions(workload="pattern"),
        interrupted=False,
        returncode=0,
        notes=RunGuestNotes(),
        guest=console,
        server=None,
        records=[],
    )


def test_the_pattern_workloads_lines_and_its_verdict() -> None:
    console = GuestConsole()
    for t, line in enumerate(PATTERN_LINES):
        console.feed(line, float(t))
    assert not console.errors and console.pattern is not None
    summary = pattern_summary(console)
    assert summary is not None and summary["complete"]
    assert (summary["rounds"], summary["checked_mib"], summary["corrupted_pages"]) == (2, 16, 2)
    assert [r["round"] for r in summary["round_list"]] == [1, 2]
    assert summary["bad_files"] == [{"file": 3, "round": 1, "pages": 2}]
    failure = _pattern_verdict(console)
    assert failure == "the guest found 2 corrupted pages in its patterns (of 16 MiB checked)"


def test_a_pattern_run_without_its_totals_fails_and_a_clean_one_passes() -> None:
    cut = GuestConsole()
    for t, line in enumerate(PATTERN_LINES[:2] + PATTERN_LINES[-1:]):
        cut.feed(line, float(t))
    clean = GuestConsole()
    for t, line in enumerate(
        [
            *PATTERN_LINES[:2],
            "VB pattern rounds=1 files=8 checked_mib=12 corrupted_pages=0",
            "VB done t=9.0",
        ]
    ):
        clean.feed(line, float(t))
    verdicts = [_pattern_verdict(console) for console in (cut, clean)]
    assert verdicts == ["the guest finished without its pattern totals", None]
