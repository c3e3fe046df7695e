"""The mocked guest's connect into a listener whose backlog is full: it waits
its turn, and never comes back with a socket that is not connected."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from vhost_balloon.guest.frontend import VhostUserFrontend


async def test_connects_into_a_full_backlog_all_end_connected(tmp_path: Path) -> None:
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)  # room for one waiting connection
    frontends = [VhostUserFrontend(path) for _ in range(6)]
    accepted: list[socket.socket] = []

    async def accept_later() -> None:
        await asyncio.sleep(0.3)  # the others find the backlog full meanwhile
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        while len(accepted) < len(frontends):
            conn, _ = await loop.sock_accept(listener)
            accepted.append(conn)

    try:
        acceptor = asyncio.ensure_future(accept_later())
        await asyncio.gather(*(frontend.connect(5.0) for frontend in frontends))
        await asyncio.wait_for(acceptor, 5.0)
        for frontend in frontends:
            assert frontend.channel.sock.getpeername() == path
    finally:
        for frontend in frontends:
            await frontend.close()
        for conn in accepted:
            conn.close()
        listener.close()
