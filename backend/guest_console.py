"""The project's test guest speaks on its console in `VB key=value ...` lines
(qemu-configs/guest-init.sh); this module turns them into facts.

Every line is fed with the host time it arrived (monotonic seconds since the
launch started), so a guest event can be matched with host-side samples.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

PREFIX = "VB "


def parse_vb_line(line: str) -> dict[str, str] | None:
    """The key=value pairs of a `VB ...` line (bare words map to ""), or None."""
    text = line.strip("\r\n")
    start = text.find(PREFIX)
    if start < 0 or text[:start].strip():  # only at the start of a line
        return None
    try:
        words = shlex.split(text[start + len(PREFIX) :])
    except ValueError:
        words = text[start + len(PREFIX) :].split()
    pairs: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        pairs[key] = value
    return pairs


@dataclass(slots=True)
class Round:
    number: int
    size_mib: int = 0
    t_fill_start: float | None = None  # host seconds
    t_filled: float | None = None
    t_freed: float | None = None
    t_paused: float | None = None


@dataclass(slots=True)
class GuestReport:
    duration_us: float
    t_start_mono: float  # the guest's CLOCK_MONOTONIC, seconds


@dataclass(slots=True)
class GuestConsole:
    """What the test guest said, in order."""

    features: int | None = None
    feature_bits: list[int] = field(default_factory=list)
    page_reporting_order: int | None = None
    ftrace: str | None = None
    rounds: dict[int, Round] = field(default_factory=dict)
    integrity_ok: bool | None = None
    reports: list[GuestReport] = field(default_factory=list)
    reports_line: dict[str, str] | None = None
    ftrace_overrun: int | None = None
    done: bool = False
    t_done: float | None = None
    t_end_of_rounds: float | None = None  # host time of the integrity line
    errors: list[str] = field(default_factory=list)
    vb_lines: int = 0

    def feed(self, line: str, t_host: float) -> None:
        """Take one console line; a garbled `VB` line (a printk can land in the
        middle of one on the serial console) is recorded, never raised."""
        try:
            self._feed(line, t_host)
        except (ValueError, KeyError) as error:
            self.errors.append(f"unparseable VB line {line[:120]!r}: {error}")

    def _feed(self, line: str, t_host: float) -> None:
        pairs = parse_vb_line(line)
        if pairs is None:
            return
        self.vb_lines += 1
        if "features" in pairs:
            self.features = int(pairs["features"], 16)
            bits = pairs.get("bits", "")
            self.feature_bits = [int(b) for b in bits.split(",") if b.isdigit()]
            order = pairs.get("page_reporting_order", "")
            self.page_reporting_order = int(order) if order.isdigit() else None
        elif "ftrace" in pairs:
            self.ftrace = pairs["ftrace"]
        elif "round" in pairs:
            self._feed_round(pairs, t_host)
        elif "integrity" in pairs:
            self.integrity_ok = pairs["integrity"] == "ok"
            self.t_end_of_rounds = t_host
        elif "report_us" in pairs:
            self.reports.append(
                GuestReport(float(pairs["report_us"]), float(pairs.get("t_start_mono", "0")))
            )
        elif "reports" in pairs:
            self.reports_line = pairs
        elif "ftrace_overrun" in pairs:
            self.ftrace_overrun = int(pairs["ftrace_overrun"])
        elif "done" in pairs:
            self.done = True
            self.t_done = t_host
        elif "error" in pairs:
            detail = pairs.get("detail", "")
            self.errors.append(pairs["error"] + (f": {detail}" if detail else ""))

    def _feed_round(self, pairs: dict[str, str], t_host: float) -> None:
        number = int(pairs["round"])
        state = self.rounds.setdefault(number, Round(number))
        if "fill_start" in pairs:
            state.t_fill_start = t_host
        elif "filled_mib" in pairs:
            state.size_mib = int(pairs["filled_mib"])
            state.t_filled = t_host
        elif "freed" in pairs:
            state.t_freed = t_host
        elif "paused" in pairs:
            state.t_paused = t_host
