"""One fixture wires a mocked guest to a real backend over a real socket and memfd.

Both run in the test's event loop; they meet only through the socket, as
QEMU and the backend do.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from vhost_balloon.backend.balloon.device import BalloonSettings, NotifyPolicy
from vhost_balloon.backend.balloon.discard import DiscardStrategy
from vhost_balloon.backend.balloon.features import OFFERED_FEATURES
from vhost_balloon.backend.latency.injection import LatencySettings
from vhost_balloon.backend.observe.trace import read_trace
from vhost_balloon.backend.server import Server, ServerSettings, listen_unix
from vhost_balloon.guest.driver import DriverConfig
from vhost_balloon.guest.runner import GuestOptions

MiB = 1 << 20
TEST_MEMORY = 256 * MiB


@dataclass
class RunningBackend:
    server: Server
    socket_path: Path
    trace_path: Path

    def trace(self, kinds: tuple[str, ...] = ("report",)) -> list[dict[str, Any]]:
        """The records of `kinds` so far. A record is written after its report's call
        signal, by the queue's thread: a guest that has seen the signal may
        ask a moment too early, so wait for the running batches first."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(
            session.rings.busy for session in self.server.sessions.values()
        ):
            time.sleep(0.001)
        return read_trace(self.trace_path, kinds) if self.trace_path.exists() else []

    def guest_options(self, memory: int = TEST_MEMORY, **driver: Any) -> GuestOptions:
        frontend_keys = {
            "regions",
            "reply_ack",
            "config",
            "mq",
            "configure_mem_slots",
            "backend_req",
            "reply_timeout",
            "discard_label",
            "balloon_follow",
            "seal",
        }
        frontend = {k: driver.pop(k) for k in list(driver) if k in frontend_keys}
        driver.setdefault("report_timeout", 10.0)
        return GuestOptions(
            socket_path=str(self.socket_path),
            memory_bytes=memory,
            driver=DriverConfig(**driver),
            **frontend,
        )


StartBackend = Callable[..., Awaitable[RunningBackend]]


@pytest.fixture
async def start_backend(tmp_path: Path) -> AsyncIterator[StartBackend]:
    running: list[tuple[RunningBackend, Any]] = []

    async def start(
        discard: str = "punch-hole",
        notify: str = "always",
        latency: LatencySettings | None = None,
        control: bool = False,
        features: int = OFFERED_FEATURES,
        stats_interval_s: float = 0.0,
        allow_unsealed_memory: bool = False,
    ) -> RunningBackend:
        index = len(running)
        path = tmp_path / f"backend{index}.sock"
        trace = tmp_path / f"trace{index}.jsonl"
        settings = ServerSettings(
            BalloonSettings(
                discard=DiscardStrategy(discard),
                notify=NotifyPolicy(notify),
                features=features,
                stats_interval_s=stats_interval_s,
            ),
            trace_path=trace,
            latency=latency or LatencySettings(),
            control_socket=tmp_path / f"control{index}.sock" if control else None,
            allow_unsealed_memory=allow_unsealed_memory,
        )
        listener = listen_unix(path)
        server = Server(settings)
        await server.start_services()
        server.start(listener)
        backend = RunningBackend(server, path, trace)
        running.append((backend, listener))
        return backend

    yield start
    for backend, listener in running:
        await backend.server.close()
        listener.close()


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


__all__ = ["TEST_MEMORY", "MiB", "RunningBackend", "StartBackend", "open_fds", "replace"]
