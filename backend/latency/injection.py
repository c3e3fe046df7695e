"""Latency settings and where they act on a report.

`LatencySettings` is one immutable snapshot: delay models per injection
point, the BQL model and the phases that take the lock, mmap contention, the
seed. The server holds the current snapshot and replaces it whole (from the
command line or the control socket); each report reads it once when it
starts, so a change applies from the next report and every trace record says
which snapshot (`version`) it ran under.

`Injector` is per session: it turns the snapshot's models into seeded
samplers (the same seed gives every session the same sequence per point)
and sleeps them exactly, on the queue's own thread (latency/timer.py).

A device sees latency only through `PhaseLatency`, an object around its
phases: `LatencyInjection` (the settings in force, the samplers, the big
lock) or `NO_INJECTION`, the null object, when nothing can be injected.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from vhost_balloon.backend.latency.contention import BigLock, BqlSpec, MmapSpec
from vhost_balloon.backend.latency.delays import DelayModel, DelaySpecError, parse_delay
from vhost_balloon.backend.latency.timer import sleep_exact_ns


class Point(enum.Enum):
    """Where a delay can be injected, in the order a report meets them."""

    KICK = "kick"  # after the kick is seen, before the chains are popped
    REPORT = "report"  # once per report, before its first discard
    ENTRY = "entry"  # before each entry's discard syscall (in the discard thread)
    PUBLISH = "publish"  # after the discards, before the used entry is published
    NOTIFY = "notify"  # after publishing, before the call eventfd is signalled


class BqlPhase(enum.Enum):
    """Report phases QEMU runs under its big lock (virtqueue pop/push/notify)."""

    POP = "pop"
    PUBLISH = "publish"
    NOTIFY = "notify"


ALL_BQL_PHASES = frozenset(BqlPhase)


def parse_delay_option(text: str) -> tuple[Point, DelayModel]:
    """`POINT=MODEL`, e.g. `publish=const:5ms`."""
    point_text, sep, model_text = text.partition("=")
    if not sep:
        raise DelaySpecError(f"bad --delay '{text}': expected POINT=MODEL, e.g. publish=const:5ms")
    try:
        point = Point(point_text.strip())
    except ValueError:
        accepted = ", ".join(p.value for p in Point)
        raise DelaySpecError(
            f"bad --delay '{text}': unknown point '{point_text}'; accepted: {accepted}"
        ) from None
    return point, parse_delay(model_text.strip())


def parse_bql_phases(text: str) -> frozenset[BqlPhase]:
    phases: set[BqlPhase] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            phases.add(BqlPhase(part))
        except ValueError:
            accepted = ", ".join(p.value for p in BqlPhase)
            raise ValueError(f"bad BQL phase '{part}'; accepted: {accepted}") from None
    return frozenset(phases)


@dataclass(frozen=True, slots=True)
class LatencySettings:
    delays: Mapping[Point, DelayModel] = field(default_factory=dict)
    bql: BqlSpec | None = None
    bql_phases: frozenset[BqlPhase] = ALL_BQL_PHASES
    mmap: MmapSpec | None = None
    seed: int = 0
    version: int = 0

    def describe(self) -> dict[str, Any]:
        """What a trace record, the control socket and the demo summary show."""
        return {
            "version": self.version,
            "seed": self.seed,
            "delay": {point.value: model.spec for point, model in self.delays.items()},
            "bql": self.bql.spec if self.bql else None,
            "bql_phases": sorted(phase.value for phase in self.bql_phases),
            "mmap_contention": self.mmap.spec if self.mmap else None,
        }

    def changed(self, **changes: Any) -> LatencySettings:
        """A new snapshot with the next version number."""
        return replace(self, version=self.version + 1, **changes)


class Injector:
    """Per-session samplers for the settings in force; rebuilt when they change."""

    def __init__(self, current: Callable[[], LatencySettings]) -> None:
        self._current = current
        self._version = -1
        self._samplers: dict[Point, Callable[[], int]] = {}

    def begin_report(self) -> LatencySettings:
        """Take the snapshot this report runs under."""
        settings = self._current()
        if settings.version != self._version:
            self._version = settings.version
            self._samplers = {
                point: model.sampler(settings.seed, point.value)
                for point, model in settings.delays.items()
            }
        return settings

    def has(self, point: Point) -> bool:
        return point in self._samplers

    def sample(self, point: Point) -> int:
        sampler = self._samplers.get(point)
        return sampler() if sampler is not None else 0

    def delay(self, point: Point) -> int:
        """Sleep for the point's next sampled delay; the ns actually slept (0 if none)."""
        sampler = self._samplers.get(point)
        if sampler is None:
            return 0
        return sleep_exact_ns(sampler())

    def entry_delays(self, count: int) -> list[int] | None:
        """Sampled per-entry delays for the discard thread, or None."""
        sampler = self._samplers.get(Point.ENTRY)
        if sampler is None:
            return None
        return [sampler() for _ in range(count)]


_T = TypeVar("_T")
_NOTHING_INJECTED = LatencySettings()


class PhaseLatency(abc.ABC):
    """What a device asks of latency injection, phase by phase of one chain.

    Every method runs on the queue's own thread, and blocks it: a delay
    sleeps, a locked phase waits for the big lock.
    """

    @abc.abstractmethod
    def begin_report(self) -> LatencySettings:
        """The snapshot this report runs under (read once, as it starts)."""

    @abc.abstractmethod
    def has(self, point: Point) -> bool: ...

    @abc.abstractmethod
    def delay(self, point: Point) -> int:
        """Sleep for the point's next delay; the ns actually slept (0 if none)."""

    @abc.abstractmethod
    def entry_delays(self, count: int) -> list[int] | None:
        """Per-entry delays for the discard thread, or None."""

    @abc.abstractmethod
    def locked(
        self, latency: LatencySettings, phase: BqlPhase, action: Callable[[], _T]
    ) -> tuple[_T, int]:
        """Run a ring phase, under the big lock if `latency` models the BQL for
        it; its result and the ns waited for the lock."""


class NoInjection(PhaseLatency):
    """The null object: nothing is delayed, no lock is taken."""

    def begin_report(self) -> LatencySettings:
        return _NOTHING_INJECTED

    def has(self, point: Point) -> bool:
        return False

    def delay(self, point: Point) -> int:
        return 0

    def entry_delays(self, count: int) -> list[int] | None:
        return None

    def locked(
        self, latency: LatencySettings, phase: BqlPhase, action: Callable[[], _T]
    ) -> tuple[_T, int]:
        return action(), 0


NO_INJECTION = NoInjection()


class LatencyInjection(PhaseLatency):
    """The settings in force (read through `current`), one session's samplers,
    and the big lock its BQL phases contend for."""

    def __init__(self, current: Callable[[], LatencySettings], big_lock: BigLock) -> None:
        self._injector = Injector(current)
        self._big_lock = big_lock

    def begin_report(self) -> LatencySettings:
        return self._injector.begin_report()

    def has(self, point: Point) -> bool:
        return self._injector.has(point)

    def delay(self, point: Point) -> int:
        return self._injector.delay(point)

    def entry_delays(self, count: int) -> list[int] | None:
        return self._injector.entry_delays(count)

    def locked(
        self, latency: LatencySettings, phase: BqlPhase, action: Callable[[], _T]
    ) -> tuple[_T, int]:
        if latency.bql is None or phase not in latency.bql_phases:
            return action(), 0
        waited = self._big_lock.acquire_blocking()
        try:
            return action(), waited
        finally:
            self._big_lock.release()
