"""The offered feature set (--features) and stats-queue buffers.

Each test names the wrong behaviour it catches.
"""

from __future__ import annotations

import struct

import pytest

from vhost_balloon.backend.balloon.features import (
    OFFERED_FEATURES,
    parse_features,
    qemu_device_properties,
)
from vhost_balloon.backend.balloon.guest_stats import STAT_NAMES, BadStats, parse_stats
from vhost_balloon.backend.cli.options import parse_stats_interval
from vhost_balloon.protocol import virtio
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable
from vhost_balloon.protocol.virtqueue import DESC_F_WRITE, Chain, Descriptor

STATS_VQ = 1 << virtio.BALLOON_F_STATS_VQ
OOM = 1 << virtio.BALLOON_F_DEFLATE_ON_OOM


def test_changes_apply_to_the_default_offer_and_a_list_replaces_it() -> None:
    assert parse_features("+stats-vq") == OFFERED_FEATURES | STATS_VQ
    assert parse_features("+stats-vq,-deflate-on-oom") == (OFFERED_FEATURES | STATS_VQ) & ~OOM
    assert parse_features("reporting, page-poison") == virtio.feature_mask(
        virtio.F_VERSION_1, virtio.BALLOON_F_REPORTING, virtio.BALLOON_F_PAGE_POISON
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no feature"),
        ("+stats-vq,reporting", "not both"),
        ("+stats", "unknown feature 'stats'"),
        ("free-page-hint", "cannot migrate"),
        ("-version-1", "always offered"),
    ],
)
def test_a_bad_feature_list_is_refused_by_name(text: str, message: str) -> None:
    # Catches: a typo silently offering the default, or a feature the device
    # cannot honour offered anyway.
    with pytest.raises(ValueError, match=message):
        parse_features(text)


def test_the_qemu_properties_follow_the_queues_of_the_offer() -> None:
    # Catches: num_vqs=3 printed for an offer with a stats queue (QEMU then
    # creates too few queues, and the guest's reporting queue is missing).
    assert "num_vqs=3" in qemu_device_properties(OFFERED_FEATURES)
    assert "num_vqs=4" in qemu_device_properties(OFFERED_FEATURES | STATS_VQ)
    assert "virtio-id=5" in qemu_device_properties(OFFERED_FEATURES)
    assert "config_size=16" in qemu_device_properties(OFFERED_FEATURES)


def _memory(data: bytes) -> GuestMemory:
    buffer = bytearray(1 << 16)
    buffer[0x100 : 0x100 + len(data)] = data
    return GuestMemory(RegionTable([Region(0, len(buffer), 0x7F0000000000, 0)]), [buffer])


def _chain(length: int, flags: int = 0) -> Chain:
    return Chain(0, (Descriptor(0x100, length, flags),), False)


def _records(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in pairs)


def test_every_linux_6_12_tag_has_qemus_name_and_later_tags_are_kept_by_number() -> None:
    # Catches: the 2024 QEMU 9.2-rc1 case (tags 10..15 of Linux 6.12 without
    # a name: QEMU aborted on any guest-stats read), and Firecracker's (a tag
    # it did not know broke the stats): unknown tags must be kept, not fatal.
    # Linux sends the vm-event tags first and MEMFREE.. last, not in tag order.
    order = [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 8, 9, 4, 5, 6, 7]
    data = _records(*[(tag, 1000 + tag) for tag in order], (16, 7), (0xFFFF, 9))
    sample = parse_stats(_chain(len(data)), _memory(data))
    assert len(STAT_NAMES) == 16
    assert sample.stats == {STAT_NAMES[tag]: 1000 + tag for tag in range(16)}
    assert sample.stats["stat-direct-reclaims"] == 1015
    assert sample.stats["stat-free-memory"] == 1004
    assert sample.unknown == {16: 7, 0xFFFF: 9}


def test_a_tag_sent_twice_keeps_its_last_value() -> None:
    data = _records((4, 1), (4, 2))
    assert parse_stats(_chain(len(data)), _memory(data)).stats == {"stat-free-memory": 2}


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        (_chain(15), "not a whole number of 10-byte records"),
        (_chain(10, DESC_F_WRITE), "device-writable"),
        (Chain(0, (Descriptor(1 << 20, 10, 0),), False), "outside guest RAM"),
        (_chain(70_000), "more than"),
    ],
    ids=["odd-length", "writable", "outside-ram", "too-long"],
)
def test_a_buffer_that_is_not_stats_is_refused(chain: Chain, message: str) -> None:
    with pytest.raises(BadStats, match=message):
        parse_stats(chain, _memory(b""))


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "1e6", "soon"])
def test_a_bad_stats_interval_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="stats-interval"):
        parse_stats_interval(text)


def test_a_good_stats_interval() -> None:
    assert parse_stats_interval("0") == 0.0
    assert parse_stats_interval("2.5") == 2.5
