"""`vhost-balloon demo`: the study at once. A real QEMU guest (`launch` with
its defaults) when one is at hand, else the backend and the mocked guest as
a child process over a temporary socket, and the two summaries as one."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from vhost_balloon.backend.cli import launch
from vhost_balloon.backend.cli.guest import add_guest_options, guest_command
from vhost_balloon.backend.cli.options import (
    UsageError,
    add_backend_options,
    add_latency_options,
    add_service_options,
    server_settings,
)
from vhost_balloon.backend.qemu import provisioning
from vhost_balloon.backend.server import Server, listen_unix
from vhost_balloon.protocol.samples import SUMMARY_KEYS
from vhost_balloon.protocol.units import two_columns

# The demo's options that `launch` has too, handed on to it.
SHARED_WITH_LAUNCH = (
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


def add_parser(commands: Any) -> None:
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
    add_backend_options(demo)
    add_latency_options(demo)
    add_service_options(demo)
    add_guest_options(demo)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(demo(args))


def qemu_at_hand() -> str | None:
    """Why the real guest cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "not root"
    if not (provisioning.cache_dir() / "env.sh").is_file():
        return "QEMU is not provisioned (vhost-balloon setup-qemu)"
    return None


async def demo(args: argparse.Namespace) -> int:
    why_not = qemu_at_hand() if args.guest != "mock" else "--guest mock"
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
    return await _demo_with_mock(args)


async def _demo_with_qemu(args: argparse.Namespace) -> int:
    """`launch` with its defaults and the demo's backend and latency options."""
    launch_args = launch.default_args()
    for name in SHARED_WITH_LAUNCH:
        setattr(launch_args, name, getattr(args, name))
    return await launch.launch(launch_args)


async def _demo_with_mock(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="vhost-balloon-") as run_dir:
        socket_path = Path(run_dir) / "balloon.sock"
        listener = listen_unix(socket_path)
        server = Server(server_settings(args))
        try:
            await server.start_services()
            server.start(listener)
            guest = await asyncio.create_subprocess_exec(
                *guest_command(args, socket_path),
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
    summary["injected"] = server.latency.settings.describe()
    summary["backend"] = {
        **totals.counters(),
        "discard_syscall_us_mean": (
            totals.discard_syscall_ns / totals.reports / 1000 if totals.reports else 0.0
        ),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_demo_summary(summary))
    return 0


def format_demo_summary(summary: dict[str, Any]) -> str:
    """The mocked guest's summary with the backend's view, as a table."""
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
        *((f"hold window {key}", f"{hold[key]:.0f} us") for key in SUMMARY_KEYS),
        ("integrity", "ok" if summary.get("integrity_ok") else "FAILED"),
    ]
    return two_columns(rows)


def _describe_injected(injected: dict[str, Any]) -> str:
    parts = [f"{point}={spec}" for point, spec in injected.get("delay", {}).items()]
    if injected.get("bql"):
        parts.append(f"bql {injected['bql']} on {','.join(injected.get('bql_phases', []))}")
    if injected.get("mmap_contention"):
        parts.append(f"mmap contention {injected['mmap_contention']}")
    return " ".join(parts) or "nothing"
