"""`launch --balloon SIZE`: the host's side of the balloon workload.

The guest (qemu-configs/guest-init.sh, workload `balloon`) populates memory,
frees it and says `ready`; then the host sets the target SIZE, waits for the
driver's `actual` to reach it, measures what QEMU's shared RAM fell by, lets
the guest fill past its free memory if asked (deflate-on-oom), sets the
target back to the whole RAM, and waits for the balloon to empty. The same
steps run on the backend (through the device, as `ctl balloon` does) and on
QEMU's built-in device (through QMP, with the `qemu.qmp` library), so the
two can be compared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from qemu.qmp import QMPClient

from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.sampler import MemorySampler
from vhost_balloon.backend.server import Server

POLL_S = 0.01  # the same for both devices: the time to target is as fine as this
SETTLE_S = 1.0  # after the target is reached, before QEMU's RAM is read
BUILTIN_PATH = "/machine/peripheral/balloon0"  # run-guest.sh's id=balloon0


class BalloonError(Exception):
    """A step did not happen in time: the sentence says which."""


class BalloonControl(Protocol):
    async def set_target(self, size: int) -> None: ...

    async def ballooned_bytes(self) -> int: ...

    async def guest_stats(self) -> dict[str, Any] | None: ...


class BackendBalloon:
    """The backend's device, driven as `ctl balloon` drives it."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def set_target(self, size: int) -> None:
        await self.server.set_balloon_target(size)

    def _device_and_ram(self) -> tuple[Any, int]:
        (name,) = self.server.sessions  # launch runs one guest
        session = self.server.sessions[name]
        return self.server.vhost.devices[name], session.guest_ram_bytes

    async def ballooned_bytes(self) -> int:
        device, _ = self._device_and_ram()
        return int(device.config.actual) << 12

    async def guest_stats(self) -> dict[str, Any] | None:
        device, _ = self._device_and_ram()
        stats: dict[str, Any] = device.guest_stats.describe(device.settings.stats_interval_s)
        return stats

    def status(self) -> dict[str, Any]:
        device, ram = self._device_and_ram()
        status: dict[str, Any] = device.balloon_status(ram)
        return status


class QmpBalloon:
    """QEMU's built-in virtio-balloon, through QMP."""

    def __init__(self, client: QMPClient, ram_bytes: int) -> None:
        self.client = client
        self.ram_bytes = ram_bytes

    async def set_target(self, size: int) -> None:
        await self.client.execute("balloon", {"value": size})

    async def ballooned_bytes(self) -> int:
        reply = await self.client.execute("query-balloon")
        assert isinstance(reply, dict)
        return self.ram_bytes - int(reply["actual"])

    async def poll_stats(self, interval_s: int) -> None:
        await self.client.execute(
            "qom-set",
            {"path": BUILTIN_PATH, "property": "guest-stats-polling-interval", "value": interval_s},
        )

    async def guest_stats(self) -> dict[str, Any] | None:
        reply = await self.client.execute(
            "qom-get", {"path": BUILTIN_PATH, "property": "guest-stats"}
        )
        return reply if isinstance(reply, dict) else None

    async def close(self) -> None:
        await self.client.disconnect()


async def _until(what: str, condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise BalloonError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def _until_ballooned(
    control: BalloonControl, wanted: int, what: str, timeout_s: float
) -> float:
    """Seconds until the balloon's size (from `actual`) is `wanted`."""
    start = time.monotonic()
    deadline = start + timeout_s
    while (now := await control.ballooned_bytes()) != wanted:
        if time.monotonic() > deadline:
            raise BalloonError(
                f"timed out after {timeout_s:g} s waiting for {what}: "
                f"{now} bytes ballooned, {wanted} wanted"
            )
        await asyncio.sleep(POLL_S)
    return time.monotonic() - start


async def run_balloon_steps(
    control: BalloonControl,
    guest: GuestConsole,
    sampler: MemorySampler,
    *,
    ram_bytes: int,
    target: int,
    oom: bool,
    timeout_s: float,
    note: Callable[[str], None],
) -> dict[str, Any]:
    """The steps above; what they measured, for the launch summary."""
    phases = guest.balloon_phases
    await _until("the guest to be ready", lambda: "ready" in phases, timeout_s)
    rss_before = sampler.read()
    note(f"balloon: target {target >> 20} MiB of {ram_bytes >> 20} MiB")
    await control.set_target(target)
    inflate_s = await _until_ballooned(
        control, ram_bytes - target, "the guest to reach the target", timeout_s
    )
    await asyncio.sleep(SETTLE_S)
    rss_after = sampler.read()
    note(f"balloon: target reached in {inflate_s:.3f} s")
    result: dict[str, Any] = {
        "target_bytes": target,
        "balloon_bytes": ram_bytes - target,
        "seconds_to_target": round(inflate_s, 3),
        "qemu_shared_kib_before": rss_before,
        "qemu_shared_kib_after": rss_after,
        "qemu_shared_drop_bytes": (
            (rss_before - rss_after) * 1024 if rss_before is not None and rss_after else None
        ),
    }
    if oom:
        await _until(
            "the guest's fill past its free memory", lambda: "oom_filled" in phases, timeout_s
        )
        result["after_oom_ballooned_bytes"] = await control.ballooned_bytes()
        result["oom_fill_ok"] = phases["oom_filled"][1].get("ok") == "1"
    await control.set_target(ram_bytes)
    result["seconds_to_deflate"] = round(
        await _until_ballooned(control, 0, "the balloon to empty", timeout_s), 3
    )
    await _until("the guest to fill again", lambda: "refilled" in phases, timeout_s)
    result["refill_ok"] = phases["refilled"][1].get("ok") == "1"
    result["guest_stats"] = await control.guest_stats()
    result["guest_phases"] = sorted(phases, key=lambda name: phases[name][0])
    return result
