"""The JSON-lines control socket and its blocking client, over real unix sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vhost_balloon.backend.observe import control
from vhost_balloon.backend.observe.control import (
    MAX_LINE,
    ControlError,
    close_control,
    control_request,
    serve_control,
)


async def handler(request: dict[str, Any]) -> dict[str, Any]:
    command = request.get("cmd")
    if command == "echo":
        return {"echo": request}
    if command == "refuse":
        raise ValueError("no such thing")
    if command == "crash":
        raise RuntimeError("bug")
    if command == "sleep":
        await asyncio.sleep(float(request["seconds"]))
        return {}
    if command == "unencodable":
        return {"value": object()}
    if command == "not-ok":
        return {"ok": False, "why": "handler said so"}
    return {"unknown": command}


@pytest.fixture
async def socket_path(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "control.sock"
    server = await serve_control(path, handler)
    yield path
    await close_control(server, path)


async def request(path: Path, body: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
    return await asyncio.to_thread(control_request, path, body, timeout)


async def raw_exchange(path: Path, data: bytes, replies: int) -> list[dict[str, Any]]:
    """Send raw bytes and read `replies` lines."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        await writer.drain()
        return [json.loads(await asyncio.wait_for(reader.readline(), 3)) for _ in range(replies)]
    finally:
        writer.close()


async def test_round_trip(socket_path: Path) -> None:
    reply = await request(socket_path, {"cmd": "echo", "x": [1, "é"]})
    assert reply == {"ok": True, "echo": {"cmd": "echo", "x": [1, "é"]}}


async def test_the_handler_may_answer_not_ok(socket_path: Path) -> None:
    assert await request(socket_path, {"cmd": "not-ok"}) == {"ok": False, "why": "handler said so"}


async def test_many_requests_on_one_connection_in_order(socket_path: Path) -> None:
    lines = b"".join(json.dumps({"cmd": "echo", "n": n}).encode() + b"\n" for n in range(5))
    replies = await raw_exchange(socket_path, lines, 5)
    assert [r["echo"]["n"] for r in replies] == list(range(5))


async def test_bad_lines_get_an_error_and_the_connection_goes_on(socket_path: Path) -> None:
    data = b"".join(
        [
            b"{not json\n",
            b"[1, 2]\n",
            b"\n",
            b"\xff\xfe\n",
            b"[" * 50000 + b"\n",  # nesting deep enough for RecursionError
            b'{"cmd": "echo"}\n',
        ]
    )
    replies = await raw_exchange(socket_path, data, 6)
    assert all(r["ok"] is False for r in replies[:5])
    assert replies[0]["error"].startswith("not JSON")
    assert replies[1]["error"] == "a request must be a JSON object, not list"
    assert replies[2]["error"].startswith("not JSON")
    assert replies[3]["error"].startswith("not JSON")
    assert replies[4]["error"].startswith("not JSON")
    assert replies[5] == {"ok": True, "echo": {"cmd": "echo"}}


async def test_handler_value_error_is_the_reply(socket_path: Path) -> None:
    assert await request(socket_path, {"cmd": "refuse"}) == {"ok": False, "error": "no such thing"}


async def test_handler_bug_is_logged_and_reported(
    socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="vhost_balloon.control"):
        reply = await request(socket_path, {"cmd": "crash"})
    assert reply == {"ok": False, "error": "internal error: RuntimeError: bug"}
    assert any(r.exc_info for r in caplog.records)
    reply = await request(socket_path, {"cmd": "unencodable"})
    assert reply["ok"] is False
    assert reply["error"].startswith("internal error")
    assert (await request(socket_path, {"cmd": "echo"}))["ok"] is True


async def test_oversized_line_is_refused_and_closed(socket_path: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        padding = "x" * (MAX_LINE + 10)
        writer.write(json.dumps({"cmd": "echo", "pad": padding}).encode() + b"\n")
        writer.write(b'{"cmd": "echo"}\n')  # after the refusal nothing more is read
        await writer.drain()
        reply = json.loads(await asyncio.wait_for(reader.readline(), 3))
        assert reply["ok"] is False
        assert str(MAX_LINE) in reply["error"]
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed
    finally:
        writer.close()
    # A line of exactly MAX_LINE bytes is still fine, and the server survives.
    body = {"cmd": "echo", "pad": ""}
    body["pad"] = "x" * (MAX_LINE - len(json.dumps(body)))
    assert len(json.dumps(body)) == MAX_LINE
    assert (await request(socket_path, body))["ok"] is True


async def test_final_line_without_newline_is_answered(socket_path: Path) -> None:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        writer.write(b'{"cmd": "echo"}')
        writer.write_eof()
        reply = json.loads(await asyncio.wait_for(reader.readline(), 3))
        assert reply == {"ok": True, "echo": {"cmd": "echo"}}
    finally:
        writer.close()


async def test_two_clients_are_served_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    arrived = 0
    both = asyncio.Event()

    async def rendezvous(request: dict[str, Any]) -> dict[str, Any]:
        # Each request waits for the other: this only finishes if the two
        # connections are handled at the same time.
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 3)
        return {"n": request["n"]}

    server = await serve_control(path, rendezvous)
    try:
        first, second = await asyncio.gather(request(path, {"n": 1}), request(path, {"n": 2}))
        assert (first, second) == ({"ok": True, "n": 1}, {"ok": True, "n": 2})
    finally:
        await close_control(server, path)


async def test_missing_socket_raises_control_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(ControlError, match="no control socket") as caught:
        control_request(path, {"cmd": "get"})
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, OSError)


async def test_stale_socket_raises_control_error(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))  # bound, never listening
        with pytest.raises(ControlError, match="nothing is listening") as caught:
            control_request(path, {"cmd": "get"})
    assert str(path) in str(caught.value)


async def test_no_reply_in_time_raises_control_error(socket_path: Path) -> None:
    with pytest.raises(ControlError, match=r"within 0\.2 s") as caught:
        await request(socket_path, {"cmd": "sleep", "seconds": 2}, timeout=0.2)
    assert str(socket_path) in str(caught.value)


async def test_server_closing_without_reply_raises_control_error(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.close()

    server = await asyncio.start_unix_server(hang_up, str(path))
    try:
        with pytest.raises(ControlError, match="without a reply"):
            await request(path, {"cmd": "get"})
    finally:
        server.close()
        await server.wait_closed()


async def test_socket_file_lifecycle(tmp_path: Path) -> None:
    path = tmp_path / "life.sock"
    server = await serve_control(path, handler)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(OSError, match="already listening"):
        await serve_control(path, handler)
    # An established client connection is ended by close_control too.
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(b'{"cmd": "echo"}\n')
    assert json.loads(await asyncio.wait_for(reader.readline(), 3))["ok"] is True
    await close_control(server, path)
    assert not path.exists()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    # A stale socket left behind is replaced; anything else is not touched.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    server = await serve_control(path, handler)
    assert (await request(path, {"cmd": "echo"}))["ok"] is True
    await close_control(server, path)
    path.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        await serve_control(path, handler)
    assert path.read_text() == "not a socket"


async def test_close_leaves_a_newer_servers_socket(tmp_path: Path) -> None:
    path = tmp_path / "reused.sock"
    old = await serve_control(path, handler)
    path.unlink()  # someone removed it and a new backend took the path
    new = await serve_control(path, handler)
    await close_control(old, path)
    assert path.exists()
    assert (await request(path, {"cmd": "echo"}))["ok"] is True
    await close_control(new, path)
    assert not path.exists()


def test_reply_limit_is_generous() -> None:
    assert control.MAX_REPLY >= 1 << 20
