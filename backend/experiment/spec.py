"""Experiment specs (TOML): what to sweep, checked completely before anything runs.

    [experiment]
    name = "delay-sweep"
    guest = "mock"            # "mock": the free-list model; "qemu": a real Linux guest
    repeats = 3               # each point R times, seeds seed, seed+1, ...
    seed = 1

    [settings]                # every point
    duration = "20s"
    memory = "2G"

    [sweep]                   # the cartesian product of these lists
    delay = ["none", "report=const:10ms", "report=const:50ms"]

    [controls]                # qemu only: the same runs without our backend
    no_balloon = true
    builtin = true

    [model]                   # qemu only: also run the model, per latency setting
    duration = "30s"

Every value goes through the parser the command line uses, so a spec that
cannot run fails here with the key and the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_balloon.backend.balloon.discard import DiscardStrategy
from vhost_balloon.backend.latency.contention import parse_bql, parse_mmap_contention
from vhost_balloon.backend.latency.delays import format_ns, parse_duration
from vhost_balloon.backend.latency.injection import parse_bql_phases, parse_delay_option
from vhost_balloon.backend.qemu.command import MOVABLECORE, STUDY_WORKLOADS
from vhost_balloon.protocol.units import parse_guest_memory, parse_size


class SpecError(Exception):
    """A spec that cannot run: the message names the key and the reason."""


Value = str | int | float | bool
Normaliser = Callable[[Any], Value]

# Bounds of what a point may ask; the mocked guest refuses the same (guest/cli.py).
MAX_DURATION_NS = 86_400 * 1_000_000_000
MIN_CHURN_NS = 1_000_000
MAX_ATTEMPT_RATE = 100_000.0
MAX_RETRIES = 1000
MAX_FILL_ROUNDS = 1000  # a real guest's fill rounds: each takes seconds


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _optional(parse: Callable[[str], object]) -> Normaliser:
    """A string checked by `parse`, or "none"."""

    def normalise(value: Any) -> Value:
        text = _text(value).strip()
        if text != "none":
            parse(text)
        return text

    return normalise


def _delays(value: Any) -> Value:
    """ "none", "POINT=MODEL" or several joined by spaces (one per point)."""
    text = _text(value).strip()
    if text == "none":
        return text
    points = set()
    for part in text.split():
        point, _model = parse_delay_option(part)
        if point in points:
            raise ValueError(f"point '{point.value}' is given twice in {text!r}")
        points.add(point)
    return text


def _size(value: Any) -> Value:
    parse_size(_text(value))
    return _text(value)


def _memory(value: Any) -> Value:
    parse_guest_memory(_text(value))
    return _text(value)


def _bounded_ns(text: str, *, minimum: int = 0) -> int:
    """A duration from `minimum` to a day: anything longer is a typo that would
    only fail (or never end) after the sweep has started."""
    ns = parse_duration(text)
    if not minimum <= ns <= MAX_DURATION_NS:
        raise ValueError(
            f"{text!r} is not between {format_ns(minimum)} and {format_ns(MAX_DURATION_NS)}"
        )
    return ns


def _duration(value: Any) -> Value:
    _bounded_ns(_text(value))
    return _text(value)


def _run_length(value: Any) -> Value:
    """A run's own duration: it must last at all."""
    _bounded_ns(_text(value), minimum=1_000_000)
    return _text(value)


def _choice(*accepted: int | str) -> Normaliser:
    def normalise(value: Any) -> Value:
        if isinstance(value, bool) or value not in accepted:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, accepted))}")
        result: Value = value
        return result

    return normalise


def _number(minimum: float, maximum: float, *, integer: bool = False) -> Normaliser:
    def normalise(value: Any) -> Value:
        kinds = (int,) if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or not math.isfinite(value)
            or not minimum <= value <= maximum
        ):
            kind = "an integer" if integer else "a number"
            raise ValueError(f"expected {kind} from {minimum:g} to {maximum:g}, got {value!r}")
        result: Value = value
        return result

    return normalise


def _whole_seconds(value: Any) -> Value:
    """A real guest's durations go to the guest in whole seconds."""
    ns = _bounded_ns(_text(value))
    if ns < 1_000_000_000 or ns % 1_000_000_000:
        raise ValueError(f"{value!r} is not a whole number of seconds >= 1s (the guest's unit)")
    return _text(value)


def _flag(value: Any) -> Value:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _workload(value: Any) -> Value:
    text = _text(value).strip()
    if text == "idle":
        return text
    kind, _, rest = text.partition(":")
    parts = rest.split(",")
    if kind != "churn" or len(parts) != 3:
        raise ValueError(f"{text!r} is not 'idle' or 'churn:SIZE,EVERY,HOLD' (churn:64M,500ms,1s)")
    size = parse_size(parts[0])
    if size < 2 << 20 or size % (2 << 20):
        raise ValueError(f"churn size in {text!r} must be a multiple of 2M (a pageblock)")
    # Sub-millisecond churn would keep the guest's event loop busy doing nothing
    # else; a zero hold frees the memory at once: no workload.
    for what, part in (("interval", parts[1]), ("hold", parts[2])):
        try:
            _bounded_ns(part, minimum=MIN_CHURN_NS)
        except ValueError as error:
            raise ValueError(f"churn {what} in {text!r}: {error}") from None
    return text


def _fill_size(value: Any) -> Value:
    """launch --size: whole MiB, at least one."""
    size = parse_size(_text(value))
    if size < 1 << 20 or size % (1 << 20):
        raise ValueError(f"{value!r} is not a whole number of MiB >= 1M (launch --size)")
    return _text(value)


def _movable(value: Any) -> Value:
    """launch --movable: movablecore= of the guest, or none."""
    text = _text(value).strip()
    if text != "none" and not MOVABLECORE.fullmatch(text):
        raise ValueError(f"{text!r} is not 'none' or a movablecore= size such as 1536M or 25%")
    return text


# Keys, their parser and default, per guest kind. Latency keys are shared.
LATENCY_KEYS: dict[str, tuple[Normaliser, Value]] = {
    "delay": (_delays, "none"),
    "bql": (_optional(parse_bql), "none"),
    "bql_phases": (_optional(parse_bql_phases), "pop,publish,notify"),
    "mmap_contention": (_optional(parse_mmap_contention), "none"),
    "discard": (_choice(*DiscardStrategy.names()), "punch-hole"),
}
MOCK_KEYS: dict[str, tuple[Normaliser, Value]] = {
    **LATENCY_KEYS,
    "duration": (_run_length, "20s"),
    "memory": (_memory, "2G"),
    "capacity": (_choice(16, 32), 32),
    "order": (_choice(9, 10), 9),
    "workload": (_workload, "idle"),
    "pass_delay": (_duration, "2s"),
    "attempt_rate": (_number(0.001, MAX_ATTEMPT_RATE), 2.0),
    "contig_size": (_size, "1G"),
    "contig_align": (_size, "1G"),
    "retries": (_number(0, MAX_RETRIES, integer=True), 0),
    "backoff": (_duration, "10ms"),
    "contig_hold": (_duration, "50ms"),
    "attempt_cost": (_duration, "0s"),
    "touch": (_flag, False),
    "reserved": (_size, "64M"),
}
QEMU_KEYS: dict[str, tuple[Normaliser, Value]] = {
    **LATENCY_KEYS,
    "duration": (_whole_seconds, "30s"),
    "settle": (_whole_seconds, "20s"),
    "memory": (_memory, "2560M"),
    "order": (_choice(9, 10), 9),
    "timeout": (_whole_seconds, "600s"),
    # launch --workload: a 1 GiB page in a loop, offline_pages() on ZONE_MOVABLE,
    # virtio-mem unplugs, or fill/free rounds (the price of reporting)
    "workload": (_choice(*STUDY_WORKLOADS), "gigantic"),
    "movable": (_movable, "none"),  # offline: launch's 1536M when none
    "rounds": (_number(1, MAX_FILL_ROUNDS, integer=True), 2),  # fill
    "size": (_fill_size, "300M"),  # fill: per round
    "pause": (_whole_seconds, "5s"),  # fill: after each free
}
GUESTS = {"mock": MOCK_KEYS, "qemu": QEMU_KEYS}
REAL_KINDS = ("qemu", "no_balloon", "builtin")
_LATER_QEMU_KEYS: dict[str, Value] = {
    "workload": "gigantic",
    "movable": "none",
    "rounds": 2,
    "size": "300M",
    "pause": "5s",
}
EXPERIMENT_KEYS = {"name", "guest", "repeats", "seed"}
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")
MAX_REPEATS = 1000
MAX_POINTS = 100_000
TABLES = {"experiment", "settings", "sweep", "controls", "model"}
CONTROLS = ("no_balloon", "builtin")


@dataclass(frozen=True, slots=True)
class Point:
    """One run: every setting resolved, which kind of run, which repeat."""

    kind: str  # "mock", "qemu", "model" (mock run beside a qemu sweep), "no_balloon", "builtin"
    settings: dict[str, Value]
    swept: tuple[str, ...]  # the keys that vary, for labels
    repeat: int
    seed: int

    @property
    def label(self) -> str:
        # A model point beside a real guest lacks the real guest's own keys.
        parts = [f"{key}={self.settings[key]}" for key in self.swept if key in self.settings]
        return " ".join(parts) or "base"

    @property
    def setting_key(self) -> str:
        """Identifies the setting (all repeats share it). Keys added to real
        guests after sweeps were run leave the key as it was at their default,
        so those sweeps still resume and report."""
        later = _LATER_QEMU_KEYS if self.kind in REAL_KINDS else {}
        return (
            self.kind
            + " "
            + " ".join(
                f"{k}={self.settings[k]}"
                for k in sorted(self.settings)
                if k not in later or self.settings[k] != later[k]
            )
        )


@dataclass(frozen=True, slots=True)
class ExperimentSpec:
    name: str
    guest: str
    repeats: int
    seed: int
    settings: dict[str, Value]
    sweep: dict[str, list[Value]]
    controls: tuple[str, ...] = ()
    model: dict[str, Value] | None = None
    source: str = ""
    path: Path | None = field(default=None, compare=False)

    def points(self) -> list[Point]:
        keys = list(self.sweep)
        combos = list(itertools.product(*(self.sweep[k] for k in keys))) or [()]
        points = []
        for repeat in range(self.repeats):
            seed = self.seed + repeat
            for combo in combos:
                settings = self.settings | dict(zip(keys, combo, strict=True))
                points.append(Point(self.guest, settings, tuple(keys), repeat, seed))
                if self.model is not None:
                    model = self.model | {k: settings[k] for k in LATENCY_KEYS}
                    points.append(Point("model", model, tuple(keys), repeat, seed))
            for control in self.controls:
                settings = self.settings | {"delay": "none"}
                points.append(Point(control, settings, (), repeat, seed))
        return _unique(points)


def _unique(points: list[Point]) -> list[Point]:
    seen: set[tuple[str, int]] = set()
    result = []
    for point in points:
        key = (point.setting_key, point.repeat)
        if key not in seen:
            seen.add(key)
            result.append(point)
    return result


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise SpecError(f"[{name}] must be a table")
    return value


def _normalise(
    table: str, values: dict[str, Any], keys: dict[str, tuple[Normaliser, Value]], guest: str
) -> dict[str, Value]:
    result = {}
    for key, value in values.items():
        if key not in keys:
            other = [g for g, known in GUESTS.items() if key in known and g != guest]
            why = f' (it applies to guest = "{other[0]}" only)' if other else ""
            raise SpecError(
                f'[{table}] {key}: unknown key for guest = "{guest}"{why}; '
                f"known keys: {', '.join(sorted(keys))}"
            )
        try:
            result[key] = keys[key][0](value)
        except ValueError as error:
            raise SpecError(f"[{table}] {key}: {error}") from None
    return result


def parse_spec(text: str, path: Path | None = None) -> ExperimentSpec:
    """Parse and check a spec; SpecError says what is wrong and where."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"not valid TOML: {error}") from None
    unknown = set(data) - TABLES
    if unknown:
        raise SpecError(
            f"unknown table(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(TABLES))}"
        )
    head = _table(data, "experiment")
    extra = set(head) - EXPERIMENT_KEYS
    if extra:
        raise SpecError(
            f"[experiment] unknown key(s) {', '.join(sorted(extra))}; "
            f"known: {', '.join(sorted(EXPERIMENT_KEYS))}"
        )
    name = head.get("name", path.stem if path else "experiment")
    guest = head.get("guest", "mock")
    if guest not in GUESTS:
        raise SpecError(f'[experiment] guest: {guest!r} is not "mock" or "qemu"')
    repeats, seed = head.get("repeats", 3), head.get("seed", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
        raise SpecError(
            f"[experiment] repeats: expected an integer from 1 to {MAX_REPEATS}, got {repeats!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"[experiment] seed: expected an integer, got {seed!r}")
    # The name is a folder under results/: nothing that could leave it.
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise SpecError(
            f"[experiment] name: {name!r} is not a plain name "
            "(letters, digits, '.', '_' and '-' only; not '.' or '..')"
        )
    keys = GUESTS[guest]
    settings = {key: default for key, (_parse, default) in keys.items()}
    settings |= _normalise("settings", _table(data, "settings"), keys, guest)
    sweep: dict[str, list[Value]] = {}
    for key, values in _table(data, "sweep").items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"[sweep] {key}: expected a non-empty list of values")
        normalised = [_normalise("sweep", {key: v}, keys, guest)[key] for v in values]
        canonical = [_canonical(v) for v in normalised]
        if len(set(canonical)) != len(canonical):
            raise SpecError(f"[sweep] {key}: a value is listed twice (perhaps in another unit)")
        sweep[key] = normalised
    combinations = math.prod(len(values) for values in sweep.values()) * repeats
    if combinations > MAX_POINTS:
        raise SpecError(f"the sweep has {combinations} runs; at most {MAX_POINTS} are run")
    controls = _controls(_table(data, "controls"), guest)
    model = None
    if "model" in data:
        if guest != "qemu":
            raise SpecError('[model] runs the model beside a real guest: it needs guest = "qemu"')
        given = _table(data, "model")
        for key in given:
            if key in LATENCY_KEYS:
                raise SpecError(
                    f"[model] {key}: the model runs under each real setting's latency; "
                    "set it in [settings] or [sweep]"
                )
        model = {key: default for key, (_parse, default) in MOCK_KEYS.items()}
        model |= _normalise("model", given, MOCK_KEYS, "mock")
    spec = ExperimentSpec(name, guest, repeats, seed, settings, sweep, controls, model, text, path)
    for point in dataclasses.replace(spec, repeats=1).points():
        if point.kind in ("mock", "model"):
            _check_fits(point)
            _check_churn_fits(point)
        _check_bql_hold(point)
    return spec


def _canonical(value: Value) -> Value:
    """The value a setting means, so "1G" and "1024M" are one value."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    for parse in (parse_size, parse_duration):
        try:
            return f"{parse.__name__}:{parse(value)}"
        except ValueError:
            continue
    return " ".join(value.split())


def _check_fits(point: Point) -> None:
    """The modelled guest needs one aligned contiguous range above its reserved memory."""
    settings = point.settings
    memory = parse_size(str(settings["memory"]))
    size = parse_size(str(settings["contig_size"]))
    align = parse_size(str(settings["contig_align"]))
    reserved = parse_size(str(settings["reserved"]))
    if size < 2 << 20 or size % (2 << 20) or align < 2 << 20 or align & (align - 1):
        raise SpecError(
            f"{point.label}: contig_size must be a multiple of 2M and contig_align a "
            "power of two >= 2M"
        )
    first = -(-reserved // align) * align
    if first + size > memory:
        raise SpecError(
            f"{point.kind} {point.label}: a {settings['contig_size']} range aligned to "
            f"{settings['contig_align']} does not fit above the reserved {settings['reserved']} "
            f"of a {settings['memory']} guest: give it more memory"
        )


def _check_churn_fits(point: Point) -> None:
    settings = point.settings
    workload = str(settings["workload"])
    if not workload.startswith("churn:"):
        return
    churn = parse_size(workload.removeprefix("churn:").split(",")[0])
    if churn + parse_size(str(settings["reserved"])) > parse_size(str(settings["memory"])):
        raise SpecError(
            f"{point.kind} {point.label}: workload = {workload!r} allocates more than the "
            f"{settings['memory']} guest has above its reserved {settings['reserved']}"
        )


def _check_bql_hold(point: Point) -> None:
    """A lock held longer than the whole run stalls every report past its end:
    the point would run for minutes and then fail. (mmap contention holds its
    lock per syscall: MmapSpec has no hold time to compare.)"""
    bql = str(point.settings.get("bql", "none"))
    if bql == "none":
        return
    hold_ns = parse_bql(bql).hold.mean_ns()  # for a const hold, the hold itself
    duration = str(point.settings["duration"])
    if hold_ns > parse_duration(duration):
        raise SpecError(
            f"{point.kind} {point.label}: bql = {bql!r} holds the lock "
            f"{format_ns(round(hold_ns))} per acquisition (mean), longer than the run's "
            f"duration = {duration!r}"
        )


def _controls(table: dict[str, Any], guest: str) -> tuple[str, ...]:
    chosen = []
    for key, value in table.items():
        if key not in CONTROLS:
            raise SpecError(f"[controls] {key}: unknown; known: {', '.join(CONTROLS)}")
        if not isinstance(value, bool):
            raise SpecError(f"[controls] {key}: expected true or false")
        if value:
            chosen.append(key)
    if chosen and guest != "qemu":
        raise SpecError('[controls] compare against QEMU without our backend: needs guest = "qemu"')
    return tuple(chosen)


MAX_SPEC_BYTES = 1 << 20


def read_spec_text(path: Path) -> str:
    """The text of a regular file of at most MAX_SPEC_BYTES. Opened without
    blocking, so a FIFO cannot hang us, and checked on the open fd, so what
    is read is what was checked (not /dev/zero, not a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise SpecError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SpecError(f"{path} is not a regular file ({_file_kind(mode)}): refused")
        data = _read_at_most(fd, MAX_SPEC_BYTES + 1)
    except OSError as error:
        raise SpecError(f"cannot read {path}: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path} is larger than {MAX_SPEC_BYTES >> 20} MiB: not a spec")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not UTF-8 text") from None


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := os.read(fd, limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def load_spec(path: Path) -> ExperimentSpec:
    return parse_spec(read_spec_text(path), path)
