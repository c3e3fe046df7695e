"""Issue 10, item 11 and its low item: every value the mocked guest's
command line takes is bounded, so nothing overflows once it runs
(`--memory 99999999999999999999T` was an OverflowError traceback from
ftruncate, in guest.log and through `demo`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vhost_balloon.guest import cli
from vhost_balloon.guest.contig import ContigConfig
from vhost_balloon.guest.errors import ConfigError
from vhost_balloon.guest.model_guest import ChurnConfig, ModelConfig
from vhost_balloon.guest.ram import GuestRam, split_sizes
from vhost_balloon.protocol.units import (
    MAX_GUEST_MEMORY,
    MAX_SIZE,
    format_size,
    parse_guest_memory,
    parse_size,
)

HUGE = "99999999999999999999T"


def test_sizes_stop_at_max_size() -> None:
    assert parse_size("1024T") == MAX_SIZE
    for text in ("1025T", HUGE, "9" * 5000):
        with pytest.raises(ValueError, match="is larger than 1024T"):
            parse_size(text)
    assert parse_size("0" * 30 + "1G") == 1 << 30  # leading zeros are not digits of size


def test_guest_memory_is_above_zero_and_at_most_one_tib() -> None:
    assert parse_guest_memory("1T") == MAX_GUEST_MEMORY
    for text in ("0", "1025G", HUGE):
        with pytest.raises(ValueError):
            parse_guest_memory(text)
    assert format_size(MAX_GUEST_MEMORY) == "1T"
    assert format_size(3 << 19) == "1536K"


def test_guest_ram_refuses_memory_beyond_the_limit() -> None:
    with pytest.raises(ConfigError, match="not between 1 byte and 1T"):
        split_sizes(MAX_GUEST_MEMORY + (4 << 20), 1)
    with pytest.raises(ConfigError, match="not between 1 byte and 1T"):
        GuestRam(10**20)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--memory", HUGE], "argument --memory: '99999999999999999999T' is larger than 1024T"),
        (["--memory", "2T"], "argument --memory: guest memory '2T' is not between"),
        (["--model", "--duration", "inf"], "argument --duration: inf is above the limit"),
        (["--model", "--duration", "99999999999"], "argument --duration"),
        (["--model", "--attempt-rate", "1e300"], "argument --attempt-rate"),
        (["--model", "--backoff", "1e400"], "argument --backoff"),
        (["--model", "--churn", "0,1e-9,0"], "churn size must be a multiple of 2 MiB"),
        (["--model", "--churn", "64M,1e-9,1"], "churn every 1e-09 s is outside"),
        (["--model", "--churn", "64M,1,0"], "churn hold 0 s is outside"),
        (["--reports", "99999999999"], "argument --reports"),
        (["--pause-ms", "inf"], "argument --pause-ms"),
        (["--report-timeout", "inf"], "argument --report-timeout"),
        (["--linger", "inf"], "argument --linger"),
        (["--deflate-on-oom"], "--deflate-on-oom needs --balloon"),
    ],
)
def test_an_unbounded_value_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], reason: str
) -> None:
    status = cli.main(["--socket-path", str(tmp_path / "none.sock"), *argv])
    err = capsys.readouterr().err
    assert status == cli.EXIT_USAGE
    assert err.startswith("guest: error: ")
    assert reason in err
    assert err.count("\n") == 1


def test_the_model_refuses_degenerate_times() -> None:
    with pytest.raises(ConfigError, match="churn every"):
        ChurnConfig(64 << 20, 1e-9, 1.0).validate()
    with pytest.raises(ConfigError, match="churn hold"):
        ChurnConfig(64 << 20, 1.0, 0.0).validate()
    with pytest.raises(ConfigError, match="duration"):
        ModelConfig(duration_s=1e11).validate()
    with pytest.raises(ValueError, match="retries 99999999999 is above"):
        ContigConfig(retries=99_999_999_999).validate()
    ChurnConfig(64 << 20, 0.001, 86_400.0).validate()


@pytest.mark.parametrize(
    "command",
    [
        ["demo", "--guest", "mock", "--memory", HUGE],
        ["demo", "--guest", "mock", "--memory", "2T"],
        ["guest", "--socket-path", "/nonexistent/s.sock", "--memory", HUGE],
    ],
)
def test_the_backend_commands_refuse_the_memory_before_starting(command: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "vhost_balloon.backend", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "OverflowError" not in run.stderr
    assert run.stderr.splitlines()[-1].startswith(
        f"vhost-balloon {command[0]}: error: argument --memory: "
    )
