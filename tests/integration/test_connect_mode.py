"""`serve --connect`: the backend connects to a listening front-end (QEMU's
`-chardev socket,server=on`), waits while nobody listens, serves that one
session and stops when it ends (it never connects again: QEMU 11.1.3 aborts
on a second connection, docs/qemu.md)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from tests.conftest import StartBackend
from vhost_balloon.backend.cli.serve import serve_connected
from vhost_balloon.protocol.vhost_user import (
    HEADER_SIZE,
    FrontendRequest,
    decode_reply,
    encode_frame,
)


async def _get_features(conn: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(conn, encode_frame(FrontendRequest.GET_FEATURES))
    data = b""
    while len(data) < HEADER_SIZE + 8:
        chunk = await asyncio.wait_for(loop.sock_recv(conn, 64), 5.0)
        assert chunk, "the backend hung up"
        data += chunk
    _, payload = decode_reply(FrontendRequest.GET_FEATURES, data)
    return int.from_bytes(payload, "little")


async def test_the_backend_connects_once_the_front_end_listens_and_stops_when_it_leaves(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    backend = await start_backend()
    path = tmp_path / "qemu.sock"
    stop = asyncio.Event()
    connecting = asyncio.create_task(serve_connected(backend.server, path, stop))
    await asyncio.sleep(0.5)  # nobody listens yet: it keeps trying
    assert not connecting.done()
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(2)
        listener.setblocking(False)
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 5.0)
        with conn:
            assert await _get_features(conn) != 0
            assert len(backend.server.sessions) == 1
        await asyncio.wait_for(connecting, 5.0)  # the front-end left: serving ends
        assert stop.is_set()
        # and no second connection is made to the same front-end
        await asyncio.sleep(0.5)
        try:
            again, _ = listener.accept()
        except BlockingIOError:
            pass
        else:
            again.close()
            raise AssertionError("the backend connected a second time")
