"""A sweep's progress, through rich: on a terminal, a live bar with the point
running, elapsed time and ETA, with a line per finished point above it; on
anything else (a CI log, a file, a pipe), only those lines, nothing redrawn
and no escape codes.

The ETA counts only points run in this invocation: points a resumed sweep
finds already done are neither timed nor left to do. On a cluster it
divides by the most points seen running at once.
"""

from __future__ import annotations

import time
from typing import TextIO

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vhost_balloon.backend.observe.progress_bar import LiveBar, clock, text_console


class SweepProgress(LiveBar):
    def __init__(self, total: int, already_done: int, stream: TextIO) -> None:
        self.total = total
        self.done = already_done
        self.failed = 0
        self._ran = 0
        self._run_seconds = 0.0
        self._running: list[str] = []
        self._parallel = 1  # the most points seen running at once
        self._started = time.monotonic()
        self.console = text_console(stream)
        super().__init__(
            Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("points  elapsed"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                disable=not self.console.is_terminal,
            )
        )
        self._task = self._bar.add_task("sweep", total=total, completed=already_done)
        if already_done:
            self.console.print(f"{already_done} of {total} points already done: resuming")

    def running(self, label: str) -> None:
        """A point started (several may run at once on a cluster)."""
        self._running.append(label)
        self._parallel = max(self._parallel, len(self._running))
        self._describe()

    def note(self, text: str) -> None:
        self.console.print(text)

    def _describe(self) -> None:
        if not self._running:
            description = "sweep"
        elif len(self._running) == 1:
            description = f"running {self._running[0]}"
        else:
            description = f"running {len(self._running)}: {', '.join(self._running)}"
        self._bar.update(self._task, description=description)

    def finished(self, label: str, seconds: float, ok: bool, error: str = "") -> None:
        """A point ran (ok or not): a line, and the bar moves on."""
        self.done += 1
        self._ran += 1
        self._run_seconds += seconds
        if not ok:
            self.failed += 1
        if label in self._running:
            self._running.remove(label)
        self._bar.update(self._task, advance=1)
        self._describe()
        outcome = "ok" if ok else f"FAILED: {error}"
        self.console.print(
            f"point {self.done}/{self.total} {label}: {outcome} ({seconds:.1f} s)  "
            f"elapsed {clock(time.monotonic() - self._started)}  ETA {self.eta()}"
        )

    def eta(self) -> str:
        if self._ran == 0:
            return "?"
        per_point = self._run_seconds / self._ran
        return clock((self.total - self.done) * per_point / self._parallel)
