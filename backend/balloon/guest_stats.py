"""The stats queue (VIRTIO_BALLOON_F_STATS_VQ): the guest's memory statistics.

The driver posts one driver-readable buffer of packed {le16 tag, le64 value}
records at probe, and another each time the device gives the last one back.
So the device holds the buffer, and asks for a fresh sample by returning it:
QEMU does so every `guest-stats-polling-interval` seconds, and so does this
device every `--stats-interval` seconds (0: never; the sample of the probe
is then the only one).

Tags are named as QEMU names them (hw/virtio/virtio-balloon.c, QEMU >= 9.2),
one name for each of the 16 tags Linux 6.12 sends. A tag beyond those is kept
by number, never dropped, never an error: Firecracker broke on the 6.12 tags,
and QEMU 9.2.0-rc1 aborted on them (its name table had NULL for tags 10..15).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any

from vhost_balloon.protocol.errors import AddressError
from vhost_balloon.protocol.memory import GuestMemory, Space
from vhost_balloon.protocol.virtqueue import Chain

STAT = struct.Struct("<HQ")
MAX_STATS_BYTES = 64 * 1024  # 6.12 sends 160 bytes; a longer buffer is not a sample

# Index = tag (include/uapi/linux/virtio_balloon.h); names as QEMU's.
STAT_NAMES = (
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
    "stat-oom-kills",
    "stat-alloc-stalls",
    "stat-async-scans",
    "stat-direct-scans",
    "stat-async-reclaims",
    "stat-direct-reclaims",
)


class BadStats(ValueError):
    """A stats buffer that is not an array of 10-byte records: given back,
    not kept as a sample."""


@dataclass(frozen=True, slots=True)
class StatsSample:
    stats: dict[str, int]  # by QEMU's name, for the tags it knows
    unknown: dict[int, int]  # by tag number, for the others
    monotonic_ns: int
    wall_time_s: float  # QEMU's "last-update" is wall-clock seconds

    def describe(self) -> dict[str, Any]:
        return {
            "last_update": self.wall_time_s,
            "age_s": (time.monotonic_ns() - self.monotonic_ns) / 1e9,
            "stats": self.stats,
            "unknown_tags": {str(tag): value for tag, value in self.unknown.items()},
        }


def parse_stats(chain: Chain, memory: GuestMemory) -> StatsSample:
    """The sample in a stats chain; raises BadStats. A tag sent twice keeps
    its last value (as QEMU does)."""
    data = bytearray()
    for descriptor in chain.descriptors:
        if descriptor.writable:
            raise BadStats("a device-writable buffer (stats buffers are driver-readable)")
        if len(data) + descriptor.length > MAX_STATS_BYTES:
            raise BadStats(f"more than {MAX_STATS_BYTES} bytes of stats")
        try:
            data += memory.read(descriptor.addr, descriptor.length, Space.GPA)
        except AddressError as error:
            raise BadStats(f"a stats buffer outside guest RAM: {error}") from None
    if len(data) % STAT.size:
        raise BadStats(f"{len(data)} bytes, not a whole number of {STAT.size}-byte records")
    stats: dict[str, int] = {}
    unknown: dict[int, int] = {}
    for tag, value in STAT.iter_unpack(data):
        if tag < len(STAT_NAMES):
            stats[STAT_NAMES[tag]] = value
        else:
            unknown[tag] = value
    return StatsSample(stats, unknown, time.monotonic_ns(), time.time())


@dataclass(slots=True)
class StatsState:
    """The held buffer (its head), the last sample and the counts."""

    held_head: int | None = None
    last: StatsSample | None = None
    samples: int = 0
    bad: int = 0
    requests: int = 0  # buffers given back to ask for a fresh sample
    last_error: str = ""

    def describe(self, interval_s: float) -> dict[str, Any]:
        return {
            "interval_s": interval_s,
            "samples": self.samples,
            "requests": self.requests,
            "bad_buffers": self.bad,
            "last_error": self.last_error or None,
            "last": None if self.last is None else self.last.describe(),
        }
