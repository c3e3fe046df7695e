"""Issue 10, items 2, 7, 8 and the ctl low items: latency settings that cannot
run are refused when given, and a `set` over the control socket answers in time.

Memory is injected (never the host's); slow parses are simulated with an
event the test releases, never with sleeps or big files.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vhost_balloon.backend.cli import ctl
from vhost_balloon.backend.cli.options import UsageError, add_latency_options
from vhost_balloon.backend.experiment.spec import LATENCY_KEYS
from vhost_balloon.backend.latency import contention, request
from vhost_balloon.backend.latency.contention import (
    MAX_BQL_UTILISATION,
    BqlSpec,
    ContentionMemoryError,
    ContentionSpecError,
    MmapContention,
    memory_available,
    parse_bql,
    parse_mmap_contention,
)
from vhost_balloon.backend.latency.delays import (
    MAX_REPLAY_BYTES,
    DelayModel,
    DelaySpecError,
    parse_delay,
)
from vhost_balloon.backend.latency.in_force import (
    SET_BUDGET_S,
    STOP_TIMEOUT_S,
    LatencyInForce,
    LatencyStartError,
)
from vhost_balloon.backend.latency.injection import LatencySettings, Point
from vhost_balloon.backend.observe.control import (
    CONTROL_TIMEOUT_S,
    ControlError,
    close_control,
    control_request,
    serve_control,
)

GiB = 1 << 30


def fixed(size: int) -> Callable[[], int]:
    return lambda: size


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def mmap_threads() -> int:
    return sum(t.name.startswith("mmap-contention-") for t in threading.enumerate())


@pytest.fixture
async def runtime() -> AsyncIterator[LatencyInForce]:
    latency = LatencyInForce(available_memory=fixed(64 * GiB))
    await latency.start()
    yield latency
    await latency.close()


# ------------------------------------------------- item 2: host memory


def test_mmap_contention_over_half_the_available_memory_is_refused() -> None:
    with pytest.raises(ContentionMemoryError) as refused:
        parse_mmap_contention("64,size=1G", available=fixed(24 * GiB))
    message = str(refused.value)
    assert "'64,size=1G'" in message
    assert "64 threads x 1.0G = 64.0G" in message
    assert "over 12.0G (50% of the 24.0G MemAvailable)" in message
    assert isinstance(refused.value, ValueError)  # argparse, specs and ctl show it as is


def test_mmap_contention_up_to_half_the_available_memory_is_accepted() -> None:
    assert parse_mmap_contention("12,size=1G", available=fixed(24 * GiB)).total == 12 * GiB
    with pytest.raises(ContentionMemoryError):
        parse_mmap_contention("12,size=1G", available=fixed(24 * GiB - 2))


def test_memory_available_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   1000 kB\n")
    assert memory_available(meminfo) == 1000 << 10
    meminfo.write_text("MemTotal:       32000000 kB\n")
    with pytest.raises(ContentionMemoryError, match=f"MemAvailable from {meminfo}"):
        memory_available(meminfo)
    with pytest.raises(ContentionMemoryError, match="No such file"):
        memory_available(tmp_path / "absent")


def test_the_cli_flag_checks_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contention, "memory_available", fixed(4 * GiB))
    parser = argparse.ArgumentParser()
    add_latency_options(parser)
    assert parser.parse_args(["--mmap-contention", "2,size=1G"]).mmap_contention.threads == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--mmap-contention", "3,size=1G"])


def test_the_experiment_spec_key_checks_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contention, "memory_available", fixed(4 * GiB))
    check, _default = LATENCY_KEYS["mmap_contention"]
    assert check("2,size=1G") == "2,size=1G"
    with pytest.raises(ValueError, match="MemAvailable"):
        check("3,size=1G")


async def test_a_set_over_the_memory_is_refused_and_changes_nothing(
    runtime: LatencyInForce,
) -> None:
    small = LatencyInForce(available_memory=fixed(1 * GiB))
    try:
        with pytest.raises(ValueError, match="MemAvailable"):
            await small.update({"mmap_contention": "4,size=256M"})
        assert small.settings.version == 0 and small.settings.mmap is None
        assert small.describe()["mmap_state"] == "off"
    finally:
        await small.close()


async def test_memory_is_checked_again_when_contention_starts() -> None:
    # Parsed while 8 GiB were free; by the time it starts only 1 GiB is.
    spec = parse_mmap_contention("4,size=1G", available=fixed(8 * GiB))
    latency = LatencyInForce(LatencySettings(mmap=spec), available_memory=fixed(1 * GiB))
    try:
        with pytest.raises(LatencyStartError, match=r"cannot start: .*4 threads x 1\.0G"):
            await latency.start()
        assert isinstance(LatencyStartError("x"), OSError)  # `serve` exits 2 with the line
        assert mmap_threads() == 0
    finally:
        await latency.close()


async def test_memory_is_checked_again_when_a_set_is_applied() -> None:
    calls = 0

    def shrinking() -> int:  # enough while parsing, not when applying
        nonlocal calls
        calls += 1
        return 8 * GiB if calls == 1 else 1 * GiB

    latency = LatencyInForce(available_memory=shrinking)
    try:
        with pytest.raises(ValueError, match="MemAvailable"):
            await latency.update({"mmap_contention": "4,size=1G"})
        assert calls == 2
        assert latency.settings.mmap is None and mmap_threads() == 0
    finally:
        await latency.close()


async def test_running_mmap_contention_counts_as_available_for_its_replacement() -> None:
    # 2 x 8M runs; 36M available now; replacing it with 3 x 8M frees the 16M.
    latency = LatencyInForce(available_memory=fixed(36 << 20))
    try:
        await latency.update({"mmap_contention": "2,size=8M"})
        await latency.update({"mmap_contention": "3,size=8M"})
        assert latency.settings.mmap is not None and latency.settings.mmap.threads == 3
    finally:
        await latency.close()
    assert mmap_threads() == 0


# ------------------------------------------------- item 7: replay files


def test_a_replay_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    line = b"1ms\n"
    path.write_bytes(line * (MAX_REPLAY_BYTES // len(line)))
    assert parse_delay(f"replay:{path}").kind == "replay"  # exactly the cap: fine
    with path.open("ab") as more:
        more.write(b"\n")
    with pytest.raises(DelaySpecError, match="is over 1 MiB"):
        parse_delay(f"replay:{path}")


def test_durations_keep_exact_half_to_even_rounding() -> None:
    # The integer arithmetic that replaced Fraction must round as it did.
    assert parse_delay("const:1.1ms").mean_ns() == 1_100_000
    assert parse_delay("const:0.5ns").mean_ns() == 0
    assert parse_delay("const:1.5ns").mean_ns() == 2
    assert parse_delay("const:2.5ns").mean_ns() == 2
    assert parse_delay("const:.25us").mean_ns() == 250
    assert parse_delay("const:3.ms").mean_ns() == 3_000_000


def test_a_duration_with_thousands_of_digits_gets_a_clear_error() -> None:
    with pytest.raises(DelaySpecError, match="has over 64 digits"):
        parse_delay("const:" + "9" * 5000 + "s")


class BlockedParse:
    """Makes parse_delay wait until released: a parse as slow as the test wants."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        real = parse_delay

        def blocked(spec: str, *, allow_relative: bool = True) -> DelayModel:
            self.started.set()
            self.release.wait(10)
            return real(spec, allow_relative=allow_relative)

        monkeypatch.setattr(request, "parse_delay", blocked)


@pytest.fixture
def blocked_parse(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockedParse]:
    blocked = BlockedParse(monkeypatch)
    yield blocked
    blocked.release.set()


async def test_parsing_holds_neither_the_loop_nor_the_settings_lock(
    runtime: LatencyInForce, blocked_parse: BlockedParse
) -> None:
    parsing = asyncio.create_task(runtime.update({"delay": {"kick": "const:1ms"}}))
    assert await asyncio.to_thread(blocked_parse.started.wait, 5)
    # The loop runs and a change that needs the lock goes through meanwhile.
    applied = await asyncio.wait_for(runtime.apply(runtime.settings.changed(seed=9)), 5)
    assert applied.seed == 9 and not parsing.done()
    blocked_parse.release.set()
    merged = await asyncio.wait_for(parsing, 5)
    assert merged.seed == 9 and Point.KICK in merged.delays  # merged onto the newer snapshot


async def test_a_set_that_cannot_be_parsed_in_its_budget_is_refused_unapplied(
    blocked_parse: BlockedParse,
) -> None:
    latency = LatencyInForce(available_memory=fixed(GiB), set_budget_s=0.2)
    try:
        with pytest.raises(ValueError, match=r"set not applied, nothing changed: parsing it"):
            await latency.update({"delay": {"kick": "const:1ms"}})
        blocked_parse.release.set()
        # The late parse's result is dropped: the next change sees no kick delay.
        after = await latency.update({"seed": 2})
        assert after.seed == 2 and after.delays == {} and after.version == 1
    finally:
        await latency.close()


async def test_a_set_queued_behind_other_changes_past_its_budget_is_refused() -> None:
    latency = LatencyInForce(available_memory=fixed(GiB), set_budget_s=0.2)
    try:
        async with latency._changing:  # a change in progress that does not end in time
            with pytest.raises(ValueError, match="waiting for the changes before it"):
                await latency.update({"seed": 5})
        assert latency.settings.version == 0
        assert (await latency.update({"seed": 6})).seed == 6  # the lock was not left taken
    finally:
        await latency.close()


async def test_a_cancelled_set_never_leaves_the_settings_lock_taken() -> None:
    latency = LatencyInForce(available_memory=fixed(GiB))
    try:
        async with latency._changing:
            waiting = asyncio.create_task(latency.update({"seed": 5}))
            await asyncio.sleep(0.05)  # it reaches the lock wait (no harm if it has not)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert (await asyncio.wait_for(latency.update({"seed": 6}), 5)).seed == 6
    finally:
        await latency.close()


def test_the_server_answers_a_set_before_ctl_gives_up() -> None:
    # Parse and queue within the budget, then at most two stops of contention.
    assert SET_BUDGET_S + 2 * STOP_TIMEOUT_S < CONTROL_TIMEOUT_S


async def test_ctl_says_a_timed_out_set_may_still_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "slow.sock"

    async def never(request_: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(30)
        return {}

    server = await serve_control(path, never)
    monkeypatch.setattr(ctl, "CONTROL_TIMEOUT_S", 0.2)
    try:
        for command, note in (("set", True), ("get", False)):
            args = ctl_args(path, command)
            with pytest.raises(UsageError, match=r"within 0\.2 s") as caught:
                await asyncio.to_thread(ctl.run, args)
            assert ("may still apply it: check with `ctl get`" in str(caught.value)) is note
    finally:
        await close_control(server, path)


def ctl_args(path: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ctl.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["ctl", "--control-socket", str(path), *argv])


def test_ctl_makes_relative_replay_paths_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ctl_args(
        tmp_path / "c.sock",
        "set",
        "--delay",
        "kick=replay:d.txt",
        "--delay",
        "publish=const:1ms",
        "--bql",
        "replay:in@dir/h.txt@100,threads=2",
    )
    sent = ctl.control_request_of(args)
    assert sent["delay"] == {"kick": f"replay:{tmp_path}/d.txt", "publish": "const:1ms"}
    assert sent["bql"] == f"replay:{tmp_path}/in@dir/h.txt@100,threads=2"
    absolute = ctl_args(tmp_path / "c.sock", "set", "--delay", "kick=replay:/abs/d.txt")
    assert ctl.control_request_of(absolute)["delay"] == {"kick": "replay:/abs/d.txt"}


def test_the_backend_refuses_relative_replay_paths_from_the_socket(tmp_path: Path) -> None:
    latency = LatencyInForce(available_memory=fixed(GiB))
    for body in (
        {"delay": {"kick": "replay:d.txt"}},
        {"bql": "replay:d.txt@10"},
    ):
        with pytest.raises(ValueError, match=r"'d\.txt' is a relative path"):
            latency.updated(body)
    path = tmp_path / "d.txt"
    path.write_text("1ms\n")
    assert Point.KICK in latency.updated({"delay": {"kick": f"replay:{path}"}}).delays


# ------------------------------------------------- item 8: BQL bounds


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("const:60s@1000,threads=64", "held 6e+04 of the time"),
        ("const:9.1ms@100", "held 0.91 of the time"),
        ("exp:10ms@100,threads=4", "held 1 of the time"),
        ("const:1ms@1e-300", "rate '1e-300' is out of range"),
        ("const:0ns@1e6", "rate '1e6' is out of range"),
    ],
)
def test_bql_settings_the_lock_cannot_serve_are_refused(spec: str, named: str) -> None:
    with pytest.raises(ContentionSpecError, match="--bql") as refused:
        parse_bql(spec)
    assert named in str(refused.value)


def test_bql_settings_at_the_bounds_are_accepted() -> None:
    assert parse_bql("const:9ms@100").utilisation == pytest.approx(MAX_BQL_UTILISATION)
    assert parse_bql("const:1ms@1.2e-5").rate == pytest.approx(1.2e-5)  # about one a day
    assert parse_bql("const:0ns@100000").utilisation == 0


async def test_a_dead_bql_model_shows_as_failed(runtime: LatencyInForce) -> None:
    # Beyond what parse_bql accepts (the 1e-300/s): the gap overflows.
    spec = BqlSpec(hold=parse_delay("const:1ms"), rate=1e-300, threads=2, spec="const:1ms@1e-300")
    await runtime.apply(LatencySettings(bql=spec))
    assert wait_for(lambda: runtime.describe()["bql_state"] == "failed")
    described = runtime.describe()
    assert "OverflowError" in described["bql_error"]
    assert wait_for(lambda: not any(t.name.startswith("bql-") for t in threading.enumerate()))
    await runtime.update({"bql": "none"})  # and it can be replaced as usual
    assert runtime.describe()["bql_state"] == "off"


async def test_a_dead_mmap_model_shows_as_failed(
    runtime: LatencyInForce, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: MmapContention, address: int, size: int) -> bool:
        raise RuntimeError("populate broke")

    monkeypatch.setattr(MmapContention, "_populate", broken)
    await runtime.update({"mmap_contention": "2,size=1M"})
    assert wait_for(lambda: runtime.describe()["mmap_state"] == "failed")
    assert runtime.describe()["mmap_error"] == "RuntimeError: populate broke"
    assert wait_for(lambda: mmap_threads() == 0)  # one failure stops them all


async def test_running_models_show_as_running(runtime: LatencyInForce) -> None:
    await runtime.update({"bql": "const:100us@100", "mmap_contention": "1,size=1M"})
    described = runtime.describe()
    assert (described["bql_state"], described["bql_error"]) == ("running", None)
    assert (described["mmap_state"], described["mmap_error"]) == ("running", None)


# ------------------------------------------------- low: wrong JSON types


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"bql_phases": [1, 2]}, "bql_phases must be a list of phase names"),
        ({"bql_phases": None}, "bql_phases must be"),
        ({"delay": "x"}, "delay must be an object"),
        ({"delay": None}, "delay must be an object"),
        ({"delay": [["kick", "const:1ms"]]}, "delay must be an object"),
        ({"delay": {"kick": None}}, "delay for 'kick' must be a string"),
        ({"delay": {"kick": 5}}, "got 5"),
        ({"delay": {"kick": "off"}}, "unknown kind 'off'"),
        ({"bql": None}, 'bql must be a string (a spec, or "none" to remove it), got null'),
        ({"bql": False}, "got false"),
        ({"mmap_contention": 2}, "mmap_contention must be a string"),
        ({"seed": "1"}, "seed must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"replace": "yes"}, "replace must be true or false"),
        ({"colour": "blue"}, "unknown settings: colour"),
    ],
)
def test_wrong_types_in_a_set_are_refused_by_name(body: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError) as refused:
        LatencyInForce(available_memory=fixed(GiB)).updated(body)
    assert named in str(refused.value)


async def test_wrong_types_over_the_socket_never_get_an_internal_error(
    runtime: LatencyInForce, tmp_path: Path
) -> None:
    async def handle(body: dict[str, Any]) -> dict[str, Any]:
        return {"settings": (await runtime.update(body)).describe()}

    path = tmp_path / "control.sock"
    server = await serve_control(path, handle)
    try:
        for body in (
            {"bql_phases": [1, 2]},
            {"delay": "x"},
            {"delay": {"kick": None}},
            {"delay": {"kick": {"a": 1}}},
            {"mmap_contention": [1]},
            {"replace": None},
        ):
            reply = await asyncio.to_thread(control_request, path, {"cmd": "set", **body})
            assert reply["ok"] is False, body
            assert "internal error" not in reply["error"], reply
        removed = await asyncio.to_thread(
            control_request, path, {"cmd": "set", "delay": {"kick": "none"}}
        )
        assert removed["ok"] is True
    finally:
        await close_control(server, path)
    assert runtime.settings.delays == {}


def test_ctl_at_a_regular_file_says_it_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ControlError, match=f"^{path} is not a socket$"):
        control_request(path, {"cmd": "get"})
