"""Latency settings, their parsing and the per-session injector (no sockets)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from vhost_balloon.backend.latency.contention import MmapContention
from vhost_balloon.backend.latency.delays import DelaySpecError, parse_delay
from vhost_balloon.backend.latency.in_force import LatencyInForce
from vhost_balloon.backend.latency.injection import (
    ALL_BQL_PHASES,
    BqlPhase,
    Injector,
    LatencySettings,
    Point,
    parse_bql_phases,
    parse_delay_option,
)


def test_delay_option_names_a_point_and_a_model() -> None:
    point, model = parse_delay_option("publish=uniform:1ms..3ms")
    assert point is Point.PUBLISH and model.kind == "uniform"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("publish", "POINT=MODEL"),
        ("later=const:1ms", "unknown point 'later'"),
        ("kick=const:", "const"),
    ],
)
def test_bad_delay_options_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(DelaySpecError, match=fragment):
        parse_delay_option(text)


def test_bql_phases_parse_and_refuse_unknown_ones() -> None:
    assert parse_bql_phases("pop, notify") == {BqlPhase.POP, BqlPhase.NOTIFY}
    with pytest.raises(ValueError, match="accepted: pop, publish, notify"):
        parse_bql_phases("pop,kick")


def _samples(settings: LatencySettings, point: Point, count: int) -> list[int]:
    injector = Injector(lambda: settings)
    injector.begin_report()
    return [injector.sample(point) for _ in range(count)]


def test_the_same_seed_gives_every_session_the_same_sequence() -> None:
    settings = LatencySettings(
        delays={Point.PUBLISH: parse_delay("exp:2ms"), Point.KICK: parse_delay("exp:2ms")}, seed=11
    )
    first = _samples(settings, Point.PUBLISH, 50)
    assert first == _samples(settings, Point.PUBLISH, 50)
    assert first != _samples(settings, Point.KICK, 50)  # points are independent streams
    other_seed = LatencySettings(delays=settings.delays, seed=12)
    assert first != _samples(other_seed, Point.PUBLISH, 50)


def test_a_new_settings_version_restarts_the_sequences() -> None:
    current = [LatencySettings(delays={Point.ENTRY: parse_delay("exp:1ms")}, seed=1)]
    injector = Injector(lambda: current[0])
    injector.begin_report()
    before = injector.entry_delays(5)
    current[0] = current[0].changed(delays={Point.ENTRY: parse_delay("const:3ms")})
    injector.begin_report()
    assert injector.entry_delays(3) == [3_000_000] * 3
    assert before is not None and len(before) == 5
    injector.begin_report()  # same version: the sequence goes on, not restarted
    assert injector.has(Point.ENTRY) and not injector.has(Point.KICK)


def test_describe_is_what_the_trace_shows() -> None:
    settings = LatencySettings(delays={Point.NOTIFY: parse_delay("const:1ms")}, seed=5)
    assert settings.describe() == {
        "version": 0,
        "seed": 5,
        "delay": {"notify": "const:1ms"},
        "bql": None,
        "bql_phases": ["notify", "pop", "publish"],
        "mmap_contention": None,
    }
    assert settings.bql_phases == ALL_BQL_PHASES


def test_runtime_updates_merge_replace_and_remove() -> None:
    runtime = LatencyInForce(LatencySettings(delays={Point.KICK: parse_delay("const:1ms")}))
    merged = runtime.updated({"delay": {"publish": "const:2ms"}})
    assert set(merged.delays) == {Point.KICK, Point.PUBLISH} and merged.version == 1
    replaced = runtime.updated({"delay": {"publish": "const:2ms"}, "replace": True})
    assert set(replaced.delays) == {Point.PUBLISH}
    removed = runtime.updated({"delay": {"kick": "none"}})
    assert removed.delays == {}
    phases = runtime.updated({"bql_phases": ["publish"], "seed": 4})
    assert phases.bql_phases == {BqlPhase.PUBLISH} and phases.seed == 4


@pytest.mark.parametrize(
    "request_",
    [
        {"delay": {"nowhere": "const:1ms"}},
        {"delay": {"kick": "const:1parsec"}},
        {"bql": "const:1ms"},
        {"mmap_contention": "-2"},
        {"seed": True},
        {"colour": "blue"},
    ],
)
def test_runtime_refuses_bad_updates(request_: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LatencyInForce().updated(request_)


async def test_concurrent_updates_never_orphan_contention_threads() -> None:
    def bql_threads() -> int:
        return sum(t.name.startswith("bql-") for t in threading.enumerate())

    runtime = LatencyInForce()
    await runtime.start()
    try:
        await asyncio.gather(
            runtime.update({"bql": "const:100us@100,threads=2"}),
            runtime.update({"bql": "const:100us@100,threads=3"}),
        )
        assert runtime.settings.version == 2  # both applied, one after the other
        assert runtime.settings.bql is not None
        assert bql_threads() == runtime.settings.bql.threads
        await runtime.update({"bql": "none"})
        assert bql_threads() == 0
    finally:
        await runtime.close()
    assert bql_threads() == 0


async def test_a_failed_contention_change_leaves_honest_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(self: object, timeout: float = 0.0) -> None:
        raise TimeoutError("thread did not stop")

    runtime = LatencyInForce()
    await runtime.start()
    stuck = None
    try:
        await runtime.update({"mmap_contention": "1,size=4M"})
        stuck = runtime._mmap
        monkeypatch.setattr(MmapContention, "stop", refuse)
        with pytest.raises(ValueError, match="all contention threads were told to stop"):
            await runtime.update({"mmap_contention": "2,size=4M"})
        assert runtime.settings.mmap is None and runtime.settings.bql is None
    finally:
        monkeypatch.undo()
        await runtime.close()
        if stuck is not None:  # the threads whose stop was made to fail
            stuck.stop()
