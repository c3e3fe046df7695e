"""QEMU's shared guest RAM in the host, sampled through a launch, and what
each fill/free round of the guest gave back.

The samples are RssShmem + HugetlbPages of the QEMU process (KiB), taken
every SAMPLE_INTERVAL_S on the launch's clock (monotonic seconds since it
started), the clock the guest console's lines are stamped with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_balloon.backend.qemu.console import GuestConsole

SAMPLE_INTERVAL_S = 0.2
GIVE_BACK_WINDOW_S = 10.0


@dataclass(slots=True)
class MemorySampler:
    """QEMU's shared RAM in the host: RssShmem + HugetlbPages, in KiB."""

    samples: list[tuple[float, int]] = field(default_factory=list)
    pid: int | None = None

    def read(self) -> int | None:
        if self.pid is None:
            return None
        try:
            text = Path(f"/proc/{self.pid}/status").read_text(encoding="ascii")
        except OSError:
            return None
        total = 0
        for line in text.splitlines():
            if line.startswith(("RssShmem:", "HugetlbPages:")):
                total += int(line.split()[1])
        return total

    def sample(self, now: float) -> None:
        value = self.read()
        if value is not None:
            self.samples.append((now, value))

    def on_console_line(self, line: str, now: float) -> None:
        """A fill round's lines (filled, freed) mark the peak and the start
        of the fall, which can lie between two periodic samples (a 2 MiB
        huge page faults in fast): sample at each of them as well."""
        if "VB round=" in line:
            self.sample(now)

    async def run(self, clock: Callable[[], float]) -> None:
        while True:
            self.sample(clock())
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    def between(self, start: float, end: float) -> list[int]:
        return [kib for t, kib in self.samples if start <= t <= end]

    def last_before(self, t: float) -> int | None:
        before = [kib for when, kib in self.samples if when <= t]
        return before[-1] if before else None


def memory_given_back(guest: GuestConsole, sampler: MemorySampler) -> list[dict[str, Any]]:
    """Per round: QEMU's shared RAM when the guest freed, its lowest point
    within GIVE_BACK_WINDOW_S after (before the next fill), the difference."""
    rounds = []
    ordered = sorted(guest.rounds.values(), key=lambda r: r.number)
    for index, state in enumerate(ordered):
        if state.t_freed is None:
            continue
        end = state.t_freed + GIVE_BACK_WINDOW_S
        later = ordered[index + 1].t_fill_start if index + 1 < len(ordered) else None
        for limit in (later, guest.t_end_of_rounds):
            if limit is not None:
                end = min(end, limit)
                break
        start = state.t_filled if state.t_filled is not None else state.t_freed
        at_free = sampler.between(start, state.t_freed) or [
            v for v in [sampler.last_before(state.t_freed)] if v is not None
        ]
        after = sampler.between(state.t_freed, end)
        if not at_free or not after:
            rounds.append({"round": state.number, "freed_mib": state.size_mib})
            continue
        before_kib = max(at_free)
        low_kib = min(after)
        t_low = next(t for t, v in sampler.samples if v == low_kib and t >= state.t_freed)
        entry: dict[str, Any] = {
            "round": state.number,
            "freed_mib": state.size_mib,
            "shared_kib_at_free": before_kib,
            "shared_kib_low": low_kib,
            "given_back_bytes": (before_kib - low_kib) * 1024,
            "seconds_to_low": round(t_low - state.t_freed, 3),
            "window_s": round(end - state.t_freed, 3),
        }
        rounds.append(entry)
    return rounds
