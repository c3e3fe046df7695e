"""The modelled guest kernel: free lists, free page reporting and contiguous
allocations, driven over vhost-user against a real backend.

    summary = await run_model(GuestOptions(socket_path=path, memory_bytes=2 << 30),
                              ModelConfig(duration_s=20), out_dir=Path("point"))

The mocked front-end and driver (guest/runner.py) carry every report: the
pass model picks the blocks, the driver posts them as one chain, and the
pages stay `HELD` until the used entry is seen, so the backend's real timing
(its discard, its injected delays) decides how long they are out of the
allocator. Meanwhile contiguous allocations arrive as a Poisson process
(and an optional churn workload allocates and frees movable memory); both
run on the same event loop, so an attempt sees exactly what is held at
that moment.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vhost_balloon.guest.contig import (
    AttemptResult,
    ContigConfig,
    Outcome,
    attempt,
    blocked_by_reports,
    candidate_ranges,
    free_range,
)
from vhost_balloon.guest.errors import ConfigError, DriverError
from vhost_balloon.guest.freelists import (
    PAGEBLOCK_BYTES,
    PAGEBLOCK_ORDER,
    FreeArea,
    FreeBlock,
    pageblocks,
)
from vhost_balloon.guest.page_reporting import PageReporting, ReportingConfig
from vhost_balloon.guest.runner import GuestOptions, MockGuest
from vhost_balloon.protocol.units import two_columns
from vhost_balloon.protocol.virtqueue import Buffer

FILL = 0x5A
STOP_TIMEOUT_S = 30.0
MAX_MODEL_S = 86_400.0  # a day: any longer time in a model run is a typo
MIN_CHURN_S = 0.001


@dataclass(frozen=True, slots=True)
class ChurnConfig:
    """Movable memory allocated every `every_s`, kept `hold_s`, then freed."""

    size: int
    every_s: float
    hold_s: float

    def validate(self) -> None:
        if self.size < PAGEBLOCK_BYTES or self.size % PAGEBLOCK_BYTES:
            raise ConfigError(f"churn size must be a multiple of 2 MiB, got {self.size}")
        # Faster than this, the churn task alone would keep the event loop busy.
        if not MIN_CHURN_S <= self.every_s <= MAX_MODEL_S:
            raise ConfigError(
                f"churn every {self.every_s:g} s is outside {MIN_CHURN_S:g}..{MAX_MODEL_S:g} s"
            )
        if not MIN_CHURN_S <= self.hold_s <= MAX_MODEL_S:
            raise ConfigError(
                f"churn hold {self.hold_s:g} s is outside {MIN_CHURN_S:g}..{MAX_MODEL_S:g} s "
                "(memory freed at once is no workload)"
            )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    duration_s: float = 20.0
    reporting: ReportingConfig = field(default_factory=ReportingConfig)
    contig: ContigConfig = field(default_factory=ContigConfig)
    churn: ChurnConfig | None = None
    reserved_bytes: int = 64 << 20  # the kernel image and early allocations, at 0
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.duration_s <= MAX_MODEL_S:
            raise ConfigError(
                f"the model's duration {self.duration_s:g} s is outside 0..{MAX_MODEL_S:g} s"
            )
        if self.reserved_bytes < 0:
            raise ConfigError("reserved memory cannot be negative")
        try:
            self.reporting.validate()
            self.contig.validate()
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.churn is not None:
            self.churn.validate()


@dataclass(slots=True)
class HeldReport:
    """One report as the model saw it: what it held and for how long."""

    seq: int
    pageblocks: list[tuple[int, int]]  # (start, order)
    t_start_ns: int  # pulled off the free lists
    t_available_ns: int = 0
    t_used_ns: int = 0
    t_end_ns: int = 0  # put back
    overlaps_target: bool = False
    pass_index: int = -1  # which reporting pass sent it

    @property
    def bytes(self) -> int:
        return sum(pageblocks(order) for _, order in self.pageblocks) * PAGEBLOCK_BYTES

    @property
    def hold_ns(self) -> int:
        """The hold window as the driver saw it: chain made available .. used entry seen."""
        return self.t_used_ns - self.t_available_ns

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"bytes": self.bytes, "hold_ns": self.hold_ns}


@dataclass(slots=True)
class AttemptRecord:
    t_ns: int
    request: int
    retry: int
    outcome: str
    start: int | None
    first_busy: int | None
    held_by: int | None  # seq of the report holding first_busy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelGuest:
    """Free lists + reporting + allocations over one MockGuest connection."""

    def __init__(self, guest: MockGuest, config: ModelConfig) -> None:
        self.guest = guest
        self.config = config
        self.rng = random.Random(config.seed)
        memory = guest.options.memory_bytes
        layout = guest.driver.layout
        reserved_end = max(layout.integrity_end, config.reserved_bytes)
        reserved = range(0, -(-reserved_end // PAGEBLOCK_BYTES))
        self.area = FreeArea.boot(memory // PAGEBLOCK_BYTES, reserved)
        self.reporting = PageReporting(self.area, config.reporting, self._report)
        self.targets = [
            candidate
            for candidate in candidate_ranges(self.area, config.contig)
            if candidate.start >= reserved.stop
        ]
        self.reports: list[HeldReport] = []
        self.attempts: list[AttemptRecord] = []
        self.held_series: list[tuple[int, int]] = []  # (t_ns, bytes held)
        self._held_bytes = 0
        self._in_flight: HeldReport | None = None
        self._churn: list[list[int]] = []
        self._fill = bytes([FILL]) * PAGEBLOCK_BYTES
        self.t_start_ns = 0
        self.t_end_ns = 0
        # Intervals (monotonic ns) when no attempt can arrive (a success being
        # kept, a failure's cost, a backoff), and when one would fail because
        # reports hold part of every valid range: the time-held prediction.
        self.closed: list[tuple[int, int]] = []
        self.blocked: list[tuple[int, int]] = []
        self._blocked_since: int | None = None

    # -------------------------------------------------------------- reporting
    async def _report(self, blocks: list[FreeBlock]) -> bool:
        held = HeldReport(
            len(self.reports), [(b.start, b.order) for b in blocks], time.monotonic_ns()
        )
        held.pass_index = len(self.reporting.passes) - 1
        held.overlaps_target = any(
            _overlaps(block, target) for block in blocks for target in self.targets
        )
        self.reports.append(held)
        self._in_flight = held
        self._held(held.bytes)
        self._update_blocked()
        buffers = [
            Buffer(b.start * PAGEBLOCK_BYTES, PAGEBLOCK_BYTES * pageblocks(b.order), True)
            for b in blocks
        ]
        try:
            submitted = await self.guest.driver.submit(buffers)
        finally:
            held.t_end_ns = time.monotonic_ns()
            self._in_flight = None
            self._held(-held.bytes)
            # The pass puts the blocks back right after this returns.
            asyncio.get_running_loop().call_soon(self._update_blocked)
        held.t_available_ns, held.t_used_ns = submitted.available_ns, submitted.used_ns
        return True

    def _update_blocked(self) -> None:
        now = time.monotonic_ns()
        blocked = blocked_by_reports(self.area, self.config.contig)
        if blocked and self._blocked_since is None:
            self._blocked_since = now
        elif not blocked and self._blocked_since is not None:
            self.blocked.append((self._blocked_since, now))
            self._blocked_since = None

    def predicted_failure_rate(self) -> float:
        """The fraction of the time attempts could arrive during which one
        would have failed for held blocks: what Poisson arrivals would see,
        were attempts and reporting independent."""
        start, end = self.t_start_ns, self.t_end_ns
        blocked = list(self.blocked)
        if self._blocked_since is not None:
            blocked.append((self._blocked_since, end))
        closed = _clip(self.closed, start, end)
        blocked = _clip(blocked, start, end)
        open_ns = (end - start) - _measure(closed)
        if open_ns <= 0:
            return 0.0
        return (_measure(blocked) - _overlap(blocked, closed)) / open_ns

    def _held(self, delta: int) -> None:
        self._held_bytes += delta
        self.held_series.append((time.monotonic_ns(), self._held_bytes))

    def _freed(self, orders: list[int]) -> None:
        for order in orders:
            self.reporting.notify_free(order)

    # ---------------------------------------------------------- allocations
    async def allocations(self) -> None:
        contig = self.config.contig
        request = 0
        while True:
            await asyncio.sleep(self.rng.expovariate(contig.rate))
            result = self._try(request, 0)
            backoff = contig.backoff_s
            for retry in range(1, contig.retries + 1):
                if result.ok:
                    break
                await self._closed(contig.cost_s + backoff)
                backoff *= 2
                result = self._try(request, retry)
            request += 1
            if result.ok and result.start is not None:
                await self._use_and_free(result.start)
            elif contig.cost_s:
                await self._closed(contig.cost_s)

    async def _closed(self, seconds: float) -> None:
        """Wait while no attempt can arrive; the time-held prediction leaves it out."""
        began = time.monotonic_ns()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.closed.append((began, time.monotonic_ns()))

    def _try(self, request: int, retry: int) -> AttemptResult:
        result = attempt(self.area, self.config.contig)
        held_by = None
        if result.first_busy is not None and self._in_flight is not None:
            for start, order in self._in_flight.pageblocks:
                if start <= result.first_busy < start + pageblocks(order):
                    held_by = self._in_flight.seq
        for old, new in result.moved:
            for blocks in self._churn:
                blocks[:] = [new if index == old else index for index in blocks]
        self.attempts.append(
            AttemptRecord(
                time.monotonic_ns(),
                request,
                retry,
                result.outcome.value,
                result.start,
                result.first_busy,
                held_by,
            )
        )
        return result

    async def _use_and_free(self, start: int) -> None:
        contig = self.config.contig
        began = time.monotonic_ns()
        self._update_blocked()  # the range is taken: no longer free to hold
        try:
            if contig.touch:
                for index in range(start, start + contig.size_pageblocks):
                    self._touch(index)
                    await asyncio.sleep(0)  # 2 MiB at a time: reports keep flowing
            await asyncio.sleep(contig.hold_s)
        finally:
            self.closed.append((began, time.monotonic_ns()))
        self._freed(free_range(self.area, start, contig.size_pageblocks))
        self._update_blocked()

    def _touch(self, index: int) -> None:
        mapping, offset = self.guest.ram.locate(index * PAGEBLOCK_BYTES, PAGEBLOCK_BYTES)
        mapping[offset : offset + PAGEBLOCK_BYTES] = self._fill

    async def churn(self, churn: ChurnConfig) -> None:
        while True:
            await asyncio.sleep(churn.every_s)
            blocks: list[int] = []
            self._churn.append(blocks)  # from the start: a migration may move its blocks
            for _ in range(churn.size // PAGEBLOCK_BYTES):
                index = self.area.allocate(PAGEBLOCK_ORDER)
                if index is None:
                    break
                self._touch(index)
                blocks.append(index)
                await asyncio.sleep(0)  # 2 MiB at a time: reports keep flowing
            asyncio.get_running_loop().call_later(churn.hold_s, self._free_churn, blocks)

    def _free_churn(self, blocks: list[int]) -> None:
        self._churn.remove(blocks)
        self._freed([self.area.release(index).order for index in blocks])

    # -------------------------------------------------------------------- run
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.t_start_ns = time.monotonic_ns()
        self.reporting.request()  # page_reporting_register: the initial flush
        tasks = [loop.create_task(self.allocations())]
        if self.config.churn is not None:
            tasks.append(loop.create_task(self.churn(self.config.churn)))
        watched = [*tasks, loop.create_task(self.reporting.failed.wait())]
        try:
            # Ends early when reporting fails or a workload task crashes.
            await asyncio.wait(
                watched, timeout=self.config.duration_s, return_when=asyncio.FIRST_COMPLETED
            )
            if self.reporting.error is not None:
                raise self.reporting.error
        finally:
            for task in watched:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            self.t_end_ns = time.monotonic_ns()
            limit = max(STOP_TIMEOUT_S, self.guest.options.driver.report_timeout + 5)
            try:
                await asyncio.wait_for(self.reporting.stop(), limit)
            except TimeoutError:
                raise DriverError(
                    f"the report in flight did not come back within {limit:g} s of the end"
                ) from None
        if self.reporting.error is not None:  # failed while stopping
            raise self.reporting.error
        for outcome in outcomes:  # a workload that crashed is not a measurement
            if isinstance(outcome, Exception):
                raise outcome

    # ---------------------------------------------------------------- results
    def summary(self) -> dict[str, Any]:
        attempts = self.attempts
        failures = [a for a in attempts if a.outcome != Outcome.OK.value]
        requests: dict[int, list[AttemptRecord]] = {}
        for item in attempts:
            requests.setdefault(item.request, []).append(item)
        succeeded = [tries for tries in requests.values() if tries[-1].outcome == "ok"]
        retries_needed: dict[str, int] = {}
        for tries in succeeded:
            key = str(len(tries) - 1)
            retries_needed[key] = retries_needed.get(key, 0) + 1
        by_outcome: dict[str, int] = {}
        for item in attempts:
            by_outcome[item.outcome] = by_outcome.get(item.outcome, 0) + 1
        span = max(self.t_end_ns - self.t_start_ns, 1)
        holds = [r.hold_ns for r in self.reports if r.t_used_ns]
        return {
            "model": "freelists",
            "duration_s": round(span / 1e9, 3),
            "attempts": len(attempts),
            "failures": len(failures),
            "failure_rate": len(failures) / len(attempts) if attempts else 0.0,
            "outcomes": by_outcome,
            "requests": len(requests),
            "requests_failed": len(requests) - len(succeeded),
            "retries_needed": retries_needed,
            "attributed_failures": sum(1 for a in failures if a.held_by is not None),
            # Failures cluster per pass: the independent samples are passes.
            "passes_with_failures": len(
                {self.reports[a.held_by].pass_index for a in failures if a.held_by is not None}
            ),
            "target_held_fraction": self.target_held_ns() / span,
            "predicted_failure_rate": self.predicted_failure_rate(),
            "reports": len(self.reports),
            "target_reports": sum(1 for r in self.reports if r.overlaps_target),
            "reported_bytes": sum(r.bytes for r in self.reports),
            "hold_ns": sorted(holds),
            "passes": len(self.reporting.passes),
            "pass_reports": [p.reports for p in self.reporting.passes],
            "free_bytes_end": self.area.free_pageblocks() * PAGEBLOCK_BYTES,
            "reported_bytes_end": self.area.reported_pageblocks() * PAGEBLOCK_BYTES,
            "targets": [
                [t.start * PAGEBLOCK_BYTES, len(t) * PAGEBLOCK_BYTES] for t in self.targets
            ],
            "seed": self.config.seed,
        }

    def target_held_ns(self) -> int:
        """Time, within the run, during which a report overlapping a target range held pages."""
        total = 0
        for report in self.reports:
            if report.overlaps_target:
                end = report.t_end_ns or self.t_end_ns
                total += max(0, min(end, self.t_end_ns) - max(report.t_start_ns, self.t_start_ns))
        return total

    def write_logs(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_jsonl(out_dir / "reports.jsonl", (r.to_dict() for r in self.reports))
        _write_jsonl(out_dir / "attempts.jsonl", (a.to_dict() for a in self.attempts))
        _write_jsonl(out_dir / "held.jsonl", ({"t_ns": t, "bytes": b} for t, b in self.held_series))


def _overlaps(block: FreeBlock, target: range) -> bool:
    return block.start < target.stop and target.start < block.start + pageblocks(block.order)


def _clip(intervals: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """Sorted, merged and cut to [start, end)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted((max(a, start), min(b, end)) for a, b in intervals):
        if high <= low:
            continue
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _measure(intervals: list[tuple[int, int]]) -> int:
    return sum(high - low for low, high in intervals)


def _overlap(first: list[tuple[int, int]], second: list[tuple[int, int]]) -> int:
    """Total overlap of two sorted lists of disjoint intervals."""
    total = i = j = 0
    while i < len(first) and j < len(second):
        low = max(first[i][0], second[j][0])
        high = min(first[i][1], second[j][1])
        total += max(0, high - low)
        if first[i][1] < second[j][1]:
            i += 1
        else:
            j += 1
    return total


def _write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")


async def run_model(
    options: GuestOptions, config: ModelConfig, *, out_dir: Path | None = None
) -> dict[str, Any]:
    """Connect, run the model for its duration, stop the device; the JSON summary."""
    config.validate()
    if options.regions != 1:
        # The free area is one zone over [0, memory): a second region would
        # put guest-RAM holes inside it.
        raise ConfigError("the free-list model runs over one memory region (--regions 1)")
    async with MockGuest(options) as guest:
        model = ModelGuest(guest, config)
        if not model.targets:
            raise ConfigError(
                f"no {config.contig.size >> 20} MiB range aligned to {config.contig.align >> 20} "
                f"MiB lies outside the reserved {config.reserved_bytes >> 20} MiB of a "
                f"{options.memory_bytes >> 20} MiB guest: give it more memory"
            )
        await model.run()
        summary = model.summary()
    summary |= {"memory_bytes": options.memory_bytes, "capacity": options.driver.capacity}
    if out_dir is not None:
        model.write_logs(out_dir)
    return summary


def format_model(summary: dict[str, Any]) -> str:
    """The model's summary as a short table."""
    holds = summary["hold_ns"]
    p50 = holds[len(holds) // 2] / 1e6 if holds else 0.0
    rows = [
        ("attempts", str(summary["attempts"])),
        ("failures", f"{summary['failures']} ({100 * summary['failure_rate']:.1f} %)"),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in sorted(summary["outcomes"].items()))),
        ("requests failed", f"{summary['requests_failed']} of {summary['requests']}"),
        ("target held", f"{100 * summary['target_held_fraction']:.1f} % of the time"),
        ("reports", f"{summary['reports']} ({summary['target_reports']} over the target)"),
        ("report hold p50", f"{p50:.2f} ms"),
        ("passes", str(summary["passes"])),
    ]
    return two_columns(rows)
