"""A control-socket `set` request, checked and parsed into a `Change`.

Parsing (which may read a replay file) needs nothing of the settings in
force, so it runs in a thread, without the settings lock; merging the
`Change` into the snapshot in force is cheap and is all the lock covers.
Every wrong JSON type anywhere in a request is a ValueError naming the key,
never a TypeError: the control socket would call that an internal error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vhost_balloon.backend.latency.contention import parse_bql, parse_mmap_contention
from vhost_balloon.backend.latency.delays import DelayModel, parse_delay
from vhost_balloon.backend.latency.injection import LatencySettings, Point, parse_bql_phases

REMOVE = "none"  # the one way to remove a delay or turn contention off
KEYS = ("cmd", "delay", "replace", "bql", "bql_phases", "mmap_contention", "seed")


@dataclass(frozen=True, slots=True)
class Change:
    """What a `set` asks for, parsed but not yet merged into the settings."""

    delays: Mapping[Point, DelayModel | None] = field(default_factory=dict)  # None: remove
    replace: bool = False  # start from no delays instead of merging
    fields: Mapping[str, Any] = field(default_factory=dict)  # LatencySettings.changed()

    def applied_to(self, current: LatencySettings) -> LatencySettings:
        delays: dict[Point, DelayModel] = {} if self.replace else dict(current.delays)
        for point, model in self.delays.items():
            if model is None:
                delays.pop(point, None)
            else:
                delays[point] = model
        return current.changed(delays=delays, **self.fields)


def parse_set_request(request: Mapping[str, Any], available_memory: Callable[[], int]) -> Change:
    """The Change a `set` request asks for (ValueError naming the bad key if any).

    `delay` maps points to models ("none" removes one); `bql` and
    `mmap_contention` take a spec or "none"; `bql_phases` a list of names or
    a comma-separated string; `seed` an integer; `replace: true` starts
    from no delays. Replay paths must be absolute: the backend's directory
    is not the sender's. `available_memory` bounds mmap contention.
    """
    unknown = set(request) - set(KEYS)
    if unknown:
        raise ValueError(
            f"unknown settings: {', '.join(sorted(unknown))}; accepted: {', '.join(KEYS[1:])}"
        )
    fields: dict[str, Any] = {}
    if "bql" in request:
        text = _text(request["bql"], "bql", "a spec")
        fields["bql"] = None if _removes(text) else parse_bql(text, allow_relative=False)
    if "mmap_contention" in request:
        text = _text(request["mmap_contention"], "mmap_contention", "a spec")
        fields["mmap"] = (
            None if _removes(text) else parse_mmap_contention(text, available=available_memory)
        )
    if "bql_phases" in request:
        fields["bql_phases"] = parse_bql_phases(_phases(request["bql_phases"]))
    if "seed" in request:
        seed = request["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {_shown(seed)}")
        fields["seed"] = seed
    replace = request.get("replace", False)
    if not isinstance(replace, bool):
        raise ValueError(f"replace must be true or false, got {_shown(replace)}")
    return Change(delays=_delays(request), replace=replace, fields=fields)


def _delays(request: Mapping[str, Any]) -> dict[Point, DelayModel | None]:
    given = request.get("delay", {})
    if not isinstance(given, dict):
        raise ValueError(
            f'delay must be an object of POINT: MODEL (or "{REMOVE}"), got {_shown(given)}'
        )
    delays: dict[Point, DelayModel | None] = {}
    for point_text, model in given.items():
        try:
            point = Point(point_text)
        except ValueError:
            accepted = ", ".join(p.value for p in Point)
            raise ValueError(f"unknown delay point '{point_text}'; accepted: {accepted}") from None
        text = _text(model, f"delay for '{point_text}'", "a model")
        delays[point] = None if _removes(text) else parse_delay(text, allow_relative=False)
    return delays


def _phases(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)
    raise ValueError(
        f"bql_phases must be a list of phase names or a comma-separated string, got {_shown(value)}"
    )


def _text(value: Any, what: str, expected: str) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f'{what} must be a string ({expected}, or "{REMOVE}" to remove it), got {_shown(value)}'
        )
    return value.strip()


def _removes(text: str) -> bool:
    return text.lower() == REMOVE


def _shown(value: Any) -> str:
    """A JSON value as the sender wrote it, cut short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
