"""`vhost-user-balloon`: the backend as a vhost-user program, following the
"Backend program conventions" of QEMU's docs/interop/vhost-user.rst, named as
QEMU's own vhost-user-gpu and vhost-user-input are, so that QEMU, libvirt
(through the discovery descriptor, 50-vhost-user-balloon.json) and systemd
can start it:

- `--socket-path=PATH` or `--fd=FDNUM` (a listening or a connected unix
  socket), the two incompatible;
- `--print-capabilities` prints `{"type": "balloon"}` and exits 0, every
  other option and argument ignored, valid or not;
- it does not daemonize, ends cleanly on SIGTERM, and fails early with a
  status other than 0 and one line on stderr.

Every option of `vhost-balloon serve` works here too; this is that command
under the conventional name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from vhost_balloon import __version__
from vhost_balloon.backend.cli import serve
from vhost_balloon.backend.cli.main import parse_and_run

PROG = "vhost-user-balloon"


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """defaults: what --config FILE read (see cli/config.py)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A vhost-user virtio-balloon backend (free page reporting, inflate, "
        "deflate, stats), with latency injection for studying the reporting window.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    serve.add_arguments(parser)
    parser.set_defaults(command="serve", **(defaults or {}))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if serve.CAPABILITIES_OPTION in argv:  # the rest is ignored, as the conventions ask
        return serve.print_capabilities()
    return parse_and_run(build_parser, argv, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
