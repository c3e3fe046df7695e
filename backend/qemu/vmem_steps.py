"""`launch --workload vmem`: the host's side of the virtio-mem workload.

The reviewer's own context: virtio-mem unplugs guest memory with
alloc_contig_range() on ZONE_MOVABLE while free page reporting runs. Once
the guest's loop starts (qemu-configs/guest-init.sh, workload `vmem`), the
host repeats, through QMP (`qom-set /machine/peripheral/vm0
requested-size`, as a user of virtio-mem does): plug SIZE and wait for the
device's `size` to reach it; wait --vmem-pause s, so that the next
reporting pass is taking the new free memory; ask for 0 and time how long
the unplug takes. When the driver's alloc_contig_range() meets a page a
report holds, it retries 5 times at once on ZONE_MOVABLE, skips the
sub-block, and if the request cannot be met otherwise ends it with -EBUSY:
it then tries again only when its retry timer fires, after 50 s, doubling
up to 300 s (drivers/virtio/virtio_mem.c). An unplug that takes that long
is the cost the review feared, and the summary names the reports that
caused it (backend/qemu/vmem_summary.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from qemu.qmp import QMPClient

from vhost_balloon.backend.qemu.console import GuestConsole

DEVICE = "/machine/peripheral/vm0"  # run-guest.sh's id=vm0
POLL_S = 0.05
PLUG_TIMEOUT_S = 60.0
RETRY_TIMER_MIN_S = 50.0  # VIRTIO_MEM_RETRY_TIMER_MIN_MS: an unplug this slow waited for it
START_TIMEOUT_S = 900.0


_sleep = asyncio.sleep  # the tests' clock replaces it


class VmemError(Exception):
    """A step did not happen in time, or QMP refused it: the sentence says which."""


@dataclass(slots=True)
class VmemRequest:
    """One requested-size change as the host saw it (launch's clock, s)."""

    kind: str  # "plug" or "unplug"
    target: int  # bytes
    t_request: float
    seconds: float | None  # until `size` reached the target; None: the loop ended first
    size_at_end: int  # the device's `size` when the wait ended


async def _get(client: QMPClient, prop: str) -> int:
    value = await client.execute("qom-get", {"path": DEVICE, "property": prop})
    if not isinstance(value, int):
        raise VmemError(f"qom-get {DEVICE} {prop} gave {value!r}, not a number")
    return value


async def _request(
    client: QMPClient,
    clock: Callable[[], float],
    kind: str,
    target: int,
    deadline: float,
) -> VmemRequest:
    """Set requested-size and wait until `size` follows, or `deadline`."""
    await client.execute("qom-set", {"path": DEVICE, "property": "requested-size", "value": target})
    start = clock()
    size = await _get(client, "size")
    while size != target and clock() < deadline:
        await _sleep(POLL_S)
        size = await _get(client, "size")
    done = size == target
    return VmemRequest(kind, target, start, round(clock() - start, 3) if done else None, size)


async def run_vmem_steps(
    client: QMPClient,
    guest: GuestConsole,
    clock: Callable[[], float],
    *,
    plug_bytes: int,
    pause_s: float,
    note: Callable[[str], None],
) -> dict[str, Any]:
    """Plug/unplug cycles for as long as the guest's loop runs; what they took."""
    region = plug_bytes
    started = clock()
    while guest.gigantic is None or guest.gigantic.t_loop_start is None:
        if clock() - started > START_TIMEOUT_S:
            raise VmemError(f"the guest's loop did not start within {START_TIMEOUT_S:g} s")
        await _sleep(POLL_S)
    run = guest.gigantic
    assert run.t_loop_start is not None and run.duration_s is not None
    end = run.t_loop_start + run.duration_s
    block = await _get(client, "block-size")
    note(
        f"vmem: plugging and unplugging {region >> 20} MiB (block {block >> 10} KiB) "
        "until the loop ends"
    )
    requests: list[VmemRequest] = []
    while clock() < end - PLUG_TIMEOUT_S / 10:
        plug = await _request(client, clock, "plug", region, min(end, clock() + PLUG_TIMEOUT_S))
        requests.append(plug)
        if plug.seconds is None:
            break
        await _sleep(pause_s)
        unplug = await _request(client, clock, "unplug", 0, end)
        requests.append(unplug)
        said = "not done when the loop ended" if unplug.seconds is None else f"{unplug.seconds} s"
        note(f"vmem: unplug {len([r for r in requests if r.kind == 'unplug'])}: {said}")
        if unplug.seconds is None:
            break
    return {
        "plug_bytes": region,
        "block_bytes": block,
        "pause_s": pause_s,
        "requests": [asdict(r) for r in requests],
    }
