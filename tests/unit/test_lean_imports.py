"""The command line imports only what `serve` needs: matplotlib and numpy
(about 40 MiB of a backend's resident memory) load only to draw figures."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("matplotlib", "numpy", "PIL")


def test_building_the_command_line_loads_no_plotting_library() -> None:
    probe = (
        "import sys\n"
        "from vhost_balloon.backend.cli.main import build_parser\n"
        "build_parser()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "", f"loaded at start: {loaded.stdout.strip()}"
