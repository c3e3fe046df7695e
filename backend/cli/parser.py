"""The `vhost-balloon` argument parser: the top level and each command's
parser (from its own module), in the order `--help` lists them."""

from __future__ import annotations

import argparse
from typing import Any

from vhost_balloon import __version__
from vhost_balloon.backend.cli import ctl, demo, descriptor, guest, launch, qemu_config, serve
from vhost_balloon.backend.experiment import cli as experiment_cli


def build_parser(serve_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """serve_defaults: what `serve --config FILE` read (see cli/config.py)."""
    parser = argparse.ArgumentParser(
        prog="vhost-balloon",
        description="A vhost-user virtio-balloon backend for studying free page reporting.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the backend's vhost-user capabilities as JSON and exit "
        "(as `serve --print-capabilities`)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands, serve_defaults)
    guest.add_parser(commands)
    demo.add_parser(commands)
    launch.add_parser(commands)
    experiment_cli.add_parser(commands)
    launch.add_setup_parser(commands)
    ctl.add_parser(commands)
    descriptor.add_parser(commands)
    qemu_config.add_parser(commands)
    return parser
