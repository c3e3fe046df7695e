"""`launch --balloon SIZE` without QEMU: its options, the guest's parameters,
the console's balloon phases, and the host's steps against a fake device.

Each test names the wrong behaviour it catches.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.cli import launch as launch_cli
from vhost_balloon.backend.cli.options import UsageError
from vhost_balloon.backend.qemu.balloon_steps import BalloonError, run_balloon_steps
from vhost_balloon.backend.qemu.command import run_guest_command
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.sampler import MemorySampler
from vhost_balloon.backend.server import ServerSettings
from vhost_balloon.protocol.virtio import BALLOON_F_STATS_VQ

MiB = 1 << 20


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vhost-balloon")
    launch_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["launch", *argv])


def test_balloon_alone_picks_the_balloon_workload_and_tells_the_guest_how_much() -> None:
    # Catches: the guest waiting for the wrong amount (it would time out, or
    # call a half-inflated balloon done), or --mem read as bytes.
    options = launch_cli.launch_options(_args("--balloon", "384M", "--balloon-oom", "64"))
    assert options.workload == "balloon" and options.balloon_target == 384 * MiB
    assert options.guest_ram_bytes == 512 * MiB and options.balloon_bytes == 128 * MiB
    command = run_guest_command(options, Path("/tmp/s.sock"))
    # init_on_alloc=0: the kernel would zero every page it hands the balloon.
    assert command[command.index("--append") + 1] == "init_on_alloc=0 vb.balloon=128 vb.oom=64"
    assert command[command.index("--workload") + 1] == "balloon"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workload", "balloon"], "needs --balloon SIZE"),
        (["--workload", "gigantic", "--balloon", "1G"], "not --workload gigantic"),
        (["--balloon", "512M"], "not between 0 and the guest's RAM"),
        (["--balloon", "1G", "--mem", "768"], r"not between 0 and the guest's RAM \(768 MiB\)"),
        (["--balloon", "256M", "--balloon-oom", "-1"], "MiB >= 0"),
        (["--balloon-oom", "8"], "for the balloon workload"),
        (["--balloon", "402654184"], "not a whole number of 4 KiB pages"),
    ],
)
def test_a_bad_balloon_launch_is_refused_before_qemu(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        launch_cli.launch_options(_args(*argv))


def test_the_balloon_workload_offers_the_stats_queue_and_polls_it() -> None:
    # Catches: `guest_stats` empty in the summary because no stats queue was offered.
    settings = launch_cli.with_balloon_stats(ServerSettings())
    assert settings.balloon.features >> BALLOON_F_STATS_VQ & 1
    assert settings.balloon.stats_interval_s == launch_cli.BALLOON_STATS_INTERVAL_S
    assert (
        launch_cli.with_balloon_stats(
            ServerSettings(balloon=BalloonSettings(stats_interval_s=7.0))
        ).balloon.stats_interval_s
        == 7.0
    )


def test_the_console_keeps_each_balloon_phase_with_its_time() -> None:
    console = GuestConsole()
    console.feed("VB balloon_phase=ready t=3.1 memfree_kib=400000 balloon_mib=128 oom_mib=0", 10.0)
    console.feed("VB balloon_phase=refilled t=9.0 memfree_kib=390000 mib=300 ok=1", 20.0)
    assert console.balloon_phases["ready"][0] == 10.0
    assert console.balloon_phases["refilled"][1]["ok"] == "1"


class FakeBalloon:
    """A device whose driver follows the target after `lag` polls."""

    def __init__(self, ram: int, console: GuestConsole, lag: int = 3) -> None:
        self.ram = ram
        self.console = console
        self.lag = lag
        self.targets: list[int] = []
        self.ballooned = 0
        self._polls = 0

    async def set_target(self, size: int) -> None:
        self.targets.append(size)
        self._polls = 0

    async def ballooned_bytes(self) -> int:
        self._polls += 1
        if self.targets and self._polls >= self.lag:
            self.ballooned = self.ram - self.targets[-1]
            if self.ballooned == 0:  # deflated: the guest fills again
                self.console.feed("VB balloon_phase=refilled t=1 memfree_kib=1 ok=1", 1.0)
        return self.ballooned

    async def guest_stats(self) -> dict[str, Any] | None:
        return {"samples": 2}


async def test_the_steps_inflate_measure_and_deflate_in_order() -> None:
    # Catches: a target set before the guest populated its memory (nothing to
    # free), the balloon left inflated, no time to target.
    console = GuestConsole()
    device = FakeBalloon(512 * MiB, console)
    steps = asyncio.ensure_future(
        run_balloon_steps(
            device,
            console,
            MemorySampler(),
            ram_bytes=512 * MiB,
            target=384 * MiB,
            oom=False,
            timeout_s=10.0,
            note=lambda _text: None,
        )
    )
    await asyncio.sleep(0.1)
    assert device.targets == []  # not before the guest is ready
    console.feed("VB balloon_phase=ready t=1 memfree_kib=1", 1.0)
    result = await asyncio.wait_for(steps, 10.0)
    assert device.targets == [384 * MiB, 512 * MiB]
    assert result["balloon_bytes"] == 128 * MiB and result["seconds_to_target"] > 0
    assert result["refill_ok"] is True and result["guest_stats"] == {"samples": 2}


async def test_a_guest_that_never_gets_ready_is_a_clear_error() -> None:
    console = GuestConsole()
    with pytest.raises(BalloonError, match="the guest to be ready"):
        await run_balloon_steps(
            FakeBalloon(512 * MiB, console),
            console,
            MemorySampler(),
            ram_bytes=512 * MiB,
            target=384 * MiB,
            oom=False,
            timeout_s=0.2,
            note=lambda _text: None,
        )


def test_a_device_reset_starts_the_target_over() -> None:
    # Catches: after a guest reboot, the old balloon size and the old time to
    # target shown, and the new driver's time never recorded.
    device = BalloonDevice(BalloonSettings(), "s1", logging.getLogger("t"))
    device.set_target(1024)
    device.write_config(4, (1024).to_bytes(4, "little"))
    assert device.balloon_status(512 * MiB)["seconds_to_target"] is not None
    device.reset()
    status = device.balloon_status(512 * MiB)
    assert status["ballooned_bytes"] == 0 and status["target_pages"] == 1024
    assert status["seconds_to_target"] is None and status["pending_seconds"] is not None
    device.write_config(4, (1024).to_bytes(4, "little"))
    assert device.balloon_status(512 * MiB)["seconds_to_target"] is not None
