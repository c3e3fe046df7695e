"""The `vhost-balloon` command line: serve, guest, demo, launch, experiment,
setup-qemu, ctl (one module each under backend/cli/; parser.py puts their
parsers together). This module runs one: its logging, its signals, and how
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

from vhost_balloon.backend.cli import ctl, demo, guest, launch, serve
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
}


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
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"vhost-balloon {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"vhost-balloon {args.command}: {describe_os_error(error)}", file=sys.stderr)
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
