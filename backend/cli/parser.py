"""The `vhost-balloon` argument parser: the top level and each command's
parser (from its own module), in the order `--help` lists them."""

from __future__ import annotations

import argparse

from vhost_balloon.backend.cli import ctl, demo, guest, launch, serve
from vhost_balloon.backend.experiment import cli as experiment_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhost-balloon",
        description="A vhost-user virtio-balloon backend for studying free page reporting.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    guest.add_parser(commands)
    demo.add_parser(commands)
    launch.add_parser(commands)
    experiment_cli.add_parser(commands)
    launch.add_setup_parser(commands)
    ctl.add_parser(commands)
    return parser
