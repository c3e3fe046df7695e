"""One point run on a Dask worker, wherever it is: in a scratch directory of
the worker's own, shipped back whole to the client, which writes it under
the sweep's output directory. So no filesystem needs to be shared between
the client and the workers, and a point whose worker dies leaves nothing
half written in the output.

Imported by the workers (by name, through pickle): it must import nothing
the client alone has.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_balloon import __version__
from vhost_balloon.backend.experiment.points import RESULT, run_point, write_result
from vhost_balloon.backend.experiment.spec import Point

# What a worker-side path in a row (an error's "see DIR/guest.log") becomes
# on the client, which knows where the point's files landed.
WORKER_DIR = "{point-dir}"


@dataclass
class Shipped:
    """A point's row and every file it wrote, relative to its directory."""

    row: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def worker_facts() -> dict[str, str]:
    """What the client checks on each worker before it sends a point."""
    return {"version": __version__, "host": socket.gethostname()}


def run_shipped(point: Point, dir_name: str, worker: str) -> Shipped:
    """Run `point` in a scratch directory named `dir_name` (a point's
    directory name is part of its identity), then read it all back."""
    scratch = Path(tempfile.mkdtemp(prefix="vbx-point-"))
    directory = scratch / dir_name
    try:
        row = run_point(point, directory)
        row["worker"] = worker
        if isinstance(row.get("error"), str):
            row["error"] = row["error"].replace(str(directory), WORKER_DIR)
        files = {}
        for path in sorted(directory.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.name != RESULT:
                files[str(path.relative_to(directory))] = path.read_bytes()
        return Shipped(row, files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def land(shipped: Shipped, directory: Path) -> dict[str, Any]:
    """Write a shipped point into `directory` (replacing what a previous try
    left), its result.json last, as a point run here is; the row."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for relative, data in shipped.files.items():
        target = (directory / relative).resolve()
        if not target.is_relative_to(directory.resolve()):
            continue  # a name that would escape the directory is not ours
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    row = dict(shipped.row)
    if isinstance(row.get("error"), str):
        row["error"] = row["error"].replace(WORKER_DIR, str(directory))
    write_result(directory, row)
    return row
