"""The project's test guest speaks on its console in `VB key=value ...` lines
(qemu-configs/guest-init.sh); this module turns them into facts.

Every line is fed with the host time it arrived (monotonic seconds since the
launch started), so a guest event can be matched with host-side samples.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

PREFIX = "VB "


def _blocks(text: str) -> list[int]:
    """A guest's list of memory block numbers ("8,9,10" or "none"), sorted."""
    return sorted(int(n) for n in text.split(",") if n.isdigit())


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
    fill_us: float | None = None  # the allocate-and-touch, on ftrace's clock


@dataclass(slots=True)
class GuestReport:
    duration_us: float
    t_start_mono: float  # the guest's CLOCK_MONOTONIC, seconds


@dataclass(frozen=True, slots=True)
class GiganticAttempt:
    """One try at a 1 GiB hugetlb page (`VB gigantic_attempt`): guest
    CLOCK_MONOTONIC seconds from the trace markers written around it."""

    index: int  # from 1
    t_mono: float
    t_end_mono: float | None
    ok: bool  # nr_hugepages read back as 1 (offline: the block went offline)
    test: str  # the isolation test's verdict: "success", "fail" or "none" (not reached)
    retries: int = 0  # failed isolation tests in it (offline_pages() retries)
    block: int | None = None  # offline: the memory block


@dataclass(frozen=True, slots=True)
class IsolationEvent:
    """One `page_isolation:test_pages_isolated` event (`VB gigantic_event`)."""

    t_mono: float
    start_pfn: int
    end_pfn: int
    fin_pfn: int  # the first busy pfn when the test failed (end_pfn on success)
    ok: bool  # ret=success
    attempt: int  # the attempt it belongs to (0: before the loop)


@dataclass(slots=True)
class GiganticRun:
    """What the gigantic workload said (qemu-configs/guest-init.sh)."""

    trace: str | None = None  # "on" or "unavailable"
    settle_s: int | None = None
    duration_s: int | None = None
    t_loop_start: float | None = None  # host seconds
    t_loop_end: float | None = None
    attempts: int | None = None  # counted by the loop itself
    failures: int | None = None
    isolation_failures: int | None = None
    events_count: int | None = None
    t_start_mono: float | None = None  # the loop, on the guest's clock
    t_end_mono: float | None = None
    attempt_list: list[GiganticAttempt] = field(default_factory=list)
    events: list[IsolationEvent] = field(default_factory=list)
    t_loop_start_guest: float | None = None  # the same instant, guest uptime s (= mono)
    op: str = "gigantic"  # what an attempt is: a 1 GiB page, or "offline" (a memory block)
    movable_gigantic_pages: str | None = None  # the sysctl, or "absent" (6.12)
    block_mib: int | None = None  # the guest's memory block size
    offline_usable: list[int] | None = None  # offline: the blocks the loop offlines
    offline_refused: list[int] | None = None  # offline: those that never go offline
    zone_blocks: dict[str, list[int]] = field(default_factory=dict)  # zone -> online blocks


@dataclass(slots=True)
class PatternRun:
    """What the pattern workload said: its rounds and its totals."""

    rounds: list[dict[str, int]] = field(default_factory=list)
    bad_files: list[dict[str, int]] = field(default_factory=list)  # the first 100
    totals: dict[str, int] | None = None  # rounds, files, checked_mib, corrupted_pages


@dataclass(slots=True)
class GuestConsole:
    """What the test guest said, in order."""

    workload: str | None = None
    balloon_absent: bool = False  # the guest found no balloon device (and went on)
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
    gigantic: GiganticRun | None = None
    pattern: PatternRun | None = None
    # balloon workload: each phase the guest reached, with its host time and pairs
    balloon_phases: dict[str, tuple[float, dict[str, str]]] = field(default_factory=dict)

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
        first = next(iter(pairs), "")
        if first.startswith("gigantic") or first == "offline_blocks":
            self._feed_gigantic(first, pairs, t_host)
        elif first.startswith("pattern"):
            self._feed_pattern(first, pairs)
        elif first == "params":
            self.workload = pairs.get("workload") or None
        elif first == "balloon":
            self.balloon_absent = pairs["balloon"] == "none"
        elif first == "balloon_phase":
            self.balloon_phases[pairs["balloon_phase"]] = (t_host, pairs)
        elif "features" in pairs:
            self.features = int(pairs["features"], 16)
            bits = pairs.get("bits", "")
            self.feature_bits = [int(b) for b in bits.split(",") if b.isdigit()]
            order = pairs.get("page_reporting_order", "")
            self.page_reporting_order = int(order) if order.isdigit() else None
        elif "ftrace" in pairs:
            self.ftrace = pairs["ftrace"]
        elif "round" in pairs:
            self._feed_round(pairs, t_host)
        elif first == "fill_round":
            number = int(pairs["fill_round"])
            self.rounds.setdefault(number, Round(number)).fill_us = float(pairs["fill_us"])
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

    def _run(self) -> GiganticRun:
        if self.gigantic is None:
            self.gigantic = GiganticRun()
        return self.gigantic

    def _feed_pattern(self, first: str, pairs: dict[str, str]) -> None:
        run = self.pattern if self.pattern is not None else PatternRun()
        self.pattern = run
        if first == "pattern_round":
            keys = ("pattern_round", "freed_mib", "checked_mib", "corrupted_pages")
            run.rounds.append({key.removeprefix("pattern_"): int(pairs[key]) for key in keys})
        elif first == "pattern_bad":
            if len(run.bad_files) < 100:
                run.bad_files.append({key: int(pairs[key]) for key in ("file", "round", "pages")})
        elif first == "pattern":
            keys = ("rounds", "files", "checked_mib", "corrupted_pages")
            run.totals = {key: int(pairs[key]) for key in keys}

    def _feed_gigantic(self, first: str, pairs: dict[str, str], t_host: float) -> None:
        run = self._run()
        if first == "gigantic_attempt":
            end = pairs.get("t_end_mono", "none")
            run.attempt_list.append(
                GiganticAttempt(
                    index=int(pairs["i"]),
                    t_mono=float(pairs["t_mono"]),
                    t_end_mono=None if end == "none" else float(end),
                    ok=pairs["ok"] == "1",
                    test=pairs.get("test", "none"),
                    retries=int(pairs.get("retries", "0")),
                    block=int(pairs["block"]) if "block" in pairs else None,
                )
            )
        elif first == "gigantic_event":
            run.events.append(
                IsolationEvent(
                    t_mono=float(pairs["t_mono"]),
                    start_pfn=int(pairs["start_pfn"], 16),
                    end_pfn=int(pairs["end_pfn"], 16),
                    fin_pfn=int(pairs["fin_pfn"], 16),
                    ok=pairs["ret"] == "success",
                    attempt=int(pairs.get("attempt", "0")),
                )
            )
        elif first == "gigantic_trace":
            run.trace = pairs["gigantic_trace"]
        elif first == "offline_blocks":
            run.offline_usable = _blocks(pairs["usable"])
            run.offline_refused = _blocks(pairs["refused"])
        elif first == "gigantic_zones":
            run.block_mib = int(pairs["block_mib"])
            run.movable_gigantic_pages = pairs.get("movable_gigantic_pages")
            run.zone_blocks = {
                zone: _blocks(blocks)
                for zone, blocks in pairs.items()
                if zone not in (first, "block_mib", "movable_gigantic_pages")
            }
        elif first == "gigantic_loop":
            if pairs["gigantic_loop"] == "start":
                run.t_loop_start = t_host
                run.t_loop_start_guest = float(pairs["t"])
                run.op = pairs.get("op", "gigantic")
                run.settle_s = int(pairs["settle_s"])
                run.duration_s = int(pairs["duration_s"])
            else:
                run.t_loop_end = t_host
                run.attempts = int(pairs["attempts"])
                run.failures = int(pairs["failures"])
        elif first == "gigantic":
            run.attempts = int(pairs["attempts"])
            run.failures = int(pairs["failures"])
            if "isolation_failures" in pairs:
                run.isolation_failures = int(pairs["isolation_failures"])
                run.events_count = int(pairs["events"])
                run.t_start_mono = float(pairs["t_start_mono"])
                run.t_end_mono = float(pairs["t_end_mono"])
