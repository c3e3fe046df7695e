"""Delay models for latency injection: parsing, seeded sampling, expected values.

A spec names a distribution and its parameters (`const:5ms`, `exp:2ms`, ...);
`parse_delay` validates it once and `DelayModel.sampler(seed, stream)` turns
it into a reproducible source of delays in integer nanoseconds.

Every sampled delay is capped at `MAX_DELAY_NS` (60 s), and no parameter may
exceed it: the guest's reporting worker waits for each report, so a heavy
exp/lognormal tail drawing a delay of minutes would stall the guest's free
page reporting (and whatever waits on the isolated pages) for that long,
which is a hang, not a latency measurement. `mean_ns` is the mean of the
capped distribution, i.e. what the sampler really produces.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NS_PER_S = 1_000_000_000
MAX_DELAY_NS = 60 * NS_PER_S
MAX_SIGMA = 10.0  # exp(10 * z): beyond this nearly every tail draw hits the cap anyway
_MAX_DIGITS = 64  # far more than 60 s in ns needs, in a duration's number
_NORMAL_ATTEMPTS = 100  # each draw is >= 0 with probability >= 1/2 (mean >= 0)

_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": NS_PER_S}
_DURATION = re.compile(r"(?P<sign>-?)(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[^\d\s.+-]*)")
_KINDS = ("const", "uniform", "exp", "lognormal", "normal", "replay")
ACCEPTED = (
    "const:5ms, uniform:1ms..3ms, exp:2ms, lognormal:median=2ms,sigma=0.5, "
    "normal:mean=2ms,sd=0.5ms, replay:FILE (units ns, us, ms, s; parameters at most 60s), "
    "or none"
)


class DelaySpecError(ValueError):
    """A delay or duration that cannot be used; the message says which part and what is accepted."""


class _Bad(Exception):
    """Internal: the reason a part is wrong, before the whole spec is named."""


def _duration_ns(text: str) -> int:
    stripped = text.strip()
    if not stripped:
        raise _Bad("duration is empty")
    match = _DURATION.fullmatch(stripped)
    if match is None:
        raise _Bad(f"duration '{stripped}' is not a number with a unit")
    if match["sign"]:
        raise _Bad(f"duration '{stripped}' is negative")
    unit = match["unit"]
    if not unit:
        raise _Bad(f"duration '{stripped}' has no unit")
    if unit not in _UNITS:
        raise _Bad(f"duration '{stripped}' has unknown unit '{unit}'")
    number = match["number"]
    if len(number) > _MAX_DIGITS:  # int() refuses 4300 digits, with a confusing message
        raise _Bad(f"duration '{stripped[:20]}...' has over {_MAX_DIGITS} digits")
    return _scaled(number, _UNITS[unit])


def _scaled(number: str, scale: int) -> int:
    """round(number x scale), exact and half to even, as Fraction would give.

    Integer arithmetic: "1.1ms" stays exact (a float gives 1099999.9999...),
    and it is several times faster than Fraction, which a replay file's
    hundreds of thousands of lines feel.
    """
    whole, _, decimals = number.partition(".")
    if not decimals:
        return int(whole) * scale
    divisor: int = 10 ** len(decimals)
    quotient, remainder = divmod(int(whole + decimals) * scale, divisor)
    if 2 * remainder > divisor or (2 * remainder == divisor and quotient % 2):
        quotient += 1
    return quotient


def parse_duration(text: str) -> int:
    """`"1.5ms"` -> 1_500_000 (ns). A unit is required; sub-ns parts are rounded."""
    try:
        return _duration_ns(text)
    except _Bad as bad:
        raise DelaySpecError(
            f"bad duration: {bad}; accepted: a number >= 0 and a unit (ns, us, ms, s), e.g. 1.5ms"
        ) from None


def format_ns(ns: int) -> str:
    """The canonical text of a duration: the largest unit, exact decimals (1.5ms)."""
    for unit, scale in (("s", NS_PER_S), ("ms", 1_000_000), ("us", 1_000)):
        if ns >= scale:
            whole, part = divmod(ns, scale)
            if part == 0:
                return f"{whole}{unit}"
            digits = str(part).rjust(len(str(scale)) - 1, "0").rstrip("0")
            return f"{whole}.{digits}{unit}"
    return f"{ns}ns"


def _stream_rng(seed: int, stream: str) -> random.Random:
    # hash() of a str is salted per process; sha256 is stable across runs.
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class DelayModel:
    """A validated delay distribution. Build it with `parse_delay`.

    `DelayModel(spec, kind)` alone also works (e.g. from a trace record): the
    spec is parsed and must be of that kind.
    """

    spec: str
    kind: str
    # kind-specific: const (ns), uniform (low, high), exp (mean), lognormal
    # (median, sigma), normal (mean, sd), replay (every value, in file order)
    _params: tuple[float, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self._params:
            parsed = parse_delay(self.spec)
            if parsed.kind != self.kind:
                raise DelaySpecError(
                    f"bad delay '{self.spec}': it is a {parsed.kind} spec, not {self.kind}"
                )
            object.__setattr__(self, "spec", parsed.spec)
            object.__setattr__(self, "_params", parsed._params)

    def sampler(self, seed: int, stream: str) -> Callable[[], int]:
        """Successive delays in ns (ints in [0, MAX_DELAY_NS]).

        The sequence depends only on (seed, stream) and the model, so a run is
        reproducible; distinct streams get independent generators. Models of
        the same kind with the same seed and stream draw from the same
        underlying numbers (common random numbers), which makes runs that
        differ only in a parameter directly comparable.
        """
        rng = _stream_rng(seed, stream)
        params = self._params
        cap = MAX_DELAY_NS
        if self.kind == "const":
            value = int(params[0])
            return lambda: value
        if self.kind == "uniform":
            low, high = int(params[0]), int(params[1])
            return lambda: rng.randint(low, high)
        if self.kind == "exp":
            rate = 1.0 / params[0]
            return lambda: min(cap, round(rng.expovariate(rate)))
        if self.kind == "lognormal":
            mu, sigma = math.log(params[0]), params[1]
            log_cap = math.log(cap)

            def lognormal() -> int:
                exponent = mu + sigma * rng.gauss(0.0, 1.0)
                # compare in log space: exp() of a far tail draw would overflow
                return cap if exponent >= log_cap else min(cap, round(math.exp(exponent)))

            return lognormal
        if self.kind == "normal":
            mean, sd = params

            def truncated_normal() -> int:
                # Truncation, not clamping: clamping would pile mass at exactly 0.
                for _ in range(_NORMAL_ATTEMPTS):
                    value = rng.gauss(mean, sd)
                    if value >= 0.0:
                        return min(cap, round(value))
                return 0  # after 100 failures, probability <= 2**-100

            return truncated_normal
        if self.kind == "replay":
            values = tuple(int(v) for v in params)
            index = -1

            def replay() -> int:
                nonlocal index
                index = (index + 1) % len(values)
                return values[index]

            return replay
        raise AssertionError(f"unknown delay kind {self.kind!r}")

    def mean_ns(self) -> float:
        """Expected value of a sample, cap included (sub-ns rounding ignored)."""
        params = self._params
        cap = float(MAX_DELAY_NS)
        if self.kind == "const":
            return float(params[0])
        if self.kind == "uniform":
            return (params[0] + params[1]) / 2.0
        if self.kind == "exp":
            mean = params[0]
            return mean * -math.expm1(-cap / mean)  # E[min(X, cap)]
        if self.kind == "lognormal":
            mu, sigma = math.log(params[0]), params[1]
            log_cap = math.log(cap)
            below = math.exp(mu + sigma * sigma / 2.0) * _phi((log_cap - mu - sigma**2) / sigma)
            return below + cap * _phi((mu - log_cap) / sigma)
        if self.kind == "normal":
            # mean of N(mean, sd) truncated to [0, inf), then capped
            mean, sd = params
            a, b = -mean / sd, (cap - mean) / sd
            kept = _phi(-a)
            inside = mean * (_phi(b) - _phi(a)) + sd * (_pdf(a) - _pdf(b))
            return (inside + cap * _phi(-b)) / kept
        if self.kind == "replay":
            return math.fsum(params) / len(params)
        raise AssertionError(f"unknown delay kind {self.kind!r}")


def parse_delay(spec: str, *, allow_relative: bool = True) -> DelayModel:
    """Parse a delay spec (see `ACCEPTED`); raises DelaySpecError naming the bad part.

    `allow_relative=False` refuses a relative replay path: for specs that
    come over the control socket, from a process whose directory is not ours.
    """
    try:
        return _parse(spec.strip(), allow_relative)
    except _Bad as bad:
        raise DelaySpecError(f"bad delay '{spec}': {bad}; accepted: {ACCEPTED}") from None


def with_absolute_replay_path(spec: str, directory: Path) -> str:
    """`spec` with a relative replay path made absolute against `directory`
    (what ctl does before sending); any other spec unchanged."""
    kind, sep, path = spec.strip().partition(":")
    path = path.strip()
    if not sep or kind.strip().lower() != "replay" or not path or os.path.isabs(path):
        return spec
    return f"replay:{os.path.join(directory, path)}"


def _parse(text: str, allow_relative: bool) -> DelayModel:
    if not text:
        raise _Bad("the spec is empty")
    kind_text, sep, rest = text.partition(":")
    kind = kind_text.strip().lower()
    if not sep:
        if kind in ("none", "0"):
            return _const(0)
        if kind in _KINDS:
            raise _Bad(f"'{kind}' needs its parameters after ':'")
        try:
            _duration_ns(kind)
        except _Bad:
            raise _Bad(f"unknown kind '{kind_text.strip()}'") from None
        raise _Bad(f"'{kind_text.strip()}' has no kind (e.g. const:{kind_text.strip()})")
    rest = rest.strip()
    if kind == "const":
        return _const(_limited("value", rest))
    if kind == "uniform":
        return _uniform(rest)
    if kind == "exp":
        mean = _limited("mean", rest)
        if mean == 0:
            raise _Bad("mean must be above 0 (for no delay use none)")
        return DelayModel(f"exp:{format_ns(mean)}", "exp", (float(mean),))
    if kind == "lognormal":
        return _lognormal(rest)
    if kind == "normal":
        return _normal(rest)
    if kind == "replay":
        return _replay(rest, allow_relative)
    raise _Bad(f"unknown kind '{kind_text.strip()}'")


def _limited(name: str, text: str) -> int:
    """A duration parameter within [0, MAX_DELAY_NS]."""
    if not text:
        raise _Bad(f"{name} is missing")
    ns = _duration_ns(text)
    if ns > MAX_DELAY_NS:
        raise _Bad(f"{name} {text.strip()} exceeds the {format_ns(MAX_DELAY_NS)} limit")
    return ns


def _const(ns: int) -> DelayModel:
    return DelayModel(f"const:{format_ns(ns)}", "const", (float(ns),))


def _uniform(rest: str) -> DelayModel:
    low_text, sep, high_text = rest.partition("..")
    if not sep:
        raise _Bad(f"'{rest}' is not LOW..HIGH")
    low, high = _limited("low", low_text), _limited("high", high_text)
    if low > high:
        raise _Bad(f"low {low_text.strip()} is above high {high_text.strip()}")
    return DelayModel(
        f"uniform:{format_ns(low)}..{format_ns(high)}", "uniform", (float(low), float(high))
    )


def _keywords(rest: str, names: tuple[str, str]) -> dict[str, str]:
    """`a=1,b=2` with exactly the given names, in any order."""
    found: dict[str, str] = {}
    for part in rest.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise _Bad(f"'{part.strip()}' is not NAME=VALUE")
        if key not in names:
            raise _Bad(f"unknown parameter '{key}' (expected {' and '.join(names)})")
        if key in found:
            raise _Bad(f"parameter '{key}' is given twice")
        found[key] = value.strip()
    missing = [name for name in names if name not in found]
    if missing:
        raise _Bad(f"missing {' and '.join(missing)}")
    return found


def _lognormal(rest: str) -> DelayModel:
    values = _keywords(rest, ("median", "sigma"))
    median = _limited("median", values["median"])
    if median == 0:
        raise _Bad("median must be above 0 (for no delay use none)")
    try:
        sigma = float(values["sigma"])
    except ValueError:
        raise _Bad(f"sigma '{values['sigma']}' is not a number") from None
    if not 0.0 < sigma <= MAX_SIGMA:  # also rejects nan
        raise _Bad(f"sigma {values['sigma']} is not in (0, {MAX_SIGMA:g}]")
    return DelayModel(
        f"lognormal:median={format_ns(median)},sigma={sigma!r}",
        "lognormal",
        (float(median), sigma),
    )


def _normal(rest: str) -> DelayModel:
    values = _keywords(rest, ("mean", "sd"))
    mean, sd = _limited("mean", values["mean"]), _limited("sd", values["sd"])
    if sd == 0:
        raise _Bad("sd must be above 0 (for a fixed delay use const)")
    return DelayModel(
        f"normal:mean={format_ns(mean)},sd={format_ns(sd)}", "normal", (float(mean), float(sd))
    )


# Parsing a MiB takes about 0.55 s on a 2-core host when every value is
# distinct (0.07 s when values repeat, thanks to the cache below); a `set`
# over the control socket must be parsed within its 2 s budget even on a
# loaded host, and the parsing thread competes with the event loop (and the
# report path) for the GIL all that time.
MAX_REPLAY_BYTES = 1 << 20


def _replay(rest: str, allow_relative: bool) -> DelayModel:
    if not rest:
        raise _Bad("replay needs a file path")
    if not allow_relative and not os.path.isabs(rest):
        raise _Bad(
            f"replay file '{rest}' is a relative path, and the backend's directory is not "
            "yours: give an absolute path (ctl makes it absolute)"
        )
    text = _read_replay(rest)
    lines = text.splitlines()
    values: list[float] = []
    cache: dict[str, int] = {}  # captures repeat values; parsing each once is much faster
    for number, line in enumerate(lines, start=1):
        content = line.partition("#")[0].strip()
        if not content:
            continue
        ns = cache.get(content)
        if ns is None:
            ns = cache[content] = _replay_value(rest, number, content)
        values.append(float(ns))
    if not values:
        raise _Bad(f"replay file '{rest}' has no durations ({len(lines)} lines, none with a value)")
    return DelayModel(f"replay:{rest}", "replay", tuple(values))


def _read_replay(path: str) -> str:
    """The file's text, read through one descriptor: checked, then read, no race.

    O_NONBLOCK: opening a FIFO must not wait for a writer. At most
    MAX_REPLAY_BYTES + 1 bytes are read, so a file that grows after the
    check (or /proc files, which claim size 0) cannot slip past the cap.
    """
    limit = f"{MAX_REPLAY_BYTES >> 20} MiB"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            # A FIFO or device would block or never end; a huge file is a mistake.
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Bad(f"replay file '{path}' is not a regular file")
            data = file.read(MAX_REPLAY_BYTES + 1)
        if len(data) > MAX_REPLAY_BYTES:
            raise _Bad(
                f"replay file '{path}' is over {limit}, the limit that keeps parsing "
                "it well under a second"
            )
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise _Bad(f"cannot read replay file '{path}': {reason}") from None


def _replay_value(path: str, number: int, content: str) -> int:
    try:
        ns = _duration_ns(content)
    except _Bad as bad:
        raise _Bad(f"replay file '{path}' line {number}: {bad}") from None
    if ns > MAX_DELAY_NS:
        raise _Bad(
            f"replay file '{path}' line {number}: {content} exceeds the "
            f"{format_ns(MAX_DELAY_NS)} limit"
        )
    return ns
