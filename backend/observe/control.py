"""The control socket: JSON lines over a unix socket, and its blocking client.

One JSON object per line in, exactly one per line out, in order, per
connection; connections are served concurrently. Every reply has "ok";
a failed request gets {"ok": false, "error": "..."} and the connection goes
on, except after a line over MAX_LINE bytes, which closes it (the rest of
that line cannot be told apart from the next request).

The socket is created mode 0600: whoever can connect can change the latency
settings of a running backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_balloon.backend.observe.linger import linger
from vhost_balloon.backend.vhost.server import bind_unix, unlink_if_ours

LOG = logging.getLogger("vhost_balloon.control")

MAX_LINE = 64 * 1024  # a request line, without its newline
MAX_REPLY = 16 * 1024 * 1024  # what the client accepts

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


# What control_request (and so ctl) waits for a reply. A server that does
# not answer a `set` in time must not apply it later: the latency settings
# refuse, unapplied, a change they cannot finish well within this.
CONTROL_TIMEOUT_S = 5.0


class ControlError(OSError):
    """The control socket could not be reached or gave no usable reply; the
    message names the socket's path."""


class ControlTimeout(ControlError):
    """No reply within the timeout: the request may or may not have been acted on."""


@dataclass(slots=True)
class _State:
    identity: tuple[int, int]  # (st_dev, st_ino) of the socket file we bound
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    closed: bool = False  # a connection accepted just before close is refused


_STATES: weakref.WeakKeyDictionary[asyncio.AbstractServer, _State] = weakref.WeakKeyDictionary()


async def serve_control(path: Path, handler: Handler) -> asyncio.AbstractServer:
    """Listen at `path` (replacing only a stale socket). Stop it with
    close_control(), which also ends open connections and removes the file."""
    bound = bind_unix(path, 0o600, role="control socket ")
    listener = bound.sock
    listener.setblocking(False)
    state = _State(bound.identity)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if state.closed:
            writer.close()
            return
        state.writers.add(writer)
        # Cancelled (loop shutdown with a client connected): end quietly;
        # Python 3.11's streams callback would report it as an error.
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await _serve_connection(reader, writer, handler)
            except OSError:
                pass  # the client went away mid-reply
            finally:
                state.writers.discard(writer)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    try:
        server = await asyncio.start_unix_server(on_client, sock=listener, limit=MAX_LINE)
    except BaseException:
        listener.close()
        raise
    _STATES[server] = state
    return server


async def close_control(server: asyncio.AbstractServer, path: Path) -> None:
    """Stop listening, end open connections, and remove the socket file if it
    is still the one this server bound (not a newer backend's)."""
    server.close()
    state = _STATES.pop(server, None)
    if state is not None:
        state.closed = True
        for writer in list(state.writers):
            writer.close()
        unlink_if_ours(path, state.identity)
    await server.wait_closed()


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
) -> None:
    while True:
        last = False
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as error:
            line, last = error.partial, True  # EOF: answer a final unterminated line
            if not line.strip():
                return
        except asyncio.LimitOverrunError:
            await _send(writer, _error(f"request line over {MAX_LINE} bytes; closing"))
            await linger(reader, writer)
            return
        await _send(writer, await _answer(line, handler))
        if last:
            return


async def _answer(line: bytes, handler: Handler) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as error:  # RecursionError: [[[[...]]]]
        return _error(f"not JSON: {error}")
    if not isinstance(request, dict):
        return _error(f"a request must be a JSON object, not {type(request).__name__}")
    try:
        reply = await handler(request)
    except ValueError as error:  # the request was understood and refused
        return _error(str(error))
    except Exception as error:
        LOG.exception("control request %.200r failed", request)
        return _error(f"internal error: {type(error).__name__}: {error}")
    if not isinstance(reply, dict):
        LOG.error("control handler returned %s, not a dict", type(reply).__name__)
        return _error("internal error: handler returned no object")
    return {"ok": True, **reply}


async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    try:
        text = json.dumps(reply)  # ensure_ascii: never a raw newline inside
    except (TypeError, ValueError) as error:
        LOG.error("control reply cannot be encoded: %s", error)
        text = json.dumps(_error(f"internal error: reply not JSON-serialisable: {error}"))
    writer.write(text.encode() + b"\n")
    await writer.drain()


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _is_socket(path: Path) -> bool:
    try:
        return path.is_socket()
    except OSError:
        return False


def control_request(
    path: Path, request: dict[str, Any], timeout: float = CONTROL_TIMEOUT_S
) -> dict[str, Any]:
    """Send one request and return its reply (which may say "ok": false).
    Raises ControlError, naming `path`, when the socket is missing, refuses,
    closes early, answers garbage or does not answer within `timeout` seconds
    (the whole exchange)."""
    data = json.dumps(request).encode() + b"\n"
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(data)
            buffer = bytearray()
            while b"\n" not in buffer:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError(
                        f"control socket {path} closed the connection without a reply"
                    )
                buffer += chunk
                if len(buffer) > MAX_REPLY:
                    raise ControlError(f"control socket {path}: reply over {MAX_REPLY} bytes")
    except ControlError:
        raise
    except FileNotFoundError:
        raise ControlError(
            f"no control socket at {path} (is the backend running with it?)"
        ) from None
    except ConnectionRefusedError:
        if not _is_socket(path):  # connect() to a regular file is refused too
            raise ControlError(f"{path} is not a socket") from None
        raise ControlError(f"nothing is listening on {path} (a stale socket?)") from None
    except TimeoutError:
        raise ControlTimeout(f"no reply from control socket {path} within {timeout:g} s") from None
    except OSError as error:
        raise ControlError(f"control socket {path}: {error.strerror or error}") from None
    line = bytes(buffer).partition(b"\n")[0]
    try:
        reply = json.loads(line)
    except ValueError as error:
        raise ControlError(f"control socket {path} replied with bad JSON: {error}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"control socket {path} replied with {type(reply).__name__}")
    return reply
