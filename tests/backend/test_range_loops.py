"""The offline workload and the gigantic loop's new figures, from hand-made
console lines (qemu-configs/guest-init.sh's formats): the zone of each
memory block, the blocks an offline loop uses, "try again -> works", and an
offline that retried attributed to the report that held its range."""

from __future__ import annotations

from tests.backend.launch_summaries import builtin_summary
from vhost_balloon.backend.qemu.attribution import (
    BackendReport,
    summarize_gigantic,
    zone_ranges_mib,
)
from vhost_balloon.backend.qemu.console import GiganticAttempt, GuestConsole
from vhost_balloon.backend.qemu.retries import op_durations_ms, try_again
from vhost_balloon.backend.qemu.summary_table import format_launch_summary

MiB = 1 << 20


def _attempt(i: int, t: float, end: float | None, ok: bool, retries: int = 0) -> GiganticAttempt:
    return GiganticAttempt(i, t, end, ok, "fail" if retries or not ok else "success", retries)


def test_the_zones_line_gives_each_zone_as_mib_ranges() -> None:
    console = GuestConsole()
    console.feed(
        "VB gigantic_zones block_mib=128 movable_gigantic_pages=absent "
        "DMA32=1,2,3,4,5,6,7 Movable=10,11,12,13,14,15,16,17,18,19,8,9",
        1.0,
    )
    run = console.gigantic
    assert run is not None and not console.errors
    assert run.movable_gigantic_pages == "absent"
    assert run.zone_blocks == {"DMA32": [1, 2, 3, 4, 5, 6, 7], "Movable": list(range(8, 20))}
    assert zone_ranges_mib(run.block_mib, run.zone_blocks) == {
        "DMA32": [[128, 1024]],
        "Movable": [[1024, 2560]],
    }


def test_zone_ranges_merge_only_contiguous_blocks() -> None:
    assert zone_ranges_mib(128, {"Movable": [8, 9, 32, 33, 35]}) == {
        "Movable": [[1024, 1280], [4096, 4352], [4480, 4608]]
    }
    assert zone_ranges_mib(None, {}) is None


def test_a_garbled_zones_line_is_recorded_not_raised() -> None:
    console = GuestConsole()
    console.feed("VB gigantic_zones block_mib=12x Movable=8", 1.0)
    assert console.errors and "unparseable VB line" in console.errors[0]


def test_gigantic_try_again_runs_from_the_first_failure_to_the_success() -> None:
    attempts = [
        _attempt(1, 1.0, 1.1, ok=True),
        _attempt(2, 2.0, 2.1, ok=False),
        _attempt(3, 2.2, 2.3, ok=False),
        _attempt(4, 2.4, 2.5, ok=True),  # 2 retries, 0.5 s after the first failure
        _attempt(5, 3.0, 3.2, ok=False),
        _attempt(6, 3.3, 3.4, ok=True),  # 1 retry, 0.4 s
        _attempt(7, 4.0, 4.1, ok=False),  # the loop ended before a success
    ]
    again = try_again("gigantic", attempts)
    assert again is not None
    assert again["requests_retried"] == 2 and again["never_succeeded"] == 1
    assert again["time_to_success_samples_ms"] == [400.0, 500.0]
    assert again["retries"] == {"p50": 2, "p90": 2, "max": 2}
    assert try_again("gigantic", []) is None


def test_offline_try_again_is_each_offline_that_retried_inside() -> None:
    attempts = [
        _attempt(1, 1.0, 1.002, ok=True),
        _attempt(2, 2.0, 2.101, ok=True, retries=140),
        _attempt(3, 3.0, 3.002, ok=True),
        _attempt(4, 4.0, 4.0005, ok=False),  # refused outright
    ]
    again = try_again("offline", attempts)
    assert again is not None
    assert again["requests_retried"] == 1 and again["never_succeeded"] == 1
    assert again["retries"] == {"p50": 140, "p90": 140, "max": 140}
    assert again["time_to_success_samples_ms"] == [101.0]
    durations = op_durations_ms(attempts)
    assert durations is not None and durations["samples"] == 3 and durations["max"] == 101.0


OFFLINE_LINES = [
    "VB params workload=offline rounds=2 size_mib=300 pause_s=5 settle_s=10 "
    "duration_s=20 keep_mib=16 trace=1",
    "VB gigantic_trace=on event=page_isolation:test_pages_isolated",
    "VB gigantic_zones block_mib=128 movable_gigantic_pages=absent DMA32=1,2 Movable=8,9,19",
    "VB offline_blocks usable=8,9 refused=19",
    "VB gigantic_loop=start t=7.0 settle_s=10 duration_s=20 memfree_kib=2000000 op=offline",
    "VB gigantic_loop=end t=27.0 attempts=3 failures=0",
    "VB gigantic_attempt i=1 t_mono=10.000 t_end_mono=10.002 ok=1 test=success retries=0 block=8",
    "VB gigantic_attempt i=2 t_mono=10.050 t_end_mono=10.152 ok=1 test=fail retries=2 block=9",
    "VB gigantic_attempt i=3 t_mono=10.200 t_end_mono=10.202 ok=1 test=success retries=0 block=8",
    "VB gigantic_event t_mono=10.001 start_pfn=0x40000 end_pfn=0x48000 fin_pfn=0x48000 "
    "ret=success attempt=1",
    "VB gigantic_event t_mono=10.060 start_pfn=0x48000 end_pfn=0x50000 fin_pfn=0x48400 "
    "ret=fail attempt=2",
    "VB gigantic_event t_mono=10.100 start_pfn=0x48000 end_pfn=0x50000 fin_pfn=0x48400 "
    "ret=fail attempt=2",
    "VB gigantic_event t_mono=10.151 start_pfn=0x48000 end_pfn=0x50000 fin_pfn=0x50000 "
    "ret=success attempt=2",
    "VB gigantic attempts=3 failures=0 isolation_failures=2 events=4 "
    "t_start_mono=9.9 t_end_mono=29.9",
]


def test_an_offline_that_retried_is_attributed_to_the_report_holding_its_block() -> None:
    console = GuestConsole()
    for t, line in enumerate(OFFLINE_LINES):
        console.feed(line, float(t))
    assert not console.errors
    run = console.gigantic
    assert run is not None and run.op == "offline"
    assert run.offline_usable == [8, 9] and run.offline_refused == [19]
    assert [a.block for a in run.attempt_list] == [8, 9, 8]
    assert [a.retries for a in run.attempt_list] == [0, 2, 0]
    # One report, 10.05-10.15 s in the guest's clock, holding 4 MiB at
    # pfn 0x48400 (block 9): the offline of block 9 waited for it.
    starts, durations = [10.05], [100_000.0]
    backend = [BackendReport(10.05, ((0x48400 * 4096, 4 * MiB),))]
    g = summarize_gigantic(run, starts, durations, backend)
    assert g["op"] == "offline" and g["failures"] == 0
    assert g["isolation_failures"] == 1 and g["attributed"] == 1 and g["in_window"] == 1
    assert g["offline_blocks"] == {"usable": [8, 9], "refused": [19]}
    assert g["try_again"]["requests_retried"] == 1
    assert g["try_again"]["time_to_success_samples_ms"] == [102.0]
    assert g["zones_mib"]["Movable"] == [[1024, 1280], [2432, 2560]]


def test_the_launch_table_shows_the_offline_rows() -> None:
    console = GuestConsole()
    for t, line in enumerate(OFFLINE_LINES):
        console.feed(line, float(t))
    assert console.gigantic is not None
    g = summarize_gigantic(console.gigantic, [], [], None)
    summary = builtin_summary("offline", offline=g)
    text = format_launch_summary(summary)
    assert "offlines" in text and "(refused: 19)" in text
    assert "try again -> works" in text and "Movable 1024-1280, 2432-2560 MiB" in text


def test_the_launch_table_shows_the_vmem_rows() -> None:
    vmem = {
        "plug_bytes": 256 << 20,
        "unplugs": 2,
        "unfinished": 1,
        "unplug_seconds": {"p50": 50.1, "p90": 50.1, "max": 50.1},
        "waited_for_retry_timer": 2,
        "isolation_tests": 1306,
        "isolation_failures": 1300,
        "attributed": 1300,
        "error": None,
    }
    text = format_launch_summary(builtin_summary("vmem", vmem=vmem))
    assert "virtio-mem unplugs" in text and "2 of 256 MiB (1 unfinished): p50 50.10" in text
    assert "1300 of 1306 (1300 attributed to a report)" in text
    failed = format_launch_summary(builtin_summary("vmem", vmem={"error": "vmem: no QMP"}))
    assert "vmem: no QMP" in failed
