"""The Prometheus endpoint: /metrics over HTTP, on a thread of its own.

The endpoint runs on a thread with its own event loop, so that whatever
clients do to it (a flood of connections, slow clients, accept() failing
for want of fds) costs that loop, never the one serving the vhost-user
sessions. render() reads state the caller's loop owns and mutates unlocked
(the HDR histograms, the session tables), so it is called on that loop, one
call at a time, its text shared by every request waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from vhost_balloon.backend.observe.linger import linger

LOG = logging.getLogger("vhost_balloon.metrics")

MAX_REQUEST = 8192  # request line + headers
READ_TIMEOUT = 10.0  # a client that never finishes its request is dropped
WRITE_TIMEOUT = 10.0  # ... and one that never reads its answer
RENDER_TIMEOUT = 5.0  # the caller's loop did not render in time: 503
MAX_CONNECTIONS = 16  # served at once; more wait in the kernel's backlog
IDLE_GRACE_S = 1.0  # at the cap, a connection this old without a request is dropped
BACKLOG = 64  # beyond it the kernel refuses connections: no fd of ours is spent
ACCEPT_RETRY_S = 0.1
LOG_EVERY_S = 10.0  # a repeated failure is logged at most this often
# What generate_latest() writes (its default escaping): the classic text format.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]")
_HEADER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:.*")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _BadRequest(Exception):
    pass


class _Throttled:
    """One log line that may repeat (accept failures, render failures):
    logged at most once per LOG_EVERY_S, with how many were left out."""

    def __init__(self, level: int, message: str) -> None:
        self._level = level
        self._message = message
        self._next = 0.0
        self._dropped = 0

    def __call__(self, detail: object, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now < self._next:
            self._dropped += 1
            return
        more = f" ({self._dropped} more since the last)" if self._dropped else ""
        LOG.log(self._level, "%s: %s%s", self._message, detail, more, exc_info=exc_info)
        self._next, self._dropped = now + LOG_EVERY_S, 0


class MetricsServer(asyncio.AbstractServer):
    """The /metrics endpoint on its own thread and event loop (see above).
    close() and wait_closed() are called from the caller's loop."""

    def __init__(self, listeners: list[socket.socket], render: Callable[[], str]) -> None:
        self._listeners = listeners
        self._render = render
        self._caller = asyncio.get_running_loop()  # render() runs there
        self._loop: asyncio.AbstractEventLoop | None = None  # the endpoint's, once started
        self._stop: asyncio.Event | None = None
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._connections: set[asyncio.Task[None]] = set()
        # Connections still reading their request, oldest first: when accepted.
        self._idle: dict[asyncio.Task[None], float] = {}
        self._slot_freed: asyncio.Event | None = None
        self._rendering: asyncio.Future[str] | None = None
        self._accept_failed = _Throttled(logging.ERROR, "metrics: accepting a connection failed")
        self._at_cap = _Throttled(
            logging.WARNING,
            "metrics: connections over the cap wait in the backlog",
        )
        self._failed = _Throttled(logging.ERROR, "metrics request failed")
        self._loop_error = _Throttled(logging.ERROR, "metrics event loop")
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._listeners)

    async def start(self) -> None:
        self._thread.start()
        await asyncio.wrap_future(self._started)

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(stop.set)

    async def wait_closed(self) -> None:
        await asyncio.wrap_future(self._stopped)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._caller

    def is_serving(self) -> bool:
        return self._thread.is_alive() and not self._stopped.done()

    async def start_serving(self) -> None:
        """Serving already: start() did it."""

    async def serve_forever(self) -> None:
        await self.wait_closed()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # never silently: the endpoint is gone
            LOG.exception("metrics endpoint stopped")
            if not self._started.done():
                self._started.set_exception(error)
        finally:
            for listener in self._listeners:
                listener.close()
            self._stopped.set_result(None)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(
            lambda _, context: self._loop_error(context.get("message"), context.get("exception"))
        )
        self._stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        accepting = [asyncio.create_task(self._accept(sock)) for sock in self._listeners]
        self._started.set_result(None)
        try:
            await self._stop.wait()
        finally:
            tasks = [*accepting, *self._connections]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_slot()
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as error:  # EMFILE, ENFILE, ENOBUFS: retry, quietly
                self._accept_failed(error)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            task = asyncio.create_task(self._connection(conn))
            self._connections.add(task)
            self._idle[task] = time.monotonic()
            task.add_done_callback(self._connection_done)

    async def _wait_for_slot(self) -> None:
        # At the cap, accept nothing: the kernel holds the next ones (and
        # refuses them past BACKLOG), so a flood costs no fd here and little
        # CPU. A connection that has sent no request IDLE_GRACE_S after it
        # was accepted makes room, so a scrape queued behind a flood of idle
        # connections waits about BACKLOG / MAX_CONNECTIONS seconds.
        assert self._slot_freed is not None
        while len(self._connections) >= MAX_CONNECTIONS:
            self._at_cap(f"{MAX_CONNECTIONS} open")
            wait = IDLE_GRACE_S
            oldest = next(iter(self._idle.items()), None)
            if oldest is not None:
                task, accepted = oldest
                wait = accepted + IDLE_GRACE_S - time.monotonic()
                if wait <= 0:
                    del self._idle[task]
                    task.cancel()  # its slot is freed when it has ended
                    wait = IDLE_GRACE_S
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._slot_freed.wait()

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        self._idle.pop(task, None)
        assert self._slot_freed is not None
        self._slot_freed.set()

    def _request_read(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._idle.pop(task, None)  # busy now: never dropped to make room

    async def _connection(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            conn.close()
            return
        try:
            await _handle(reader, writer, self._render_on_caller, self._request_read)
        except (OSError, TimeoutError):
            pass  # the client went away or stalled; nothing to answer
        except Exception as error:
            self._failed(repr(error), error)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _render_on_caller(self) -> str:
        """render() on the caller's loop; requests arriving while one call is
        in flight share its text. TimeoutError if it takes RENDER_TIMEOUT."""
        if self._rendering is None:
            try:
                done = asyncio.run_coroutine_threadsafe(self._render_once(), self._caller)
            except RuntimeError:  # the caller's loop is closed: shutting down
                raise TimeoutError("the backend's event loop has stopped") from None
            self._rendering = asyncio.wrap_future(done)
            self._rendering.add_done_callback(self._render_done)
        async with asyncio.timeout(RENDER_TIMEOUT):
            return await asyncio.shield(self._rendering)

    async def _render_once(self) -> str:
        return self._render()

    def _render_done(self, future: asyncio.Future[str]) -> None:
        self._rendering = None
        if not future.cancelled() and future.exception() is not None:
            self._failed(f"render: {future.exception()!r}", future.exception())


async def serve_metrics(host: str, port: int, render: Callable[[], str]) -> MetricsServer:
    """A minimal HTTP/1.1 server: GET (or HEAD) /metrics -> render(); one
    request per connection, at most MAX_CONNECTIONS at once. Never lets a
    client's bytes raise out of it. Binds before returning (an OSError
    naming the address if it cannot) and logs where it listens, warning
    when that is reachable from other hosts."""
    listeners = await _listen_tcp(host, port)
    for listener in listeners:
        address = _address(listener.getsockname())
        LOG.info("metrics at http://%s/metrics", address)
        if not ipaddress.ip_address(listener.getsockname()[0]).is_loopback:
            LOG.warning(
                "metrics on %s are reachable from other hosts, by anyone who can reach "
                "this one; give 127.0.0.1:PORT to keep them local",
                address,
            )
    server = MetricsServer(listeners, render)
    try:
        await server.start()
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return server


async def _listen_tcp(host: str, port: int) -> list[socket.socket]:
    """A listening socket on each address `host` resolves to, all on the same
    port (the first one's, when port is 0)."""
    where = _address((host, port))
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as error:  # socket.gaierror: "Name or service not known"
        raise OSError(f"metrics address {where}: {error.strerror or error}") from None
    listeners: list[socket.socket] = []
    try:
        for family, _, _, _, resolved in dict.fromkeys(infos):
            address = resolved
            if listeners and port == 0:
                address = (resolved[0], listeners[0].getsockname()[1], *resolved[2:])
            listeners.append(_listen_one(family, address))
    except OSError as error:
        for listener in listeners:
            listener.close()
        raise OSError(f"cannot serve metrics on {where}: {error.strerror or error}") from None
    return listeners


def _listen_one(family: int, address: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio does: "::" is not also 0.0.0.0
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _address(sockname: tuple[Any, ...]) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    render: Callable[[], Awaitable[str]],
    request_read: Callable[[], None],
) -> None:
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            head = await _read_head(reader)
        request_read()
        method, path = _parse(head)
    except _BadRequest as error:
        async with asyncio.timeout(WRITE_TIMEOUT):
            await _respond(writer, 400, f"{error}\n")
        await linger(reader, writer)
        return
    if path != "/metrics":
        status, body = 404, "not found; try /metrics\n"
    elif method not in ("GET", "HEAD"):
        status, body = 405, "only GET and HEAD\n"
    else:
        try:
            status, body = 200, await render()
        except TimeoutError:
            status, body = 503, "the backend did not render its metrics in time\n"
        except Exception:  # logged where the render finished
            status, body = 500, "rendering failed\n"
    async with asyncio.timeout(WRITE_TIMEOUT):
        await _respond(writer, status, body, include_body=method != "HEAD")


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    buffer = b""
    while True:
        for end in (b"\r\n\r\n", b"\n\n"):
            found = buffer.find(end)
            if found >= 0:
                if found > MAX_REQUEST:
                    raise _BadRequest(f"request head over {MAX_REQUEST} bytes")
                return buffer[:found]
        if len(buffer) > MAX_REQUEST:
            raise _BadRequest(f"request head over {MAX_REQUEST} bytes")
        chunk = await reader.read(4096)
        if not chunk:
            raise _BadRequest("connection closed before the end of the request head")
        buffer += chunk


def _parse(head: bytes) -> tuple[str, str]:
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise _BadRequest("malformed request line")
    if not all(_HEADER.fullmatch(line) for line in lines[1:]):
        raise _BadRequest("malformed header line")
    method, target = match.group(1).decode(), match.group(2).decode("ascii", "replace")
    return method, target.partition("?")[0]


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: str, include_body: bool = True
) -> None:
    data = body.encode()
    kind = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n"
    )
    if status == 405:
        head += "Allow: GET, HEAD\r\n"
    writer.write(head.encode() + b"\r\n" + (data if include_body else b""))
    await writer.drain()


def parse_listen_address(text: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT", "[IPV6]:PORT", ":PORT" or "PORT".

    An empty host means 127.0.0.1: the endpoint is never on every interface
    unless asked ("0.0.0.0:9464", "[::]:9464"). Port 0 picks a free port."""
    original = text
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad listen address {original!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"bad listen address {original!r}: {host!r} is not an IPv6 address"
            ) from None
        port_text = rest[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(
                f"bad listen address {original!r}: put an IPv6 address in brackets, e.g. [::1]:9464"
            )
        host = host or "127.0.0.1"
    else:
        host, port_text = "127.0.0.1", text
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"bad listen address {original!r}: bad host {host!r}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(
            f"bad listen address {original!r}: port must be a number 0-65535, got {port_text!r}"
        )
    return host, int(port_text)
