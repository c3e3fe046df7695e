"""SIGHUP reloads run one at a time, in the order the signals came: a slow
reload (a big replay file to parse) cannot be overtaken by a later fast one
and then land on top of it."""

from __future__ import annotations

import argparse
import asyncio
import threading
from typing import Any

from vhost_balloon.backend.cli import serve
from vhost_balloon.backend.cli.systemd import Notifier


class RecordingServer:
    def __init__(self) -> None:
        self.applied: list[Any] = []

    async def reconfigure(self, settings: Any) -> list[str]:
        self.applied.append(settings.latency.seed)
        return []

    class latency:  # what reload() logs
        @staticmethod
        def describe() -> dict[str, Any]:
            return {}


def args_parsing(seed: int, gate: threading.Event | None = None) -> argparse.Namespace:
    def again() -> argparse.Namespace:
        if gate is not None:
            assert gate.wait(10)  # the slow parse
        return serve.options_parser().parse_args(["--fd", "3", "--seed", str(seed)])

    return argparse.Namespace(reload=again, config="vm1.toml", activated=True)


async def test_a_later_reload_waits_for_the_earlier_one() -> None:
    server = RecordingServer()
    lock = asyncio.Lock()
    gate = threading.Event()
    notifier = Notifier({})
    slow = asyncio.create_task(serve.reload(server, args_parsing(1, gate), notifier, lock))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    fast = asyncio.create_task(serve.reload(server, args_parsing(2), notifier, lock))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert server.applied == []  # the fast one waits: it came second
    gate.set()
    await asyncio.gather(slow, fast)
    assert server.applied == [1, 2]  # the last signal's settings are in force
