"""virtio and virtio-balloon constants, config layout and queue numbering."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

# virtio-balloon feature bits (include/uapi/linux/virtio_balloon.h)
BALLOON_F_MUST_TELL_HOST = 0
BALLOON_F_STATS_VQ = 1
BALLOON_F_DEFLATE_ON_OOM = 2
BALLOON_F_FREE_PAGE_HINT = 3
BALLOON_F_PAGE_POISON = 4
BALLOON_F_REPORTING = 5

# transport feature bits
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35

VIRTIO_ID_BALLOON = 5
BALLOON_PFN_SHIFT = 12  # inflate/deflate PFNs are always 4 KiB frames

# Linux's page_reporting limits (mm/page_reporting.h)
PAGE_REPORTING_CAPACITY = 32
PAGE_REPORTING_CAPACITY_2019 = 16


def feature_mask(*bits: int) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


def has_feature(features: int, bit: int) -> bool:
    return bool(features >> bit & 1)


FEATURE_NAMES: dict[int, str] = {
    BALLOON_F_MUST_TELL_HOST: "MUST_TELL_HOST",
    BALLOON_F_STATS_VQ: "STATS_VQ",
    BALLOON_F_DEFLATE_ON_OOM: "DEFLATE_ON_OOM",
    BALLOON_F_FREE_PAGE_HINT: "FREE_PAGE_HINT",
    BALLOON_F_PAGE_POISON: "PAGE_POISON",
    BALLOON_F_REPORTING: "REPORTING",
    F_INDIRECT_DESC: "INDIRECT_DESC",
    F_EVENT_IDX: "EVENT_IDX",
    F_VERSION_1: "VERSION_1",
    F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    F_RING_PACKED: "RING_PACKED",
    F_IN_ORDER: "IN_ORDER",
    30: "PROTOCOL_FEATURES",  # vhost_user.F_PROTOCOL_FEATURES (that module imports this one)
}


def feature_name(bit: int) -> str:
    """The bit's name in FEATURE_NAMES, or "bitN" for one it does not know."""
    return FEATURE_NAMES.get(bit, f"bit{bit}")


def feature_names(features: int) -> list[str]:
    """The names of the bits set in a 64-bit feature mask, lowest bit first."""
    return [feature_name(bit) for bit in range(64) if has_feature(features, bit)]


def describe_features(features: int) -> str:
    return "|".join(feature_names(features)) or "none"


@dataclass(frozen=True, slots=True)
class BalloonConfig:
    """The 16-byte virtio_balloon_config, all little-endian u32."""

    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0
    FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    SIZE: ClassVar[int] = 16

    @classmethod
    def decode(cls, data: bytes) -> BalloonConfig:
        if len(data) != cls.SIZE:
            raise ValueError(f"balloon config is {cls.SIZE} bytes, got {len(data)}")
        return cls(*cls.FORMAT.unpack(data))

    def encode(self) -> bytes:
        return self.FORMAT.pack(
            self.num_pages, self.actual, self.free_page_hint_cmd_id, self.poison_val
        )

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the config; raises ValueError outside it."""
        if offset < 0 or size < 0 or offset + size > self.SIZE:
            raise ValueError(f"config read {offset}+{size} outside {self.SIZE} bytes")
        return self.encode()[offset : offset + size]

    def write(self, offset: int, data: bytes) -> BalloonConfig:
        """A new config with `data` written at `offset` (driver-writable fields only).

        The driver may write `actual` and `poison_val`; `num_pages` and the
        hint command id belong to the device and keep their values.
        """
        if offset < 0 or offset + len(data) > self.SIZE:
            raise ValueError(f"config write {offset}+{len(data)} outside {self.SIZE} bytes")
        raw = bytearray(self.encode())
        raw[offset : offset + len(data)] = data
        written = BalloonConfig.decode(bytes(raw))
        return BalloonConfig(
            num_pages=self.num_pages,
            actual=written.actual,
            free_page_hint_cmd_id=self.free_page_hint_cmd_id,
            poison_val=written.poison_val,
        )


@dataclass(frozen=True, slots=True)
class BalloonQueues:
    """Queue indices for a negotiated feature set.

    Absent optional queues take no index: inflate 0, deflate 1, then stats,
    free-page and reporting in that order, each only when its feature is on.
    """

    inflate: int
    deflate: int
    stats: int | None
    free_page: int | None
    reporting: int | None

    @property
    def count(self) -> int:
        return 2 + sum(q is not None for q in (self.stats, self.free_page, self.reporting))

    def name(self, index: int) -> str:
        for label in ("inflate", "deflate", "stats", "free_page", "reporting"):
            if getattr(self, label) == index:
                return label
        return f"queue{index}"


def balloon_queues(features: int) -> BalloonQueues:
    next_index = 2
    optional: list[int | None] = []
    for bit in (BALLOON_F_STATS_VQ, BALLOON_F_FREE_PAGE_HINT, BALLOON_F_REPORTING):
        if has_feature(features, bit):
            optional.append(next_index)
            next_index += 1
        else:
            optional.append(None)
    return BalloonQueues(0, 1, optional[0], optional[1], optional[2])
