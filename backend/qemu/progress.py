"""How far a launch's workload has got, through rich: on a terminal a live
bar (the step, elapsed time, ETA) under the streamed console; anywhere else
(a CI log, --json to a pipe) one plain line per step done, no escape codes.

A step is a round (fill, pattern), or a second of the loop (gigantic); the
balloon workload names its phase. Before the workload starts: booting.
"""

from __future__ import annotations

import math
from typing import TextIO

from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vhost_balloon.backend.observe.progress_bar import LiveBar, clock, text_console
from vhost_balloon.backend.qemu.command import TIMED_LOOPS
from vhost_balloon.backend.qemu.console import GuestConsole

GIGANTIC_LINE_EVERY_S = 10  # plain output: a line per this much of the loop


def workload_steps(
    workload: str, rounds: int, guest: GuestConsole, now: float
) -> tuple[float, float | None, str]:
    """(steps done, steps in all or None if unknown, what it is doing)."""
    if workload in TIMED_LOOPS:
        run = guest.gigantic
        if run is None or run.t_loop_start is None or run.duration_s is None:
            return 0, None, "booting" if guest.workload is None else "settling"
        total = float(run.duration_s)
        if run.t_loop_end is not None:
            return total, total, "loop done"
        done = min(max(now - run.t_loop_start, 0.0), total)
        return done, total, f"loop {done:.0f}/{total:.0f} s"
    if workload == "pattern":
        done_rounds = len(guest.pattern.rounds) if guest.pattern is not None else 0
        label = "booting" if guest.workload is None else f"round {done_rounds + 1}/{rounds}"
        return min(done_rounds, rounds), rounds, label if done_rounds < rounds else "checking"
    if workload == "balloon":
        phase = next(reversed(guest.balloon_phases), None)
        return 0, None, "booting" if phase is None else f"balloon {phase}"
    done_rounds = sum(1 for r in guest.rounds.values() if r.t_paused is not None)
    if guest.workload is None:
        return 0, rounds, "booting"
    label = f"round {done_rounds + 1}/{rounds}" if done_rounds < rounds else "finishing"
    return min(done_rounds, rounds), rounds, label


class LaunchProgress(LiveBar):
    def __init__(self, workload: str, rounds: int, stream: TextIO, console_out: TextIO) -> None:
        """stream: where progress goes (stderr); console_out: where the guest's
        console goes. The bar is live only when both are terminals: the
        console is then printed above it, through rich, on `stream`."""
        self.workload = workload
        self.rounds = rounds
        self.console = text_console(stream)
        self.live = self.console.is_terminal and console_out.isatty()
        super().__init__(
            Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                TextColumn("elapsed"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
                disable=not self.live,
            )
        )
        self._task = self._bar.add_task("booting", total=None)
        self._printed_step = 0
        self._started_at: float | None = None  # when the workload began

    def console_line(self, stamped: str) -> None:
        """A console line, printed above the live bar."""
        self.console.print(stamped, end="")

    def update(self, guest: GuestConsole, now: float) -> None:
        done, total, label = workload_steps(self.workload, self.rounds, guest, now)
        self._bar.update(self._task, completed=done, total=total, description=label)
        if label not in ("booting", "settling") and self._started_at is None:  # steps begin
            self._started_at = now
        if self.live or total is None:
            return
        # Plain output: a line per step done (gigantic: per 10 s of its loop).
        every = GIGANTIC_LINE_EVERY_S if self.workload in TIMED_LOOPS else 1
        step = math.floor(done / every)
        if step > self._printed_step:
            self._printed_step = step
            unit = "s of the loop" if self.workload in TIMED_LOOPS else "rounds"
            self.console.print(
                f"launch: {done:.0f} of {total:.0f} {unit} done{self._eta(done, total, now)}"
            )

    def _eta(self, done: float, total: float | None, now: float) -> str:
        if total is None or self._started_at is None or done <= 0:
            return ""
        elapsed = now - self._started_at
        return f", elapsed {clock(elapsed)}, ETA {clock((total - done) * elapsed / done)}"
