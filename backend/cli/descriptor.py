"""`vhost-balloon descriptor`: the vhost-user discovery descriptor of this
installation, the JSON file through which QEMU's management layers (libvirt)
find a backend program: `description`, `type` and the absolute path of its
`binary` (QEMU's docs/interop/vhost-user.json, `VhostUserBackend`).

The package installs one in share/qemu/vhost-user/ naming
/usr/bin/vhost-user-balloon, where a distribution's package puts the
program. Any other installation (a venv, pipx, ~/.local) writes its own
with `--write DIR`: /etc/qemu/vhost-user for the whole host, or
~/.config/qemu/vhost-user for one user. libvirt reads all three folders and
takes the first file by name, a more specific folder's file hiding a file
of the same name in a more general one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from vhost_balloon.backend.cli.options import UsageError

FILE_NAME = "50-vhost-user-balloon.json"
PROGRAM = "vhost-user-balloon"
DESCRIPTION = "vhost-balloon: virtio-balloon (free page reporting, inflate, stats) over vhost-user"
DISTRIBUTION_BINARY = Path("/usr/bin") / PROGRAM


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "descriptor",
        help="print (or write) the vhost-user discovery descriptor for QEMU and libvirt",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--binary",
        type=Path,
        metavar="PATH",
        help=f"the program it names (default: the {PROGRAM} installed beside this Python)",
    )
    parser.add_argument(
        "--write",
        type=Path,
        metavar="DIR",
        help=f"write DIR/{FILE_NAME} (made atomically; DIR is created) instead of printing it",
    )


def descriptor(binary: Path) -> dict[str, Any]:
    return {"description": DESCRIPTION, "type": "balloon", "binary": str(binary)}


def render(binary: Path) -> str:
    return json.dumps(descriptor(binary), indent=2) + "\n"


def installed_binary() -> Path:
    """The vhost-user-balloon script of the installation this code runs from:
    beside the running vhost-balloon script, else in the scripts folder of
    this Python's default or per-user (pip --user) scheme."""
    folders = [Path(sys.argv[0]).resolve().parent] if sys.argv and sys.argv[0] else []
    folders.append(Path(sysconfig.get_path("scripts")))
    folders.append(Path(sysconfig.get_path("scripts", f"{os.name}_user")))
    for folder in folders:
        if (folder / PROGRAM).is_file():
            return folder / PROGRAM
    return folders[-2] / PROGRAM  # named in the error


def run(args: argparse.Namespace) -> int:
    binary = installed_binary() if args.binary is None else args.binary
    if not binary.is_absolute():
        raise UsageError(f"--binary {binary}: the descriptor needs an absolute path")
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise UsageError(f"{binary}: no such program here (install the package, or give --binary)")
    text = render(binary)
    if args.write is None:
        print(text, end="")
        return 0
    args.write.mkdir(parents=True, exist_ok=True)
    target = args.write / FILE_NAME
    with tempfile.NamedTemporaryFile(
        "w", dir=args.write, prefix=f".{FILE_NAME}.", delete=False
    ) as f:
        f.write(text)
    os.chmod(f.name, 0o644)
    os.replace(f.name, target)
    print(target)
    return 0
