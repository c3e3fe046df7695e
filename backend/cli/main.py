"""The `vhost-balloon` command line: serve, guest, demo.

`guest` and `demo` run the mocked guest as a separate process
(`python -m vhost_balloon.guest`): the backend never imports the guest, they meet over the
socket exactly as QEMU and the backend do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vhost_balloon.backend.balloon.device import BalloonSettings, NotifyPolicy
from vhost_balloon.backend.balloon.discard import DiscardStrategy
from vhost_balloon.backend.experiment import cli as experiment_cli
from vhost_balloon.backend.latency.contention import parse_bql, parse_mmap_contention
from vhost_balloon.backend.latency.injection import (
    ALL_BQL_PHASES,
    LatencySettings,
    Point,
    parse_bql_phases,
    parse_delay_option,
)
from vhost_balloon.backend.observe.control import ControlError, control_request
from vhost_balloon.backend.observe.metrics import parse_listen_address
from vhost_balloon.backend.qemu import launch, provisioning
from vhost_balloon.backend.qemu.provisioning import LaunchError
from vhost_balloon.backend.server import Server, ServerSettings, listen_unix, socket_from_fd
from vhost_balloon.protocol import units, virtio
from vhost_balloon.protocol.units import argument_type

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
    parser.add_argument(
        "--allow-unsealed-memory",
        action="store_true",
        help="accept guest RAM memfds not sealed against shrinking (a front-end that "
        "truncates one crashes the backend)",
    )


def _add_guest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory",
        type=_size,
        default=units.parse_size(DEMO_MEMORY),
        help=f"guest RAM size, K/M/G suffix (default {DEMO_MEMORY})",
    )
    parser.add_argument(
        "--reports",
        type=_count,
        default=DEMO_REPORTS,
        help=f"reports to send (default {DEMO_REPORTS})",
    )
    parser.add_argument(
        "--capacity",
        type=_count,
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


def _add_latency_options(parser: argparse.ArgumentParser) -> None:
    points = ", ".join(p.value for p in Point)
    parser.add_argument(
        "--delay",
        type=argument_type(parse_delay_option),
        action="append",
        default=[],
        metavar="POINT=MODEL",
        help=f"inject a delay (repeatable); POINT: {points}; MODEL: const:5ms, "
        "uniform:1ms..3ms, exp:2ms, lognormal:median=2ms,sigma=0.5, "
        "normal:mean=2ms,sd=0.5ms, replay:FILE",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every delay sequence")
    parser.add_argument(
        "--bql",
        type=argument_type(parse_bql),
        metavar="HOLD_MODEL@RATE[,threads=N]",
        help="a big lock taken RATE times/s by N threads, held for HOLD_MODEL",
    )
    parser.add_argument(
        "--bql-phases",
        type=argument_type(parse_bql_phases),
        default=ALL_BQL_PHASES,
        metavar="pop,publish,notify",
        help="report phases that take the big lock (default: all three)",
    )
    parser.add_argument(
        "--mmap-contention",
        type=argument_type(parse_mmap_contention),
        metavar="THREADS[,size=64M]",
        help="threads that map, protect and unmap memory in the backend",
    )


def _add_service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-socket",
        type=Path,
        metavar="PATH",
        help="JSON-lines control socket (see `vhost-balloon ctl`)",
    )
    parser.add_argument(
        "--metrics",
        type=argument_type(parse_listen_address),
        metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics",
    )


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
    _add_latency_options(serve)
    _add_service_options(serve)

    guest = commands.add_parser("guest", help="run the mocked guest against a backend")
    guest.add_argument("--socket-path", type=Path, required=True)
    guest.add_argument("--json", action="store_true", help="print one JSON summary object")
    _add_guest_options(guest)

    demo = commands.add_parser(
        "demo", help="the study at once: a real QEMU guest if one is at hand, else the mocked guest"
    )
    demo.add_argument("--json", action="store_true", help="print one JSON summary object")
    demo.add_argument(
        "--guest",
        choices=("auto", "qemu", "mock"),
        default="auto",
        help="auto (default): the real QEMU guest of `vhost-balloon launch` when QEMU is "
        "provisioned (`vhost-balloon setup-qemu`) and we are root, else the mocked guest",
    )
    _add_backend_options(demo)
    _add_latency_options(demo)
    _add_service_options(demo)
    _add_guest_options(demo)

    _add_launch_parser(commands)
    experiment_cli.add_parser(commands)
    setup = commands.add_parser(
        "setup-qemu", help="provision QEMU >= 10.2, the guest kernel and busybox (cached; root)"
    )
    setup.add_argument("--refresh", action="store_true", help="redo every step")

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
    return parser


def _add_launch_parser(commands: Any) -> None:
    launch = commands.add_parser(
        "launch",
        help="the backend beside a real QEMU and Linux guest (qemu-configs/)",
        description="Start the backend and QEMU (through qemu-configs/run-guest.sh) with the "
        "project's test guest or your own kernel/initrd, stream the console with host "
        "timestamps, stop both when the guest powers off or on Ctrl-C, print a summary. "
        "Arguments after -- go to QEMU.",
    )
    launch.add_argument(
        "--json", action="store_true", help="print one JSON summary (console goes to stderr)"
    )
    _add_backend_options(launch)
    _add_latency_options(launch)
    _add_service_options(launch)
    guest = launch.add_argument_group("guest and QEMU")
    guest.add_argument(
        "--workload",
        choices=("fill", "gigantic"),
        default="fill",
        help="fill: fill/free rounds; gigantic: allocate and free a 1 GiB page in a loop (fill)",
    )
    guest.add_argument("--rounds", type=_count, default=2, help="fill/free rounds (2)")
    guest.add_argument("--size", type=_count, default=300, metavar="MIB", help="MiB/round (300)")
    guest.add_argument("--pause", type=int, default=5, metavar="S", help="wait after a free (5)")
    guest.add_argument(
        "--settle",
        type=int,
        metavar="S",
        help="fill: wait before the end (0); gigantic: wait before the loop (20)",
    )
    guest.add_argument(
        "--duration", type=_count, default=30, metavar="S", help="gigantic: loop length (30)"
    )
    guest.add_argument("--mem", metavar="SIZE", help="guest RAM (fill 512M, gigantic 2560M)")
    guest.add_argument("--kernel", type=Path, metavar="FILE", help="your own guest kernel")
    guest.add_argument("--initrd", type=Path, metavar="FILE", help="your own initrd")
    guest.add_argument(
        "--append",
        metavar="STR",
        help="more kernel command line (gigantic: 'nokaslr init_on_alloc=0' unless given)",
    )
    guest.add_argument(
        "--baseline",
        action="store_true",
        help="QEMU's built-in virtio-balloon-pci,free-page-reporting=on instead of the backend",
    )
    guest.add_argument(
        "--no-balloon",
        action="store_true",
        help="no balloon device at all (gigantic workload's control; no backend)",
    )
    guest.add_argument("--console-log", type=Path, metavar="FILE", help="also write it here")
    guest.add_argument("--timeout", type=_count, default=900, metavar="S", help="kill QEMU after")
    guest.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto")
    guest.add_argument(
        "--mem-path", type=Path, metavar="DIR", help="guest RAM in a file in DIR (hugetlbfs)"
    )
    guest.add_argument(
        "--share", choices=("on", "off"), default="on", help="off: see QEMU's error only"
    )
    guest.add_argument("--qemu", metavar="BIN", help="another QEMU than the provisioned one")
    guest.add_argument(
        "--socket-path", type=Path, help="the backend's socket (default VB_RUN_DIR/launch-PID.sock)"
    )
    launch.add_argument("qemu_args", nargs="*", metavar="-- QEMU_ARG", help=argparse.SUPPRESS)


def _server_settings(args: argparse.Namespace) -> ServerSettings:
    latency = LatencySettings(
        delays=dict(args.delay),
        bql=args.bql,
        bql_phases=args.bql_phases,
        mmap=args.mmap_contention,
        seed=args.seed,
    )
    return ServerSettings(
        balloon=BalloonSettings(
            discard=DiscardStrategy(args.discard), notify=NotifyPolicy(args.notify)
        ),
        trace_path=args.trace,
        latency=latency,
        control_socket=args.control_socket,
        metrics_address=args.metrics,
        allow_unsealed_memory=args.allow_unsealed_memory,
    )


def _guest_command(args: argparse.Namespace, socket_path: Path) -> list[str]:
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
    if getattr(args, "discard", None):
        command += ["--discard-label", args.discard]
    return command


def capabilities() -> dict[str, Any]:
    # docs/interop/vhost-user.json: a "type" (balloon is one of the listed
    # VHostUserBackendType values); balloon defines no type-specific keys.
    return {"type": "balloon"}


async def _serve(args: argparse.Namespace) -> int:
    server = Server(_server_settings(args))
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
            json.dumps(server.runtime.describe()),
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


def _qemu_at_hand() -> str | None:
    """Why the real guest cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "not root"
    if not (provisioning.cache_dir() / "env.sh").is_file():
        return "QEMU is not provisioned (vhost-balloon setup-qemu)"
    return None


async def _demo_with_qemu(args: argparse.Namespace) -> int:
    """`launch` with its defaults and the demo's backend and latency options."""
    launch_args = build_parser().parse_args(["launch"])
    shared = (
        "json",
        "discard",
        "notify",
        "trace",
        "allow_unsealed_memory",
        "delay",
        "seed",
        "bql",
        "bql_phases",
        "mmap_contention",
        "control_socket",
        "metrics",
    )
    for name in shared:
        setattr(launch_args, name, getattr(args, name))
    return await _launch(launch_args)


async def _demo(args: argparse.Namespace) -> int:
    why_not = _qemu_at_hand() if args.guest != "mock" else "--guest mock"
    if why_not is None:
        return await _demo_with_qemu(args)
    if args.guest == "qemu":
        raise UsageError(f"no real guest: {why_not}")
    if args.guest == "auto":
        print(
            f"demo: no QEMU at hand ({why_not}): using the mocked guest",
            file=sys.stderr,
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="vhost-balloon-") as run_dir:
        socket_path = Path(run_dir) / "balloon.sock"
        listener = listen_unix(socket_path)
        server = Server(_server_settings(args))
        try:
            await server.start_services()
            server.start(listener)
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
    summary["injected"] = server.runtime.settings.describe()
    summary["backend"] = {
        **totals.counters(),
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
        ("injected", _describe_injected(summary.get("injected", {}))),
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


def _describe_injected(injected: dict[str, Any]) -> str:
    parts = [f"{point}={spec}" for point, spec in injected.get("delay", {}).items()]
    if injected.get("bql"):
        parts.append(f"bql {injected['bql']} on {','.join(injected.get('bql_phases', []))}")
    if injected.get("mmap_contention"):
        parts.append(f"mmap contention {injected['mmap_contention']}")
    return " ".join(parts) or "nothing"


def _setup_qemu(args: argparse.Namespace) -> int:
    script = provisioning.configs_dir() / "provision.sh"
    failure = provisioning.run_provision(script, *(["--refresh"] if args.refresh else []))
    if failure is not None:
        raise UsageError(failure)
    print(provisioning.cache_dir() / "env.sh")
    return 0


async def _launch(args: argparse.Namespace) -> int:
    if args.mem_path is not None and not args.mem_path.is_dir():
        raise UsageError(f"--mem-path {args.mem_path} is not a directory")
    if args.baseline and args.no_balloon:
        raise UsageError("--baseline and --no-balloon exclude each other")
    if args.no_balloon and args.workload != "gigantic":
        raise UsageError("--no-balloon is a control for --workload gigantic")
    if args.settle is not None and args.settle < 0:
        raise UsageError(f"--settle takes seconds >= 0, not {args.settle}")
    options = launch.LaunchOptions(
        workload=args.workload,
        rounds=args.rounds,
        size_mib=args.size,
        pause_s=args.pause,
        settle_s=args.settle,
        duration_s=args.duration,
        mem=args.mem,
        kernel=args.kernel,
        initrd=args.initrd,
        append=args.append,
        baseline=args.baseline,
        no_balloon=args.no_balloon,
        console_log=args.console_log,
        timeout_s=args.timeout,
        accel=args.accel,
        mem_path=args.mem_path,
        share=args.share,
        qemu=args.qemu,
        socket_path=args.socket_path,
        qemu_args=tuple(a for a in args.qemu_args if a != "--"),
        console_to_stderr=args.json,
    )
    settings = None if args.baseline or args.no_balloon else _server_settings(args)

    def note(text: str) -> None:
        print(f"launch: {text}", file=sys.stderr, flush=True)

    run = launch.Launch(options, settings, note, sys.stderr if args.json else sys.stdout)
    try:
        summary = await run.run()
    except LaunchError as error:
        raise UsageError(str(error)) from None
    failure = run.failure()
    if failure is not None:
        summary["error"] = failure
    print(json.dumps(summary, indent=2) if args.json else launch.format_summary(summary))
    if failure is not None:
        raise UsageError(failure)
    return 130 if run.interrupted else 0


def _ctl(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"cmd": args.ctl_command}
    if args.ctl_command == "set":
        delays: dict[str, str] = {}
        for item in args.delay:
            point, sep, model = item.partition("=")
            if not sep:
                raise UsageError(f"--delay '{item}': expected POINT=MODEL or POINT=none")
            delays[point.strip()] = model.strip()
        request["delay"] = delays
        if args.replace:
            request["replace"] = True
        for key, value in (
            ("bql", args.bql),
            ("bql_phases", args.bql_phases),
            ("mmap_contention", args.mmap_contention),
            ("seed", args.seed),
        ):
            if value is not None:
                request[key] = value
    try:
        reply = control_request(args.control_socket, request)
    except ControlError as error:
        raise UsageError(str(error)) from None
    if not reply.get("ok"):
        print(f"vhost-balloon ctl: {reply.get('error', 'refused')}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2))
    return 0


def _run_guest(args: argparse.Namespace) -> int:
    command = _guest_command(args, args.socket_path)
    if not args.json:
        command.remove("--json")
    return subprocess.run(command, check=False).returncode


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + (args.command == "serve"), 2),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.command in ("guest", "demo", "experiment"):
        # SIGTERM stops these as Ctrl-C does: the guest child is stopped,
        # the demo's backend closed and its temporary directory removed, a
        # sweep's running point stopped (QEMU first) and kept resumable.
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "serve":
            if args.print_capabilities:
                print(json.dumps(capabilities()))
                return 0
            return asyncio.run(_serve(args))
        if args.command == "guest":
            return _run_guest(args)
        if args.command == "ctl":
            return _ctl(args)
        if args.command == "launch":
            return asyncio.run(_launch(args))
        if args.command == "setup-qemu":
            return _setup_qemu(args)
        if args.command == "experiment":
            return experiment_cli.run(args)
        return asyncio.run(_demo(args))
    except (UsageError, OSError) as error:
        print(f"vhost-balloon {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: still one line, with where to look
        LOG.debug("unexpected error", exc_info=True)
        print(
            f"vhost-balloon {args.command}: internal error: {error!r} "
            "(run with -vv for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
