"""`vhost-balloon serve`: the backend on a unix socket (or an inherited fd)
until a signal, or until its one front-end leaves."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from vhost_balloon.backend.balloon.features import qemu_device_properties
from vhost_balloon.backend.cli import systemd
from vhost_balloon.backend.cli.config import add_config_option
from vhost_balloon.backend.cli.options import (
    UsageError,
    add_backend_options,
    add_latency_options,
    add_service_options,
    server_settings,
)
from vhost_balloon.backend.server import Server
from vhost_balloon.backend.vhost.server import (
    DEFAULT_SOCKET_MODE,
    UnixListener,
    bind_unix,
    check_unix_path,
    socket_from_fd,
)
from vhost_balloon.protocol.units import argument_type
from vhost_balloon.protocol.virtio import describe_features

LOG = logging.getLogger("vhost_balloon")
CONNECT_RETRY_S = 0.2
CAPABILITIES_OPTION = "--print-capabilities"


def add_parser(commands: Any, defaults: dict[str, Any] | None = None) -> None:
    """defaults: values a config file gave, which the command line overrides."""
    serve = commands.add_parser("serve", help="serve QEMU (or the mocked guest) on a socket")
    add_arguments(serve)
    serve.set_defaults(**(defaults or {}))


def add_arguments(serve: argparse.ArgumentParser) -> None:
    """serve's options, on its subparser or on vhost-user-balloon's parser."""
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket-path", type=Path, help="unix socket to listen on")
    where.add_argument(
        "--fd",
        type=argument_type(parse_fd),
        help="an inherited unix socket: listening (accept front-ends) or connected (serve one)",
    )
    where.add_argument(
        "--connect",
        type=Path,
        metavar="PATH",
        help="connect to a front-end that listens at PATH (QEMU's -chardev "
        "socket,server=on,wait=on), retrying until it does; serve it, and exit when it "
        "hangs up",
    )
    where.add_argument(
        CAPABILITIES_OPTION,
        action="store_true",
        help="print the backend's capabilities as JSON and exit (every other option "
        "is then ignored, as the vhost-user backend conventions ask)",
    )
    serve.add_argument(
        "--socket-mode",
        type=argument_type(parse_socket_mode),
        metavar="OCTAL",
        help=f"permissions of the --socket-path socket (default {DEFAULT_SOCKET_MODE:04o}: "
        "this user only; e.g. 0660 for a QEMU running as another user of the group)",
    )
    add_config_option(serve)
    add_backend_options(serve)
    add_latency_options(serve)
    add_service_options(serve)


def options_parser() -> argparse.ArgumentParser:
    """serve's options alone: what a config file's keys are checked against."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


def parse_fd(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"--fd takes a file descriptor number (0 or more), not {text!r}")
    return int(text)


def parse_socket_mode(text: str) -> int:
    """An octal mode such as 0600 or 660, permission bits only."""
    digits = text.removeprefix("0o")
    if not digits or any(c not in "01234567" for c in digits) or int(digits, 8) > 0o777:
        raise ValueError(
            f"--socket-mode takes octal permissions 0000-0777 (e.g. 0660), not {text!r}"
        )
    return int(digits, 8)


def capabilities() -> dict[str, Any]:
    # docs/interop/vhost-user.json: a "type" (balloon is one of the listed
    # VHostUserBackendType values); balloon defines no type-specific keys.
    return {"type": "balloon"}


def print_capabilities() -> int:
    print(json.dumps(capabilities()))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:  # main() has usually answered it before parsing
        return print_capabilities()
    return asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> int:
    activated = False
    if not getattr(args, "where_from_cli", False):
        # systemd's socket wins over where a config file says to serve (the
        # same file may serve a manual start); the command line wins over both.
        fd = systemd.listen_fd()
        if fd is not None:
            args.fd, args.socket_path, args.connect, args.socket_mode = fd, None, None, None
            activated = args.activated = True
    if args.fd is None and args.socket_path is None and args.connect is None:
        raise UsageError(
            "serve needs --socket-path PATH, --connect PATH or --fd N "
            "(or a socket from systemd: LISTEN_FDS)"
        )
    if args.socket_path is None and args.socket_mode is not None:
        raise UsageError("--socket-mode applies to --socket-path (the socket this process makes)")
    if args.connect is not None:
        check_unix_path(args.connect)
    if args.control_socket is not None:  # else bind() says only "AF_UNIX path too long"
        check_unix_path(args.control_socket)
    server = Server(server_settings(args))
    stop = asyncio.Event()
    stopper: asyncio.Task[None] | None = None
    bound: UnixListener | None = None  # the socket file this process made
    listener: socket.socket | None = None
    listening = False
    if args.connect is not None:
        where = f"front-end socket {args.connect} (connecting)"
    elif args.fd is not None:
        listener, listening = socket_from_fd(args.fd)
        where = f"fd {args.fd}" + (" (from systemd)" if activated else "")
        if not listening:  # one connected front-end: stop when it leaves
            server.adopt(listener)
            server.session_ended.clear()
            stopper = asyncio.get_running_loop().create_task(_stop_when(server.session_ended, stop))
    else:
        mode = DEFAULT_SOCKET_MODE if args.socket_mode is None else args.socket_mode
        if mode & 0o002:
            LOG.warning("socket mode %04o: every local user can connect as a front-end", mode)
        bound = bind_unix(args.socket_path, mode)
        listener, listening = bound.sock, True
        where = str(args.socket_path)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()  # a clean stop: the report in flight finishes first
            return
        # A second signal: the user will not wait out an injected delay.
        LOG.warning("second signal: exiting now, without waiting for the report in flight")
        if bound is not None:
            bound.remove()
        os._exit(130)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    notifier = systemd.Notifier()
    reloads: set[asyncio.Task[None]] = set()
    one_reload_at_a_time = asyncio.Lock()  # FIFO: the last SIGHUP is applied last

    serving = False
    hangup_while_starting = False

    def on_hangup() -> None:
        nonlocal hangup_while_starting
        if not serving:  # a reload now would race the startup (and say READY early)
            hangup_while_starting = True
            return
        task = loop.create_task(reload(server, args, notifier, one_reload_at_a_time), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # At once: SIGHUP's default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, on_hangup)

    try:
        await server.start_services()
        if args.connect is not None:
            stopper = loop.create_task(serve_connected(server, args.connect, stop), name="connect")
        elif listening:
            assert listener is not None
            server.start(listener)
        LOG.info(
            "serving virtio-balloon on %s (discard %s, latency %s)",
            where,
            args.discard,
            json.dumps(server.latency.describe()),
        )
        features = server.settings.balloon.features
        LOG.info(
            "offering %s; QEMU: -device vhost-user-test-device-pci,chardev=CHARDEV,%s",
            describe_features(features),
            qemu_device_properties(features),
        )
        notifier.ready(f"serving on {where}")
        serving = True
        if hangup_while_starting:
            on_hangup()
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            task.cancel()  # a cancelled reload says nothing more to systemd
        notifier.stopping()
        if stopper is not None:
            stopper.cancel()
        await server.close()
        if listener is not None:
            listener.close()
        if bound is not None:
            bound.remove()  # only if still ours: not a newer backend's socket
        totals = server.totals()
        LOG.info(
            "stopped after %d sessions: %d reports, %d bytes freed",
            server.sessions_served,
            totals.reports,
            totals.freed_bytes,
        )
    return 0


async def reload(
    server: Server, args: argparse.Namespace, notifier: systemd.Notifier, lock: asyncio.Lock
) -> None:
    """SIGHUP: read --config again (the command line still overriding it)
    and apply what can change while serving: the latency settings at once,
    the balloon settings for sessions that connect from now on. One at a
    time, in the order the signals came. A file or command line that no
    longer parses changes nothing; settings only a restart can change are
    named."""
    async with lock:
        notifier.reloading()
        await _reload(server, args)
        notifier.ready("serving (reloaded)")  # not on cancellation: the stop says STOPPING


async def _reload(server: Server, args: argparse.Namespace) -> None:
    again = getattr(args, "reload", None)
    if again is None:
        LOG.info("SIGHUP: started without --config, nothing to read again")
        return
    try:
        # Off the loop: a replay:FILE delay is read and parsed.
        fresh = await asyncio.get_running_loop().run_in_executor(None, again)
        settings = server_settings(fresh)
    except UsageError as error:
        LOG.error("SIGHUP: %s; nothing changed", error)
        return
    except SystemExit:  # argparse: a command-line value that no longer parses (said above)
        LOG.error("SIGHUP: the command line no longer parses (see above); nothing changed")
        return
    except Exception as error:  # nothing a reload meets may end the service
        LOG.error("SIGHUP: reading %s failed: %r; nothing changed", args.config, error)
        return
    try:
        restart_only = await server.reconfigure(settings)
    except ValueError as error:
        LOG.error("SIGHUP: %s", error)
        return
    if not getattr(args, "activated", False):  # else systemd's socket is where it serves
        restart_only += [
            dest.replace("_", "-")
            for dest in ("socket_path", "connect", "socket_mode", "fd")
            if getattr(fresh, dest) is not None and getattr(fresh, dest) != getattr(args, dest)
        ]
    LOG.info(
        "SIGHUP: %s read again; latency %s", args.config, json.dumps(server.latency.describe())
    )
    for name in restart_only:
        LOG.warning("SIGHUP: %s changed; it takes effect when the backend restarts", name)


async def serve_connected(server: Server, path: Path, stop: asyncio.Event) -> None:
    """Client mode: connect to the front-end once it listens, serve that one
    session, and stop when it ends. It never connects again: QEMU 11.1.3's
    vhost-user-test-device aborts on a second connection (docs/qemu.md,
    "Restarting the backend")."""
    conn = await connect_unix(path, CONNECT_RETRY_S)
    LOG.info("connected to the front-end at %s", path)
    server.session_ended.clear()
    server.adopt(conn)
    await server.session_ended.wait()
    stop.set()


async def connect_unix(path: Path, retry_s: float) -> socket.socket:
    """A connection to `path`, retried every `retry_s` while nobody listens
    there; each new reason for failing is logged once."""
    last_reason = ""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(path))
            return sock
        except OSError as error:
            sock.close()
            reason = error.strerror or str(error)
            if reason != last_reason:
                LOG.warning(
                    "cannot connect to %s (%s); retrying every %.1f s", path, reason, retry_s
                )
                last_reason = reason
        await asyncio.sleep(retry_s)


async def _stop_when(event: asyncio.Event, stop: asyncio.Event) -> None:
    await event.wait()
    stop.set()
