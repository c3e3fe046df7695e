"""Interrupt and kick suppression: EVENT_IDX and the NO_INTERRUPT/NO_NOTIFY flags."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.ringkit import RawRing, make_memory, start_driver_at
from vhost_balloon.protocol.virtqueue import (
    AVAIL_F_NO_INTERRUPT,
    USED_F_NO_NOTIFY,
    Buffer,
    DeviceQueue,
    DriverQueue,
    RingLayout,
    vring_need_event,
)

u16 = st.integers(0, 0xFFFF)


# --- vring_need_event -----------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [
        (0, 1, 0, True),  # the one entry published is the one asked about
        (1, 1, 0, False),  # asked about the next one, not this one
        (0, 5, 0, True),
        (4, 5, 0, True),
        (5, 5, 0, False),
        (3, 3, 3, False),  # nothing new: never notify
        (0xFFFF, 0, 0xFFFF, True),  # crossing the wrap
        (0xFFFE, 0, 0xFFFF, False),
        (0, 2, 0xFFFE, True),
        (2, 2, 0xFFFE, False),
        (0x7FFF, 0x8000, 0x7FFF, True),
    ],
)
def test_vring_need_event_cases(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


@given(u16, u16, st.integers(0, 600))
def test_vring_need_event_is_true_iff_event_lies_in_old_to_new(
    event: int, old: int, distance: int
) -> None:
    new = (old + distance) & 0xFFFF
    crossed = {(old + k) & 0xFFFF for k in range(distance)}
    assert vring_need_event(event, new, old) is (event in crossed)


# --- device -> driver interrupts ------------------------------------------------


def pair(*, event_idx: bool, size: int = 8) -> tuple[DriverQueue, DeviceQueue, RawRing]:
    memory, buf = make_memory()
    layout = RingLayout.packed_at(0, size)
    driver = DriverQueue(memory, layout, event_idx=event_idx)
    device = DeviceQueue(memory, layout, event_idx=event_idx, indirect=True)
    return driver, device, RawRing(memory, buf, layout)


def complete_one(driver: DriverQueue, device: DeviceQueue) -> None:
    driver.add([Buffer(0x1000, 8, True)])
    chain = device.pop()
    assert chain is not None
    device.push(chain.head, 0)


def test_without_event_idx_device_notifies_unless_no_interrupt_is_set() -> None:
    driver, device, ring = pair(event_idx=False)
    complete_one(driver, device)
    assert device.needs_notify()
    ring.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    complete_one(driver, device)
    assert not device.needs_notify()
    ring.set_avail_flags(0)
    assert device.needs_notify()


def test_without_event_idx_used_event_is_ignored() -> None:
    driver, device, ring = pair(event_idx=False)
    ring.set_used_event(100)
    complete_one(driver, device)
    assert device.needs_notify()


def test_with_event_idx_no_interrupt_flag_is_ignored() -> None:
    driver, device, ring = pair(event_idx=True)
    ring.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    complete_one(driver, device)
    assert device.needs_notify()  # first notification is always sent
    ring.set_used_event(1)  # "interrupt me when used entry 1 is published"
    complete_one(driver, device)
    assert device.needs_notify()


def test_with_event_idx_first_publication_always_notifies() -> None:
    driver, device, ring = pair(event_idx=True)
    ring.set_used_event(1000)
    complete_one(driver, device)
    assert device.needs_notify()


def test_with_event_idx_device_notifies_only_when_crossing_used_event() -> None:
    driver, device, ring = pair(event_idx=True)
    complete_one(driver, device)
    assert device.needs_notify()  # used.idx 0 -> 1
    ring.set_used_event(3)  # the driver wants to hear when entry 3 is used
    complete_one(driver, device)  # 1 -> 2
    assert not device.needs_notify()
    complete_one(driver, device)  # 2 -> 3: entry 2 used, not yet 3
    assert not device.needs_notify()
    complete_one(driver, device)  # 3 -> 4: entry 3 used
    assert device.needs_notify()
    assert not device.needs_notify()  # nothing new since


def test_with_event_idx_batched_publication_notifies_once_if_used_event_inside() -> None:
    driver, device, ring = pair(event_idx=True)
    complete_one(driver, device)
    assert device.needs_notify()
    ring.set_used_event(2)
    for _ in range(3):  # 1 -> 4, crossing 2
        complete_one(driver, device)
    assert device.needs_notify()


def test_driver_get_used_asks_for_the_next_interrupt_with_event_idx() -> None:
    driver, device, ring = pair(event_idx=True)
    complete_one(driver, device)
    complete_one(driver, device)
    assert len(driver.get_used()) == 2
    assert ring.used_event() == 2
    assert device.needs_notify()
    complete_one(driver, device)  # entry 2 is exactly the one asked for
    assert device.needs_notify()
    complete_one(driver, device)  # driver has not collected: used_event still 2
    assert not device.needs_notify()


def test_driver_without_event_idx_leaves_used_event_alone() -> None:
    driver, device, ring = pair(event_idx=False)
    complete_one(driver, device)
    driver.get_used()
    assert ring.used_event() == 0


def test_needs_notify_with_event_idx_across_the_16_bit_wrap() -> None:
    memory, buf = make_memory()
    layout = RingLayout.packed_at(0, 4)
    driver = DriverQueue(memory, layout, event_idx=True)
    start_driver_at(driver, 0xFFFE)
    device = DeviceQueue(memory, layout, event_idx=True, next_avail=0xFFFE)
    ring = RawRing(memory, buf, layout)
    complete_one(driver, device)  # used 0xFFFE -> 0xFFFF
    assert device.needs_notify()
    ring.set_used_event(0)
    complete_one(driver, device)  # 0xFFFF -> 0: entry 0xFFFF used, not 0
    assert not device.needs_notify()
    complete_one(driver, device)  # 0 -> 1: entry 0 used
    assert device.needs_notify()


def test_device_fence_runs_before_reading_used_event() -> None:
    calls: list[str] = []
    memory, _ = make_memory()
    layout = RingLayout.packed_at(0, 8)
    driver = DriverQueue(memory, layout, event_idx=True)
    device = DeviceQueue(memory, layout, event_idx=True, fence=lambda: calls.append("fence"))
    complete_one(driver, device)
    device.needs_notify()
    assert calls == ["fence"]


# --- driver -> device kicks -----------------------------------------------------


def test_without_event_idx_driver_kicks_unless_no_notify_is_set() -> None:
    driver, device, ring = pair(event_idx=False)
    driver.add([Buffer(0x1000, 8, True)])
    assert driver.kick_needed()
    device.disable_notifications()
    assert ring.used_flags() & USED_F_NO_NOTIFY
    driver.add([Buffer(0x1000, 8, True)])
    assert not driver.kick_needed()
    assert device.enable_notifications()  # two chains arrived meanwhile: drain again
    assert not ring.used_flags() & USED_F_NO_NOTIFY
    driver.add([Buffer(0x1000, 8, True)])
    assert driver.kick_needed()


def test_without_event_idx_avail_event_is_ignored() -> None:
    driver, device, ring = pair(event_idx=False)
    device.enable_notifications()
    assert ring.avail_event() == 0
    driver.add([Buffer(0x1000, 8, True)])
    driver.add([Buffer(0x1000, 8, True)])
    assert driver.kick_needed()


def test_disable_notifications_keeps_other_used_flag_bits() -> None:
    _, device, ring = pair(event_idx=False)
    ring.buf[ring.layout.used] = 0x80
    device.disable_notifications()
    assert ring.used_flags() == 0x80 | USED_F_NO_NOTIFY
    device.enable_notifications()
    assert ring.used_flags() == 0x80


def test_with_event_idx_driver_kicks_only_when_crossing_avail_event() -> None:
    driver, device, ring = pair(event_idx=True)
    assert not device.enable_notifications()  # avail_event = 0, nothing pending
    assert ring.avail_event() == 0
    driver.add([Buffer(0x1000, 8, True)])
    assert driver.kick_needed()  # entry 0 is the one the device asked about
    driver.add([Buffer(0x2000, 8, True)])
    assert not driver.kick_needed()  # device has not re-armed: no second kick
    assert device.pop() is not None
    assert device.pop() is not None
    assert not device.enable_notifications()  # re-arm at 2, nothing pending
    assert ring.avail_event() == 2
    driver.add([Buffer(0x3000, 8, True)])
    assert driver.kick_needed()


def test_with_event_idx_no_notify_flag_is_ignored_by_the_driver() -> None:
    driver, device, ring = pair(event_idx=True)
    device.disable_notifications()  # a no-op with EVENT_IDX
    assert not ring.used_flags() & USED_F_NO_NOTIFY
    ring.buf[ring.layout.used] = USED_F_NO_NOTIFY  # even if a device sets it anyway
    driver.add([Buffer(0x1000, 8, True)])
    assert driver.kick_needed()


def test_with_event_idx_batch_added_kicks_once_if_avail_event_inside() -> None:
    driver, device, _ = pair(event_idx=True)
    device.enable_notifications()
    for _ in range(3):
        driver.add([Buffer(0x1000, 8, True)])
    assert driver.kick_needed()
    assert not driver.kick_needed()  # nothing added since the last decision


def test_enable_notifications_reports_buffers_that_arrived_meanwhile() -> None:
    driver, device, ring = pair(event_idx=True)
    device.disable_notifications()
    driver.add([Buffer(0x1000, 8, True)])
    assert device.enable_notifications()
    assert ring.avail_event() == 0
    assert device.pop() is not None
    assert not device.enable_notifications()
    assert ring.avail_event() == 1


def test_enable_notifications_fences_before_rechecking_avail() -> None:
    calls: list[str] = []
    memory, _ = make_memory()
    layout = RingLayout.packed_at(0, 8)
    device = DeviceQueue(memory, layout, event_idx=True, fence=lambda: calls.append("fence"))
    device.enable_notifications()
    assert calls == ["fence"]


def test_driver_kick_across_the_16_bit_wrap_with_event_idx() -> None:
    memory, buf = make_memory()
    layout = RingLayout.packed_at(0, 4)
    driver = DriverQueue(memory, layout, event_idx=True)
    start_driver_at(driver, 0xFFFF)
    device = DeviceQueue(memory, layout, event_idx=True, next_avail=0xFFFF)
    ring = RawRing(memory, buf, layout)
    device.enable_notifications()
    assert ring.avail_event() == 0xFFFF
    driver.add([Buffer(0x1000, 8, True)])  # avail 0xFFFF -> 0
    assert driver.kick_needed()
    assert device.pop() is not None
    device.enable_notifications()
    assert ring.avail_event() == 0
    driver.add([Buffer(0x1000, 8, True)])
    assert driver.kick_needed()
