"""virtio-balloon constants, config space and queue numbering (protocol/virtio.py)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhost_balloon.protocol.virtio import (
    BALLOON_F_DEFLATE_ON_OOM,
    BALLOON_F_FREE_PAGE_HINT,
    BALLOON_F_MUST_TELL_HOST,
    BALLOON_F_PAGE_POISON,
    BALLOON_F_REPORTING,
    BALLOON_F_STATS_VQ,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    BalloonConfig,
    balloon_queues,
    describe_features,
    feature_mask,
    has_feature,
)

u32 = st.integers(0, 0xFFFF_FFFF)
configs = st.builds(BalloonConfig, u32, u32, u32, u32)


def test_feature_bits_match_the_virtio_balloon_header() -> None:
    assert (
        BALLOON_F_MUST_TELL_HOST,
        BALLOON_F_STATS_VQ,
        BALLOON_F_DEFLATE_ON_OOM,
        BALLOON_F_FREE_PAGE_HINT,
        BALLOON_F_PAGE_POISON,
        BALLOON_F_REPORTING,
    ) == (0, 1, 2, 3, 4, 5)
    assert (F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1) == (28, 29, 32)


def test_feature_mask_and_has_feature_agree() -> None:
    mask = feature_mask(BALLOON_F_REPORTING, F_VERSION_1)
    assert mask == (1 << 5) | (1 << 32)
    assert has_feature(mask, F_VERSION_1)
    assert has_feature(mask, BALLOON_F_REPORTING)
    assert not has_feature(mask, BALLOON_F_STATS_VQ)


def test_describe_features_names_known_bits_and_numbers_unknown_ones() -> None:
    assert describe_features(0) == "none"
    assert describe_features(feature_mask(BALLOON_F_REPORTING, F_VERSION_1, 40)) == (
        "REPORTING|VERSION_1|bit40"
    )


# --- queue numbering --------------------------------------------------------------


def test_reporting_is_queue_2_when_it_is_the_only_optional_queue() -> None:
    queues = balloon_queues(feature_mask(BALLOON_F_REPORTING, F_VERSION_1))
    assert (queues.inflate, queues.deflate, queues.reporting) == (0, 1, 2)
    assert queues.stats is None
    assert queues.free_page is None
    assert queues.count == 3


def test_reporting_is_queue_3_with_stats() -> None:
    queues = balloon_queues(feature_mask(BALLOON_F_STATS_VQ, BALLOON_F_REPORTING))
    assert (queues.stats, queues.free_page, queues.reporting) == (2, None, 3)
    assert queues.count == 4


def test_reporting_is_queue_4_with_stats_and_free_page_hint() -> None:
    queues = balloon_queues(
        feature_mask(BALLOON_F_STATS_VQ, BALLOON_F_FREE_PAGE_HINT, BALLOON_F_REPORTING)
    )
    assert (queues.stats, queues.free_page, queues.reporting) == (2, 3, 4)
    assert queues.count == 5


def test_reporting_is_queue_3_with_free_page_hint_alone() -> None:
    queues = balloon_queues(feature_mask(BALLOON_F_FREE_PAGE_HINT, BALLOON_F_REPORTING))
    assert (queues.stats, queues.free_page, queues.reporting) == (None, 2, 3)


def test_no_optional_features_means_two_queues() -> None:
    queues = balloon_queues(feature_mask(BALLOON_F_PAGE_POISON, BALLOON_F_DEFLATE_ON_OOM))
    assert (queues.stats, queues.free_page, queues.reporting) == (None, None, None)
    assert queues.count == 2


@given(st.integers(0, (1 << 64) - 1))
def test_queue_indices_are_dense_and_in_feature_order(features: int) -> None:
    queues = balloon_queues(features)
    present = (queues.inflate, queues.deflate, queues.stats, queues.free_page, queues.reporting)
    indices = [q for q in present if q is not None]
    assert indices == list(range(queues.count))
    assert (queues.stats is not None) is has_feature(features, BALLOON_F_STATS_VQ)
    assert (queues.free_page is not None) is has_feature(features, BALLOON_F_FREE_PAGE_HINT)
    assert (queues.reporting is not None) is has_feature(features, BALLOON_F_REPORTING)


def test_queue_names() -> None:
    queues = balloon_queues(feature_mask(BALLOON_F_REPORTING))
    assert [queues.name(i) for i in range(4)] == ["inflate", "deflate", "reporting", "queue3"]


# --- config space -----------------------------------------------------------------


def test_config_layout_is_four_little_endian_u32() -> None:
    config = BalloonConfig(num_pages=1, actual=2, free_page_hint_cmd_id=3, poison_val=0xAABBCCDD)
    assert config.encode() == struct.pack("<IIII", 1, 2, 3, 0xAABBCCDD)
    assert len(config.encode()) == BalloonConfig.SIZE == 16


@given(configs)
def test_config_encode_then_decode_round_trips(config: BalloonConfig) -> None:
    assert BalloonConfig.decode(config.encode()) == config


@given(st.binary(min_size=16, max_size=16))
def test_config_decode_then_encode_is_identity(data: bytes) -> None:
    assert BalloonConfig.decode(data).encode() == data


@given(configs, st.integers(-4, 20), st.integers(-4, 20))
def test_config_read_returns_the_slice_or_refuses(
    config: BalloonConfig, offset: int, size: int
) -> None:
    if offset < 0 or size < 0 or offset + size > 16:
        with pytest.raises(ValueError, match="outside"):
            config.read(offset, size)
    else:
        assert config.read(offset, size) == config.encode()[offset : offset + size]


def test_config_read_of_the_first_8_bytes_is_what_qemu_asks_without_page_poison() -> None:
    config = BalloonConfig(num_pages=256, actual=128)
    assert config.read(0, 8) == struct.pack("<II", 256, 128)


@given(configs, st.integers(-4, 20), st.binary(max_size=20))
def test_config_write_changes_only_driver_writable_fields(
    config: BalloonConfig, offset: int, data: bytes
) -> None:
    if offset < 0 or offset + len(data) > 16:
        with pytest.raises(ValueError, match="outside"):
            config.write(offset, data)
        return
    raw = bytearray(config.encode())
    raw[offset : offset + len(data)] = data
    _, actual, _, poison = struct.unpack("<IIII", raw)
    written = config.write(offset, data)
    assert written.num_pages == config.num_pages
    assert written.free_page_hint_cmd_id == config.free_page_hint_cmd_id
    assert written.actual == actual
    assert written.poison_val == poison


def test_config_write_of_actual_is_little_endian() -> None:
    written = BalloonConfig(num_pages=10).write(4, struct.pack("<I", 7))
    assert written == BalloonConfig(num_pages=10, actual=7)


def test_config_write_cannot_change_num_pages() -> None:
    config = BalloonConfig(num_pages=10, actual=1)
    assert config.write(0, bytes(16)) == BalloonConfig(num_pages=10)
