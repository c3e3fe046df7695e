"""`launch --workload gigantic`: its defaults, the run-guest.sh command line
for each balloon device, and the summary rows (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

from tests.backend.launch_summaries import builtin_summary
from vhost_balloon.backend.qemu.attribution import summarize_gigantic
from vhost_balloon.backend.qemu.command import LaunchOptions, run_guest_command
from vhost_balloon.backend.qemu.console import GiganticAttempt, GiganticRun, IsolationEvent
from vhost_balloon.backend.qemu.summary_table import format_launch_summary


def _command(options: LaunchOptions, socket_path: Path | None) -> list[str]:
    return run_guest_command(options, socket_path)


def _value(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_the_gigantic_workload_defaults_to_2560m_and_its_kernel_parameters() -> None:
    command = _command(LaunchOptions(workload="gigantic", duration_s=12), Path("/tmp/s.sock"))
    assert _value(command, "--workload") == "gigantic"
    assert _value(command, "--duration") == "12"
    assert _value(command, "--mem") == "2560M"
    assert _value(command, "--append") == "nokaslr init_on_alloc=0"
    assert "--settle" not in command  # the guest's own default (20 s)
    assert command[-1] == "/tmp/s.sock"


def test_the_users_mem_append_and_settle_replace_the_workloads_defaults() -> None:
    options = LaunchOptions(workload="gigantic", mem="3G", append="nokaslr", settle_s=5)
    command = _command(options, Path("/tmp/s.sock"))
    assert _value(command, "--mem") == "3G"
    assert _value(command, "--append") == "nokaslr"
    assert _value(command, "--settle") == "5"


def test_the_fill_workload_keeps_its_defaults() -> None:
    command = _command(LaunchOptions(), Path("/tmp/s.sock"))
    assert _value(command, "--workload") == "fill"
    assert _value(command, "--mem") == "512M"
    assert "--append" not in command and "--settle" not in command


def test_each_balloon_device_has_its_own_last_argument() -> None:
    none = LaunchOptions(workload="gigantic", no_balloon=True)
    builtin = LaunchOptions(workload="gigantic", baseline=True)
    assert none.mode == "none" and builtin.mode == "builtin"
    assert LaunchOptions().mode == "vhost-user"
    assert _command(none, None)[-1] == "--no-balloon"
    assert _command(builtin, None)[-1] == "--builtin"
    extra = LaunchOptions(workload="gigantic", no_balloon=True, qemu_args=("-smp", "1"))
    assert _command(extra, None)[-3:] == ["--no-balloon", "-smp", "1"]


def test_the_summary_table_shows_the_gigantic_rows() -> None:
    run = GiganticRun(
        trace="on",
        settle_s=20,
        attempts=2,
        failures=1,
        t_start_mono=10.0,
        t_end_mono=12.0,
        attempt_list=[
            GiganticAttempt(1, 10.0, 10.02, True, "success"),
            GiganticAttempt(2, 11.0, 11.02, False, "fail"),
        ],
        events=[
            IsolationEvent(10.01, 0x40000, 0x80000, 0x80000, True, 1),
            IsolationEvent(11.01, 0x40000, 0x80000, 0x40400, False, 2),
        ],
    )
    gigantic = summarize_gigantic(run, [11.0], [50_000.0], None)
    summary = builtin_summary("gigantic", gigantic=gigantic)
    text = format_launch_summary(summary)
    assert "1 GiB attempts            2 in 2.0 s (after a 20 s settle)" in text
    assert "1 GiB failures            1 (50.0 %)" in text
    assert "isolation test failed   1 (0 attributed to a report, 1 while a report" in text
    assert "failure at 11.010       test fail, first busy pfn 0x40400, report -, pass 0" in text
