"""`vhost-balloon ctl`: one request to a running backend's control socket
(stats, get, set, balloon), its JSON reply printed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vhost_balloon.backend.cli.options import UsageError
from vhost_balloon.backend.latency.contention import with_absolute_hold_path
from vhost_balloon.backend.latency.delays import with_absolute_replay_path
from vhost_balloon.backend.latency.in_force import SET_BUDGET_S, STOP_TIMEOUT_S
from vhost_balloon.backend.observe.control import (
    CONTROL_TIMEOUT_S,
    ControlError,
    ControlTimeout,
    control_request,
)
from vhost_balloon.protocol.units import argument_type, parse_size


def add_parser(commands: Any) -> None:
    ctl = commands.add_parser("ctl", help="read statistics or change latency settings live")
    ctl.add_argument("--control-socket", type=Path, required=True, metavar="PATH")
    ctl_commands = ctl.add_subparsers(dest="ctl_command", required=True)
    ctl_commands.add_parser("stats", help="counters, per-session histograms, settings")
    ctl_commands.add_parser("get", help="the latency settings in force")
    change = ctl_commands.add_parser("set", help="change settings from the next report on")
    change.add_argument(
        "--delay",
        action="append",
        default=[],
        metavar="POINT=MODEL|none",
        help="set (or with =none remove) one point's delay; repeatable",
    )
    change.add_argument("--replace", action="store_true", help="drop every delay not given here")
    change.add_argument("--bql", metavar="SPEC|none")
    change.add_argument("--bql-phases", metavar="pop,publish,notify")
    change.add_argument("--mmap-contention", metavar="SPEC|none")
    change.add_argument("--seed", type=int)
    target = ctl_commands.add_parser(
        "balloon",
        help="set a guest's target memory size (as QMP balloon / virsh setmem do)",
        description="num_pages = (guest RAM - SIZE) / 4 KiB, then a config change "
        "interrupt: the guest's driver inflates or deflates towards it.",
    )
    target.add_argument(
        "size", type=argument_type(parse_size), metavar="SIZE", help="e.g. 768M or 1G"
    )
    target.add_argument(
        "--session", metavar="NAME", help="needed when several guests are connected"
    )


def control_request_of(args: argparse.Namespace) -> dict[str, Any]:
    """The control socket request the ctl arguments ask for."""
    request: dict[str, Any] = {"cmd": args.ctl_command}
    if args.ctl_command == "balloon":
        request["size"] = args.size
        if args.session is not None:
            request["session"] = args.session
    if args.ctl_command == "set":
        # The backend runs elsewhere: a relative replay path means ours, so
        # make it absolute here (the backend refuses relative ones).
        here = Path.cwd()
        delays: dict[str, str] = {}
        for item in args.delay:
            point, sep, model = item.partition("=")
            if not sep:
                raise UsageError(f"--delay '{item}': expected POINT=MODEL or POINT=none")
            delays[point.strip()] = with_absolute_replay_path(model.strip(), here)
        request["delay"] = delays
        if args.replace:
            request["replace"] = True
        bql = None if args.bql is None else with_absolute_hold_path(args.bql, here)
        for key, value in (
            ("bql", bql),
            ("bql_phases", args.bql_phases),
            ("mmap_contention", args.mmap_contention),
            ("seed", args.seed),
        ):
            if value is not None:
                request[key] = value
    return request


def run(args: argparse.Namespace) -> int:
    request = control_request_of(args)
    try:
        reply = control_request(args.control_socket, request, CONTROL_TIMEOUT_S)
    except ControlTimeout as error:
        if args.ctl_command != "set":
            raise UsageError(str(error)) from None
        raise UsageError(
            f"{error}; a backend that is not overloaded answers a set within "
            f"{SET_BUDGET_S + 2 * STOP_TIMEOUT_S:g} s, applied or refused, so this one may "
            "still apply it: check with `ctl get`"
        ) from None
    except ControlError as error:
        raise UsageError(str(error)) from None
    if not reply.get("ok"):
        print(f"vhost-balloon ctl: {reply.get('error', 'refused')}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0
