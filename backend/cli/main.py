"""The `vhost-balloon` command line: serve, guest, demo, launch, experiment,
setup-qemu, ctl, descriptor, qemu-config (one module each under backend/cli/; parser.py
puts their parsers together; vhost_user.py is the `vhost-user-balloon`
program). This module runs one: its logging, its signals, and how
it ends (0, 1, 2 for the user's mistakes, 130 when interrupted).

`guest` and `demo` run the mocked guest as a separate process
(`python -m vhost_balloon.guest`): the backend never imports the guest, they meet over the
socket exactly as QEMU and the backend do.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vhost_balloon.backend.cli import ctl, demo, descriptor, guest, launch, qemu_config, serve
from vhost_balloon.backend.cli.config import parse_with_config
from vhost_balloon.backend.cli.options import UsageError
from vhost_balloon.backend.cli.parser import build_parser
from vhost_balloon.backend.experiment import cli as experiment_cli

LOG = logging.getLogger("vhost_balloon")
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": serve.run,
    "guest": guest.run,
    "ctl": ctl.run,
    "launch": launch.run,
    "setup-qemu": launch.run_setup,
    "experiment": experiment_cli.run,
    "demo": demo.run,
    "descriptor": descriptor.run,
    "qemu-config": qemu_config.run,
}


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if asks_for_capabilities(argv):
        return serve.print_capabilities()
    return parse_and_run(build_parser, argv)


def parse_and_run(
    build: Callable[[dict[str, Any]], argparse.ArgumentParser],
    argv: Sequence[str],
    prog: str | None = None,
) -> int:
    """argv parsed (serve's --config file read in) and run; prog: what its
    errors start with (default: `vhost-balloon COMMAND`)."""
    try:
        args = parse_with_config(build, argv, serve.options_parser())
    except UsageError as error:  # a config file's mistake
        print(f"{prog or 'vhost-balloon serve'}: {error}", file=sys.stderr)
        return 2
    return run(args, prog or f"vhost-balloon {args.command}")


def asks_for_capabilities(argv: Sequence[str]) -> bool:
    """--print-capabilities with no command or with serve: as the vhost-user
    backend conventions ask, every other option and argument is then ignored
    (not refused)."""
    if serve.CAPABILITIES_OPTION not in argv:
        return False
    command = next((word for word in argv if word in COMMANDS), None)
    return command in (None, "serve")


def run(args: argparse.Namespace, prog: str) -> int:
    """Run the parsed command: its logging, its signals, and how it ends
    (errors are one line prefixed with prog)."""
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
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{prog}: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: still one line, with where to look
        LOG.debug("unexpected error", exc_info=True)
        print(
            f"{prog}: internal error: {error!r} (run with -vv for the traceback)",
            file=sys.stderr,
        )
        return 1


def describe_os_error(error: OSError) -> str:
    """ "PATH: reason" rather than "[Errno 13] Permission denied: 'PATH'"; a
    message made by this project (no errno) as it is."""
    if error.errno is None or not error.strerror:
        return str(error)
    if error.filename is None:
        return error.strerror
    names = [error.filename] + ([error.filename2] if error.filename2 is not None else [])
    return f"{' -> '.join(map(str, names))}: {error.strerror}"


if __name__ == "__main__":
    raise SystemExit(main())
