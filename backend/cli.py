"""The `vhost-balloon` command line: serve, guest, demo.

`guest` and `demo` run the mocked guest as a separate process
(`python -m guest`): the backend never imports the guest, they meet over the
socket exactly as QEMU and the backend do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backend.balloon import BalloonSettings, NotifyPolicy
from backend.discard import DiscardStrategy
from backend.server import Server, ServerSettings, listen_unix, socket_from_fd
from protocol import units, virtio
from protocol.units import argument_type

LOG = logging.getLogger("vhost_balloon")
DEMO_REPORTS = 300
DEMO_MEMORY = "1G"


class UsageError(Exception):
    """A mistake on the command line or in the environment: one sentence, exit 2."""


_size = argument_type(units.parse_size)
_count = argument_type(units.parse_positive_int)


def _add_backend_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--discard",
        choices=DiscardStrategy.names(),
        default="punch-hole",
        help="how reported pages are given back (default: punch-hole)",
    )
    parser.add_argument(
        "--notify",
        choices=[p.value for p in NotifyPolicy],
        default="always",
        help="signal the call eventfd after every report (default) or only "
        "when the driver's EVENT_IDX asks",
    )
    parser.add_argument(
        "--trace", type=Path, metavar="FILE", help="append one JSON line per report to FILE"
    )


def _add_guest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", default=DEMO_MEMORY, help="guest RAM size (K/M/G suffix)")
    parser.add_argument("--reports", type=int, default=DEMO_REPORTS, help="reports to send")
    parser.add_argument(
        "--capacity",
        type=int,
        default=virtio.PAGE_REPORTING_CAPACITY,
        help="entries per report: 32 (Linux >= 5.7) or 16 (2019 series)",
    )
    parser.add_argument(
        "--order", type=int, default=9, choices=(9, 10), help="entry order: 9 = 2 MiB, 10 = 4 MiB"
    )
    parser.add_argument(
        "--regions",
        type=int,
        default=1,
        choices=range(1, 9),
        metavar="1..8",
        help="guest RAM regions (default 1)",
    )
    parser.add_argument("--no-indirect", action="store_true", help="direct NEXT chains only")
    parser.add_argument("--no-event-idx", action="store_true", help="do not use EVENT_IDX")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhost-balloon",
        description="A vhost-user virtio-balloon backend for studying free page reporting.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve QEMU (or the mocked guest) on a socket")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket-path", type=Path, help="unix socket to listen on")
    where.add_argument("--fd", type=int, help="an already-listening unix socket to accept on")
    where.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the backend's capabilities as JSON and exit",
    )
    _add_backend_options(serve)

    guest = commands.add_parser("guest", help="run the mocked guest against a backend")
    guest.add_argument("--socket-path", type=Path, required=True)
    guest.add_argument("--json", action="store_true", help="print one JSON summary object")
    _add_guest_options(guest)

    demo = commands.add_parser("demo", help="backend + mocked guest over a real socket")
    demo.add_argument("--json", action="store_true", help="print one JSON summary object")
    _add_backend_options(demo)
    _add_guest_options(demo)
    return parser


def _balloon_settings(args: argparse.Namespace) -> BalloonSettings:
    return BalloonSettings(discard=DiscardStrategy(args.discard), notify=NotifyPolicy(args.notify))


def _guest_command(args: argparse.Namespace, socket_path: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "guest",
        "--socket-path",
        str(socket_path),
        "--json",
        "--memory",
        str(args.memory),
        "--reports",
        str(args.reports),
        "--capacity",
        str(args.capacity),
        "--order",
        str(args.order),
        "--regions",
        str(args.regions),
    ]
    if args.no_indirect:
        command.append("--no-indirect")
    if args.no_event_idx:
        command.append("--no-event-idx")
    if getattr(args, "discard", None):
        command += ["--discard-label", args.discard]
    return command


def capabilities() -> dict[str, Any]:
    # docs/interop/vhost-user.json: a "type" (balloon is one of the listed
    # VHostUserBackendType values); balloon defines no type-specific keys.
    return {"type": "balloon"}


async def _serve(args: argparse.Namespace) -> int:
    server = Server(ServerSettings(_balloon_settings(args), args.trace))
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
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if listening:
        server.start(listener)
    LOG.info("serving virtio-balloon on %s (discard %s)", where, args.discard)
    try:
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


async def _demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="vhost-balloon-") as run_dir:
        socket_path = Path(run_dir) / "balloon.sock"
        listener = listen_unix(socket_path)
        server = Server(ServerSettings(_balloon_settings(args), args.trace))
        server.start(listener)
        try:
            guest = await asyncio.create_subprocess_exec(
                *_guest_command(args, socket_path),
                stdout=subprocess.PIPE,
                stderr=None if not args.json else subprocess.PIPE,
            )
            out, err = await guest.communicate()
        finally:
            await server.close()
            listener.close()
    if guest.returncode != 0:
        detail = (err or b"").decode(errors="replace").strip().splitlines()
        raise UsageError("the mocked guest failed" + (f": {detail[-1]}" if detail else ""))
    summary: dict[str, Any] = json.loads(out)
    totals = server.totals()
    summary["discard"] = args.discard
    summary["backend"] = {
        "reports": totals.reports,
        "entries": totals.entries,
        "reported_bytes": totals.reported_bytes,
        "freed_bytes": totals.freed_bytes,
        "skipped_entries": totals.skipped_outside + totals.skipped_unaligned,
        "discard_errors": totals.discard_errors,
        "queue_errors": totals.queue_errors,
        "discard_syscall_us_mean": (
            totals.discard_syscall_ns / totals.reports / 1000 if totals.reports else 0.0
        ),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    mib = 1 << 20
    hold = summary["hold_us"]
    backend = summary.get("backend", {})
    rows = [
        ("discard strategy", str(summary.get("discard"))),
        (
            "reports",
            f"{summary['reports']} ({summary['entries']} entries, "
            f"capacity {summary.get('capacity')}, order {summary.get('order')})",
        ),
        ("reported", f"{summary['reported_bytes'] / mib:.0f} MiB"),
        ("freed on the host", f"{summary['freed_bytes'] / mib:.0f} MiB (guest's memfd view)"),
        ("freed, backend's view", f"{backend.get('freed_bytes', 0) / mib:.0f} MiB"),
        ("hold window p50", f"{hold['p50']:.0f} us"),
        ("hold window p90", f"{hold['p90']:.0f} us"),
        ("hold window p99", f"{hold['p99']:.0f} us"),
        ("hold window max", f"{hold['max']:.0f} us"),
        ("integrity", "ok" if summary.get("integrity_ok") else "FAILED"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _run_guest(args: argparse.Namespace) -> int:
    command = _guest_command(args, args.socket_path)
    if not args.json:
        command.remove("--json")
    return subprocess.run(command, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + (args.command == "serve"), 2),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            if args.print_capabilities:
                print(json.dumps(capabilities()))
                return 0
            return asyncio.run(_serve(args))
        if args.command == "guest":
            return _run_guest(args)
        return asyncio.run(_demo(args))
    except (UsageError, OSError) as error:
        print(f"vhost-balloon {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
