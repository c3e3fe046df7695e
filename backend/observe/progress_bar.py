"""What a sweep's progress and a launch's share: a rich console that prints
text (labels and errors such as "[s1] queue 0 broken" are not markup), a
rich Progress started and stopped by a with block, and minutes:seconds."""

from __future__ import annotations

from types import TracebackType
from typing import Self, TextIO

from rich.console import Console
from rich.progress import Progress


def clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def text_console(stream: TextIO) -> Console:
    return Console(file=stream, soft_wrap=True, highlight=False, markup=False)


class LiveBar:
    """A rich Progress, live from `with` to its end (a no-op when disabled)."""

    def __init__(self, bar: Progress) -> None:
        self._bar = bar

    def __enter__(self) -> Self:
        self._bar.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._bar.stop()
