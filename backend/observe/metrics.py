"""Latency histograms per session and a Prometheus endpoint for them.

Histograms are HDR histograms in microseconds (1 us .. 60 s, 3 significant
digits: every value is kept to within 0.1%). Each also keeps the exact sum
and maximum in nanoseconds, because a summary's `_sum` from HDR's mean would
be an approximation and HDR's mean walks the whole counts array.

The histograms are used on the event loop thread only; nothing is locked.
The HTTP endpoint serves from a thread of its own and asks that loop for
the text (see serve_metrics).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import math
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.observe.linger import linger
from vhost_balloon.protocol.samples import PERCENTILE_KEYS, PERCENTILES

LOG = logging.getLogger("vhost_balloon.metrics")

LOWEST_US = 1
HIGHEST_US = 60_000_000  # 60 s; longer values are counted as 60 s (exact max kept)
SIGNIFICANT_DIGITS = 3
QUANTILES = tuple(p / 100 for p in PERCENTILES)  # 0.5, 0.9, 0.99
FIXED = ("hold", "discard", "bql_wait")
INJECTED_PREFIX = "injected:"  # + the injection point, e.g. "injected:publish"
TOTAL_SESSION = "all"  # the session label of the totals over every session
ENDED_KEPT = 64  # ended sessions whose summaries stay exported

COUNTERS = (
    ("reports", "Reports handled (used entries published)."),
    ("entries", "Entries in the reports."),
    ("reported_bytes", "Bytes the guest reported free."),
    ("freed_bytes", "Bytes the host really freed (allocated blocks before - after)."),
    ("skipped_entries", "Entries not discarded: outside guest memory or unaligned."),
    ("discard_errors", "Discard syscalls that failed."),
    ("queue_errors", "Virtqueues broken by a malformed ring."),
)
SUMMARIES = (
    ("hold", "hold_seconds", "Kick to notification (or publish when none was sent) per report."),
    ("discard", "discard_seconds", "Time spent discarding one report's entries."),
    ("bql_wait", "bql_wait_seconds", "Time a report waited for the modelled big lock."),
)
INJECTED_HELP = "Delay injected per report at each injection point."


@dataclass(frozen=True, slots=True)
class Summary:
    """A histogram's numbers at one moment; what the endpoint shows."""

    count: int
    sum_ns: int
    max_ns: int
    quantiles_us: tuple[float, ...]  # in QUANTILES order; 0.0 when count == 0

    def percentiles(self) -> dict[str, float]:
        """The keys of protocol.samples.percentiles(), and "count"."""
        return {
            **dict(zip(PERCENTILE_KEYS, self.quantiles_us, strict=True)),
            "max": self.max_ns / 1000,
            "count": float(self.count),
        }


_EMPTY = Summary(0, 0, 0, (0.0,) * len(QUANTILES))


class _Series:
    def __init__(self) -> None:
        self._hdr = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self.count = 0
        self.sum_ns = 0
        self.max_ns = 0
        self._cached = _EMPTY

    def add(self, value_ns: int) -> None:
        if value_ns < 0:  # a missing timestamp, not a latency
            return
        self._hdr.record_value(min((value_ns + 500) // 1000, HIGHEST_US))
        self.count += 1
        self.sum_ns += value_ns
        self.max_ns = max(self.max_ns, value_ns)

    def summary(self) -> Summary:
        # Cached by count: an idle or ended session costs nothing per scrape.
        if self._cached.count != self.count:
            found = self._hdr.get_percentile_to_value_dict([q * 100 for q in QUANTILES])
            # HDR answers the top of a value's bucket, which can pass the real max.
            top = self.max_ns / 1000
            values = tuple(min(float(found[q * 100]), top) for q in QUANTILES)
            self._cached = Summary(self.count, self.sum_ns, self.max_ns, values)
        return self._cached


class Histograms:
    """HDR histograms in microseconds of one session (or of all of them):
    hold (kick -> notify), discard (t_discard_done - t_discard_start),
    bql_wait, and the delay injected at each injection point."""

    def __init__(self, parent: Histograms | None = None) -> None:
        self._parent = parent  # the totals, fed with every record too
        self._series: dict[str, _Series] = {name: _Series() for name in FIXED}

    def record(
        self,
        record: ReportRecord,
        bql_wait_ns: int = 0,
        injected_ns: Mapping[str, int] | None = None,
    ) -> None:
        """Add one report. bql_wait_ns is recorded for every report (0 when no
        lock is modelled), so its count matches the report count."""
        hold_ns = record.kick_to_notify_ns
        if hold_ns is not None:
            self._series["hold"].add(hold_ns)
        if record.t_discard_start_ns and record.t_discard_done_ns:
            self._series["discard"].add(record.t_discard_done_ns - record.t_discard_start_ns)
        self._series["bql_wait"].add(bql_wait_ns)
        for point, delay_ns in (injected_ns or {}).items():
            name = INJECTED_PREFIX + point
            series = self._series.get(name)
            if series is None:
                series = self._series[name] = _Series()
            series.add(delay_ns)
        if self._parent is not None:
            self._parent.record(record, bql_wait_ns, injected_ns)

    def names(self) -> list[str]:
        """Names: "hold", "discard", "bql_wait", then "injected:POINT" per point seen."""
        return list(self._series)

    def percentiles(self, name: str) -> dict[str, float]:
        """{"p50", "p90", "p99", "max", "count"}, in microseconds; all 0.0 when
        nothing was recorded (JSON-safe: never NaN). KeyError for an unknown name."""
        return self._series[name].summary().percentiles()

    def summaries(self) -> dict[str, Summary]:
        return {name: series.summary() for name, series in self._series.items()}


class Metrics:
    """Per-session Histograms, their totals, and the server's counters rendered
    in the Prometheus text exposition format 0.0.4.

    The totals (session="all") include every session ever served. An ended
    session's series stay exported, frozen, for the last ENDED_KEPT (64)
    ended sessions, so a scrape after a short session still sees it while
    the exposition does not grow without bound on a long-running server.
    """

    def __init__(self) -> None:
        self.total = Histograms()
        self._live: dict[str, Histograms] = {}
        self._ended: OrderedDict[str, dict[str, Summary]] = OrderedDict()

    def session(self, name: str) -> Histograms:
        """The live session's histograms, created on first use. A name reused
        after its session ended starts afresh (its ended series are dropped)."""
        histograms = self._live.get(name)
        if histograms is None:
            if name == TOTAL_SESSION:
                raise ValueError(f"session name {name!r} is reserved for the totals")
            self._ended.pop(name, None)
            histograms = self._live[name] = Histograms(self.total)
        return histograms

    def end_session(self, name: str) -> None:
        """Freeze the session's summaries (its data stays in the totals)."""
        histograms = self._live.pop(name, None)
        if histograms is None:
            return
        self._ended[name] = histograms.summaries()  # the HDR arrays are freed
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def render(
        self,
        counters: Mapping[str, int],
        sessions_live: int,
        extra_counters: Sequence[tuple[str, str, int]] = (),
    ) -> str:
        """The exposition text. counters must hold every key of COUNTERS;
        skipped_entries may instead be given as skipped_outside + skipped_unaligned
        (as DeviceStats.as_dict() has them). extra_counters: (name, help, value)
        of counters that are not the device's (the trace's), printed as
        vhost_balloon_NAME_total."""
        values = dict(counters)
        if "skipped_entries" not in values and "skipped_outside" in values:
            values["skipped_entries"] = values["skipped_outside"] + values.get(
                "skipped_unaligned", 0
            )
        missing = [key for key, _ in COUNTERS if key not in values]
        if missing:
            raise KeyError(f"counters missing: {', '.join(missing)}")
        out: list[str] = []
        for key, help_text in COUNTERS:
            name = f"vhost_balloon_{key}_total"
            out += _header(name, "counter", help_text)
            out.append(f"{name} {int(values[key])}")
        for key, help_text, value in extra_counters:
            name = f"vhost_balloon_{key}_total"
            out += _header(name, "counter", help_text)
            out.append(f"{name} {int(value)}")
        out += _header("vhost_balloon_sessions", "gauge", "Front-ends connected now.")
        out.append(f"vhost_balloon_sessions {int(sessions_live)}")

        sessions = list(self._sessions())
        for key, suffix, help_text in SUMMARIES:
            name = f"vhost_balloon_{suffix}"
            out += _header(name, "summary", help_text + ' session="all" is every session.')
            for session, summaries in sessions:
                out += _summary(name, {"session": session}, summaries[key])
        injected = [
            (s, n, summary)
            for s, summaries in sessions
            for n, summary in summaries.items()
            if n.startswith(INJECTED_PREFIX)
        ]
        if injected:
            name = "vhost_balloon_injected_seconds"
            out += _header(name, "summary", INJECTED_HELP)
            for session, key, summary in injected:
                point = key.removeprefix(INJECTED_PREFIX)
                out += _summary(name, {"session": session, "point": point}, summary)
        return "\n".join(out) + "\n"

    def _sessions(self) -> Iterator[tuple[str, dict[str, Summary]]]:
        yield TOTAL_SESSION, self.total.summaries()
        for name, histograms in self._live.items():
            yield name, histograms.summaries()
        yield from self._ended.items()


def _header(name: str, kind: str, help_text: str) -> list[str]:
    escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {escaped}", f"# TYPE {name} {kind}"]


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f'{key}="{escape_label(value)}"' for key, value in labels.items())


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _summary(name: str, labels: Mapping[str, str], summary: Summary) -> list[str]:
    base = _labels(labels)
    lines = []
    for quantile, value_us in zip(QUANTILES, summary.quantiles_us, strict=True):
        # An empty summary's quantiles are NaN by Prometheus convention.
        value = value_us / 1e6 if summary.count else math.nan
        lines.append(f'{name}{{{base},quantile="{quantile}"}} {_number(value)}')
    lines.append(f"{name}_sum{{{base}}} {_number(summary.sum_ns / 1e9)}")
    lines.append(f"{name}_count{{{base}}} {summary.count}")
    return lines


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# --- the HTTP endpoint -------------------------------------------------------
#
# The endpoint runs on a thread of its own with its own event loop, so that
# whatever clients do to it (a flood of connections, slow clients, accept()
# failing for want of fds) costs that loop, never the one serving the
# vhost-user sessions. render() reads state the caller's loop owns and
# mutates unlocked (the HDR histograms, the session tables), so it is called
# on that loop, one call at a time, its text shared by every request waiting.

MAX_REQUEST = 8192  # request line + headers
READ_TIMEOUT = 10.0  # a client that never finishes its request is dropped
WRITE_TIMEOUT = 10.0  # ... and one that never reads its answer
RENDER_TIMEOUT = 5.0  # the caller's loop did not render in time: 503
MAX_CONNECTIONS = 16  # served at once; more wait in the kernel's backlog
IDLE_GRACE_S = 1.0  # at the cap, a connection this old without a request is dropped
BACKLOG = 64  # beyond it the kernel refuses connections: no fd of ours is spent
ACCEPT_RETRY_S = 0.1
LOG_EVERY_S = 10.0  # a repeated failure is logged at most this often
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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
