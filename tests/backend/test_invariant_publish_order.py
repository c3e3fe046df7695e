"""Invariant 1: a report's used entry is published, and the driver signalled,
only after every discard of the report has returned; the same for an
inflate chain and the discards of its pages.

Each test holds the report at one gate (the discard syscall itself, each
injection point, each BQL phase) and checks what the guest can see while it
is held: the used index, the call signals, and the host's hold on the
reported pages. A device that publishes early, or signals before it
publishes, fails here by name rather than by luck elsewhere.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest

from tests.backend.device_rig import MiB, Rig, reporting_rig
from vhost_balloon.backend.balloon import discard as discard_module
from vhost_balloon.backend.balloon.device import BalloonSettings
from vhost_balloon.backend.balloon.discard import DiscardStrategy, DiscardTarget
from vhost_balloon.backend.latency.injection import BqlPhase, LatencySettings, PhaseLatency, Point

ENTRIES = 4
LENGTH = 2 * MiB
GATE_TIMEOUT_S = 20.0
# While the report is held, the loop runs this long: a device that publishes
# from another task or thread gets every chance to do it.
HELD_S = 0.05
DISCARDING = [s for s in DiscardStrategy if s is not DiscardStrategy.NONE]
# The queues whose chains are discarded before they are used.
DISCARDING_QUEUES = ["reporting", "inflate"]

_T = TypeVar("_T")


class Gate:
    """A point the report stops at until the test opens it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def hold_thread(self) -> None:
        self.reached.set()
        assert self.opened.wait(GATE_TIMEOUT_S), "gate never opened"

    async def wait_reached(self) -> None:
        reached = await asyncio.to_thread(self.reached.wait, GATE_TIMEOUT_S)
        assert reached, "the report never reached the gate"


class GatedLatency(PhaseLatency):
    """Injects a 1 ns delay at one point, or wraps one BQL phase, and holds
    the report there at the gate."""

    def __init__(self, gate: Gate, point: Point | None = None, phase: BqlPhase | None = None):
        self.gate = gate
        self.point = point
        self.phase = phase

    def begin_report(self) -> LatencySettings:
        return LatencySettings()

    def has(self, point: Point) -> bool:
        return point is self.point

    def delay(self, point: Point) -> int:
        if point is not self.point:
            return 0
        self.gate.hold_thread()
        return 1

    def entry_delays(self, count: int) -> list[int] | None:
        return [1] * count if self.point is Point.ENTRY else None

    def locked(
        self, latency: LatencySettings, phase: BqlPhase, action: Callable[[], _T]
    ) -> tuple[_T, int]:
        if phase is self.phase:
            self.gate.hold_thread()
        return action(), 0


@dataclass
class Discards:
    """The discard syscalls that have returned (counted on the queue's thread)."""

    done: int = 0


@pytest.fixture
def discards(monkeypatch: pytest.MonkeyPatch) -> Discards:
    counted = Discards()
    real = discard_module._discard_one

    def counting(strategy: DiscardStrategy, target: DiscardTarget) -> None:
        real(strategy, target)
        counted.done += 1

    monkeypatch.setattr(discard_module, "_discard_one", counting)
    return counted


@dataclass(frozen=True)
class Seen:
    """What the guest and host could observe while the report was held."""

    discarded: bool
    published: bool
    notified: bool


def _seen(rig: Rig, discards: Discards, strategy: DiscardStrategy) -> Seen:
    discarded = discards.done == ENTRIES
    if strategy in (DiscardStrategy.PUNCH_HOLE, DiscardStrategy.MADV_REMOVE):
        # These really free the pages: the host's hold must agree with the count.
        assert (rig.reported_bytes_held() == 0) == discarded
    return Seen(discarded, rig.used > 0, rig.notifications > 0)


async def _held_then_released(
    rig: Rig, gate: Gate, discards: Discards, strategy: DiscardStrategy
) -> Seen:
    """Post one report, kick, observe it at the gate, open the gate, finish."""
    head = rig.post_report(ENTRIES, LENGTH)
    assert rig.reported_bytes_held() == ENTRIES * LENGTH
    # On a thread of its own, as a queue thread runs it.
    task = asyncio.ensure_future(asyncio.to_thread(rig.device.process_queue, rig.handle, 0))
    try:
        await gate.wait_reached()
        await asyncio.sleep(HELD_S)
        seen = _seen(rig, discards, strategy)
    finally:
        gate.opened.set()
        await asyncio.wait_for(task, GATE_TIMEOUT_S)
    # Released: published once, after every discard, then signalled.
    assert rig.used_heads() == [head]
    assert rig.notifications == 1
    assert discards.done == ENTRIES
    if strategy in (DiscardStrategy.PUNCH_HOLE, DiscardStrategy.MADV_REMOVE):
        assert rig.held_at_push == [0], "published while the host still held reported pages"
    (record,) = rig.records
    assert record.t_discard_done_ns <= record.t_published_ns <= record.t_notified_ns
    return seen


@pytest.mark.parametrize("queue", DISCARDING_QUEUES)
@pytest.mark.parametrize("strategy", DISCARDING, ids=lambda s: s.value)
async def test_nothing_is_published_or_signalled_while_a_discard_is_held(
    queue: str, strategy: DiscardStrategy, discards: Discards, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate()
    counting = discard_module._discard_one

    def held_discard(strategy: DiscardStrategy, target: DiscardTarget) -> None:
        if discards.done == ENTRIES - 1:  # hold the last syscall of the report
            gate.hold_thread()
        counting(strategy, target)

    monkeypatch.setattr(discard_module, "_discard_one", held_discard)
    with reporting_rig(settings=BalloonSettings(discard=strategy), kind=queue) as rig:
        assert rig.device.queues.name(rig.handle.index) == queue
        seen = await _held_then_released(rig, gate, discards, strategy)
    assert seen == Seen(discarded=False, published=False, notified=False)


# What may already have happened while a report is held at each point.
AT_POINT = {
    Point.KICK: Seen(discarded=False, published=False, notified=False),
    Point.REPORT: Seen(discarded=False, published=False, notified=False),
    Point.ENTRY: Seen(discarded=False, published=False, notified=False),
    Point.PUBLISH: Seen(discarded=True, published=False, notified=False),
    Point.NOTIFY: Seen(discarded=True, published=True, notified=False),
}
AT_PHASE = {
    BqlPhase.POP: Seen(discarded=False, published=False, notified=False),
    BqlPhase.PUBLISH: Seen(discarded=True, published=False, notified=False),
    BqlPhase.NOTIFY: Seen(discarded=True, published=True, notified=False),
}


def test_every_injection_point_and_bql_phase_is_covered() -> None:
    assert set(AT_POINT) == set(Point)
    assert set(AT_PHASE) == set(BqlPhase)


@pytest.mark.parametrize("queue", DISCARDING_QUEUES)
@pytest.mark.parametrize("point", list(AT_POINT), ids=lambda p: p.value)
@pytest.mark.parametrize("strategy", DISCARDING, ids=lambda s: s.value)
async def test_a_report_held_at_an_injection_point_is_not_published_early(
    queue: str,
    point: Point,
    strategy: DiscardStrategy,
    discards: Discards,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate()
    if point is Point.ENTRY:
        # Per-entry delays sleep in the discard loop: hold the last one.
        sleeps = 0

        def held_sleep(duration_ns: int) -> int:
            nonlocal sleeps
            sleeps += 1
            if sleeps == ENTRIES:
                gate.hold_thread()
            return duration_ns

        monkeypatch.setattr(discard_module, "sleep_exact_ns", held_sleep)
    latency = GatedLatency(gate, point=point)
    with reporting_rig(latency, BalloonSettings(discard=strategy), kind=queue) as rig:
        seen = await _held_then_released(rig, gate, discards, strategy)
    assert seen == AT_POINT[point]


@pytest.mark.parametrize("queue", DISCARDING_QUEUES)
@pytest.mark.parametrize("phase", list(AT_PHASE), ids=lambda p: p.value)
async def test_a_report_waiting_for_the_bql_is_not_published_early(
    queue: str, phase: BqlPhase, discards: Discards
) -> None:
    gate = Gate()
    with reporting_rig(GatedLatency(gate, phase=phase), kind=queue) as rig:
        seen = await _held_then_released(rig, gate, discards, DiscardStrategy.PUNCH_HOLE)
    assert seen == AT_PHASE[phase]
