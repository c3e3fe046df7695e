"""`vhost-balloon guest`: the mocked guest as a child process
(`python -m vhost_balloon.guest`), its options and its command line, which
`demo` uses too. The backend never imports the guest: they meet over the
socket exactly as QEMU and the backend do."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from vhost_balloon.backend.cli.options import count
from vhost_balloon.protocol import units, virtio

DEMO_REPORTS = 300
DEMO_MEMORY = "1G"
# The mocked guest's own limit, checked here too so the command fails before it starts.
guest_memory = units.argument_type(units.parse_guest_memory)


def add_parser(commands: Any) -> None:
    guest = commands.add_parser("guest", help="run the mocked guest against a backend")
    guest.add_argument("--socket-path", type=Path, required=True)
    guest.add_argument("--json", action="store_true", help="print one JSON summary object")
    add_guest_options(guest)


def add_guest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory",
        type=guest_memory,
        default=units.parse_size(DEMO_MEMORY),
        help=f"guest RAM size, K/M/G/T suffix, at most 1T (default {DEMO_MEMORY})",
    )
    parser.add_argument(
        "--reports",
        type=count,
        default=DEMO_REPORTS,
        help=f"reports to send (default {DEMO_REPORTS})",
    )
    parser.add_argument(
        "--capacity",
        type=count,
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
    parser.add_argument(
        "--no-populate",
        action="store_true",
        help="the guest does not write its pages before reporting them",
    )


def guest_command(args: argparse.Namespace, socket_path: Path) -> list[str]:
    """`python -m vhost_balloon.guest ... --json` for the guest options in args."""
    command = [
        sys.executable,
        "-m",
        "vhost_balloon.guest",
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
    if getattr(args, "no_populate", False):
        command.append("--no-populate")
    if getattr(args, "discard", None):
        command += ["--discard-label", args.discard]
    return command


def run(args: argparse.Namespace) -> int:
    command = guest_command(args, args.socket_path)
    if not args.json:
        command.remove("--json")
    return subprocess.run(command, check=False).returncode
