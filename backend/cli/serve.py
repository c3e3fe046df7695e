"""`vhost-balloon serve`: the backend on a unix socket (or an inherited fd)
until a signal, or until its one front-end leaves."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from vhost_balloon.backend.cli.options import (
    UsageError,
    add_backend_options,
    add_latency_options,
    add_service_options,
    server_settings,
)
from vhost_balloon.backend.server import Server, listen_unix, socket_from_fd

LOG = logging.getLogger("vhost_balloon")


def add_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="serve QEMU (or the mocked guest) on a socket")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket-path", type=Path, help="unix socket to listen on")
    where.add_argument("--fd", type=int, help="an already-listening unix socket to accept on")
    where.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the backend's capabilities as JSON and exit",
    )
    add_backend_options(serve)
    add_latency_options(serve)
    add_service_options(serve)


def capabilities() -> dict[str, Any]:
    # docs/interop/vhost-user.json: a "type" (balloon is one of the listed
    # VHostUserBackendType values); balloon defines no type-specific keys.
    return {"type": "balloon"}


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(capabilities()))
        return 0
    return asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> int:
    server = Server(server_settings(args))
    stop = asyncio.Event()
    stopper: asyncio.Task[None] | None = None
    if args.fd is not None:
        listener, listening = socket_from_fd(args.fd)
        where = f"fd {args.fd}"
        if not listening:  # one connected front-end: stop when it leaves
            server.adopt(listener)
            server.session_ended.clear()
            stopper = asyncio.get_running_loop().create_task(_stop_when(server.session_ended, stop))
    elif args.socket_path is not None:
        listener = listen_unix(args.socket_path)
        where = str(args.socket_path)
        listening = True
    else:
        raise UsageError("serve needs --socket-path PATH or --fd N")
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()  # a clean stop: the report in flight finishes first
            return
        # A second signal: the user will not wait out an injected delay.
        LOG.warning("second signal: exiting now, without waiting for the report in flight")
        if args.socket_path is not None:
            with contextlib.suppress(OSError):
                args.socket_path.unlink()
        os._exit(130)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        await server.start_services()
        if listening:
            server.start(listener)
        LOG.info(
            "serving virtio-balloon on %s (discard %s, latency %s)",
            where,
            args.discard,
            json.dumps(server.latency.describe()),
        )
        await stop.wait()
    finally:
        if stopper is not None:
            stopper.cancel()
        await server.close()
        listener.close()
        if args.socket_path is not None:
            with contextlib.suppress(OSError):
                args.socket_path.unlink()
        totals = server.totals()
        LOG.info(
            "stopped after %d sessions: %d reports, %d bytes freed",
            server.sessions_served,
            totals.reports,
            totals.freed_bytes,
        )
    return 0


async def _stop_when(event: asyncio.Event, stop: asyncio.Event) -> None:
    await event.wait()
    stop.set()
