"""Server.reconfigure, what a SIGHUP applies: latency at once as a new
snapshot, balloon settings for the next sessions, the rest named."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from vhost_balloon.backend.balloon.device import BalloonSettings
from vhost_balloon.backend.balloon.discard import DiscardStrategy
from vhost_balloon.backend.latency.contention import parse_bql
from vhost_balloon.backend.latency.injection import LatencySettings, parse_delay_option
from vhost_balloon.backend.server import Server, ServerSettings


def delays(*specs: str) -> LatencySettings:
    return LatencySettings(delays=dict(parse_delay_option(s) for s in specs))


async def test_a_latency_change_is_a_new_snapshot() -> None:
    server = Server(ServerSettings(latency=delays("publish=const:1ms")))
    try:
        restart = await server.reconfigure(ServerSettings(latency=delays("publish=const:3ms")))
        assert restart == []
        now = server.latency.current()
        assert now.version == 1  # injection rebuilds its samplers on a new version
        assert now.delays == delays("publish=const:3ms").delays
        assert server.settings.latency == now
        # The same settings again change nothing, not even the version.
        await server.reconfigure(ServerSettings(latency=delays("publish=const:3ms")))
        assert server.latency.current().version == 1
    finally:
        await server.close()


async def test_balloon_settings_change_for_new_sessions_the_rest_on_restart(
    tmp_path: Path,
) -> None:
    server = Server(ServerSettings())
    try:
        new = ServerSettings(
            balloon=BalloonSettings(discard=DiscardStrategy("madv-remove")),
            trace_path=tmp_path / "t.jsonl",
            allow_unsealed_memory=True,
        )
        restart = await server.reconfigure(new)
        assert restart == ["trace", "allow-unsealed-memory"]
        assert server.settings.balloon.discard is DiscardStrategy("madv-remove")
        assert server.settings.trace_path is None  # kept until a restart
        assert server.settings.allow_unsealed_memory is False
        assert dataclasses.replace(server.settings, balloon=new.balloon) == server.settings
    finally:
        await server.close()


async def test_concurrent_changes_never_share_a_version() -> None:
    # One change restarts contention threads (awaited), another only adds a
    # delay: each must become a snapshot of its own, the later one last.
    server = Server(ServerSettings())
    try:
        with_bql = LatencySettings(bql=parse_bql("const:100us@100"))
        with_delay = LatencySettings(bql=with_bql.bql, delays=delays("publish=const:5ms").delays)
        seen: list[LatencySettings] = []

        async def change(settings: LatencySettings) -> None:
            seen.append(await server.latency.replace(settings))

        await asyncio.gather(change(with_bql), change(with_delay))
        assert sorted(s.version for s in seen) == [1, 2]
        now = server.latency.current()
        assert now.version == 2 and now.delays == with_delay.delays
    finally:
        await server.close()
