"""The vmem workload without a guest: the host's plug/unplug cycles against
a fake QMP device, and the summary that maps the guest's isolation tests
onto each unplug and attributes the failed ones to reports."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest

from vhost_balloon.backend.cli import launch as launch_cli
from vhost_balloon.backend.cli.options import UsageError
from vhost_balloon.backend.qemu import vmem_steps
from vhost_balloon.backend.qemu.attribution import BackendReport
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.vmem_steps import VmemError, run_vmem_steps
from vhost_balloon.backend.qemu.vmem_summary import summarize_vmem

MiB = 1 << 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeDevice:
    """virtio-mem-pci over QMP: `size` follows `requested-size` after a
    delay, longer for the unplugs listed in `slow` (the retry timer)."""

    def __init__(self, clock: FakeClock, slow: set[int]) -> None:
        self.clock = clock
        self.size = 0
        self.requested = 0
        self.ready_at = 0.0
        self.unplugs = 0
        self.slow = slow

    async def execute(self, command: str, arguments: dict[str, Any]) -> Any:
        self.clock.now += 0.05  # every QMP round trip takes a little time
        if command == "qom-set":
            self.requested = arguments["value"]
            if self.requested == 0:
                self.unplugs += 1
                self.ready_at = self.clock.now + (50.0 if self.unplugs in self.slow else 1.0)
            else:
                self.ready_at = self.clock.now + 0.05
            return {}
        prop = arguments["property"]
        if prop == "block-size":
            return 2 * MiB
        if prop == "size":
            if self.clock.now >= self.ready_at:
                self.size = self.requested
            return self.size
        raise AssertionError(prop)


def _console_with_loop(duration: int) -> GuestConsole:
    console = GuestConsole()
    console.feed(
        f"VB gigantic_loop=start t=20.00 settle_s=10 duration_s={duration} memfree_kib=1 op=vmem",
        100.0,
    )
    return console


def test_cycles_run_until_the_loop_ends_and_an_unplug_cut_short_is_unfinished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    device = FakeDevice(clock, slow={2})

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0)

    monkeypatch.setattr(vmem_steps, "_sleep", sleep)
    steps = asyncio.run(
        run_vmem_steps(
            device,  # type: ignore[arg-type]
            _console_with_loop(duration=40),
            clock,
            plug_bytes=256 * MiB,
            pause_s=2.5,
            note=lambda _: None,
        )
    )
    kinds = [(r["kind"], r["seconds"] is not None) for r in steps["requests"]]
    assert kinds == [("plug", True), ("unplug", True), ("plug", True), ("unplug", False)]
    first = steps["requests"][1]
    assert first["target"] == 0 and 1.0 <= first["seconds"] < 1.2
    assert steps["requests"][3]["size_at_end"] == 256 * MiB  # still plugged at the end
    assert steps["block_bytes"] == 2 * MiB and steps["plug_bytes"] == 256 * MiB


def test_a_loop_that_never_starts_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(vmem_steps, "START_TIMEOUT_S", 1.0)

    async def tick(_: float) -> None:
        clock.now += 0.5

    monkeypatch.setattr(vmem_steps, "_sleep", tick)
    with pytest.raises(VmemError, match="the guest's loop did not start within 1 s"):
        asyncio.run(
            run_vmem_steps(
                FakeDevice(clock, set()),  # type: ignore[arg-type]
                GuestConsole(),
                clock,
                plug_bytes=MiB,
                pause_s=0,
                note=lambda _: None,
            )
        )


def test_each_failed_test_in_an_unplug_is_attributed_to_the_report_holding_it() -> None:
    console = _console_with_loop(duration=120)  # host 100.0 = guest 20.00: offset 80
    for line in (
        # inside unplug 1 (host 110-161, guest 30-81): one fail on a held page, one success
        "VB gigantic_event t_mono=30.5 start_pfn=0x100000 end_pfn=0x100200 "
        "fin_pfn=0x100100 ret=fail attempt=0",
        "VB gigantic_event t_mono=31.0 start_pfn=0x100200 end_pfn=0x100400 "
        "fin_pfn=0x100400 ret=success attempt=0",
        # before any unplug: not counted
        "VB gigantic_event t_mono=25.0 start_pfn=0x100000 end_pfn=0x100200 "
        "fin_pfn=0x100000 ret=fail attempt=0",
        # inside unplug 2 (host 170-171.5), on a page no report held
        "VB gigantic_event t_mono=90.5 start_pfn=0x100000 end_pfn=0x100200 "
        "fin_pfn=0x100010 ret=fail attempt=0",
    ):
        console.feed(line, 1.0)
    run = console.gigantic
    assert run is not None and not console.errors
    steps = {
        "plug_bytes": 256 * MiB,
        "requests": [
            {"kind": "plug", "target": 256 * MiB, "t_request": 105.0, "seconds": 0.1},
            {"kind": "unplug", "target": 0, "t_request": 110.0, "seconds": 51.0},
            {"kind": "unplug", "target": 0, "t_request": 170.0, "seconds": 1.5},
        ],
    }
    # One report, guest 30.4-30.8 s, holding 4 MiB at pfn 0x100000.
    backend = [BackendReport(30.4, ((0x100000 * 4096, 4 * MiB),))]
    v = summarize_vmem(run, steps, [30.4], [400_000.0], backend)
    assert v["unplugs"] == 2 and v["unfinished"] == 0
    assert v["waited_for_retry_timer"] == 1  # the 51 s one
    assert v["isolation_tests"] == 3 and v["isolation_failures"] == 2
    assert v["attributed"] == 1 and v["unattributed"] == 1
    first, second = v["unplug_detail"]
    assert [d["report"] for d in first["failed_tests"]] == [0]
    assert [d["report"] for d in second["failed_tests"]] == [None]
    assert v["try_again"]["requests_retried"] == 2
    assert v["try_again"]["time_to_success_samples_ms"] == [1500.0, 51000.0]


def test_without_the_loop_there_is_nothing_to_map() -> None:
    v = summarize_vmem(None, {"requests": []}, [], [], None)
    assert v["unplugs"] is None and v["requests"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workload", "vmem", "--vmem-size", "3M"], "multiple of 2M"),
        (["--workload", "vmem", "--vmem-size", "0"], "above 0"),
        (["--workload", "vmem", "--vmem-size", "2G"], "exceeds the 1024 MiB virtio-mem device"),
        (["--workload", "vmem", "--virtio-mem", "512", "--vmem-size", "1G"], "exceeds the 512"),
        (["--workload", "vmem", "--virtio-mem", "513"], "even number of MiB"),
        (["--workload", "gigantic", "--vmem-size", "256M"], "for the vmem workload"),
        (["--workload", "vmem", "--vmem-pause", "-1"], "from 0 to 3600"),
        (["--workload", "vmem", "--vmem-pause", "nan"], "from 0 to 3600"),
        (["--workload", "pattern", "--no-balloon"], "control for --workload"),
    ],
)
def test_a_bad_vmem_launch_is_refused_before_qemu(argv: list[str], message: str) -> None:
    parser = argparse.ArgumentParser(prog="vhost-balloon")
    launch_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(UsageError, match=message):
        launch_cli.launch_options(parser.parse_args(["launch", *argv]))


def test_a_good_vmem_launch_is_taken() -> None:
    parser = argparse.ArgumentParser(prog="vhost-balloon")
    launch_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["launch", "--workload", "vmem", "--virtio-mem", "512", "--vmem-size", "256M"]
    options = launch_cli.launch_options(parser.parse_args(argv))
    assert options.virtio_mem == 512 and options.vmem_size == 256 << 20


class GarbledDevice(FakeDevice):
    """A QEMU (or something in its place) whose `size` is not a number."""

    async def execute(self, command: str, arguments: dict[str, Any]) -> Any:
        if command == "qom-get" and arguments["property"] == "size":
            return "lots"
        return await super().execute(command, arguments)


def test_a_size_that_is_not_a_number_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()

    async def tick(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(vmem_steps, "_sleep", tick)
    with pytest.raises(VmemError, match="qom-get /machine/peripheral/vm0 size gave 'lots'"):
        asyncio.run(
            run_vmem_steps(
                GarbledDevice(clock, set()),  # type: ignore[arg-type]
                _console_with_loop(60),
                clock,
                plug_bytes=MiB,
                pause_s=0,
                note=lambda _: None,
            )
        )
