"""The import contracts in pyproject.toml hold, and each one breaks when it is violated.

A contract that cannot fail is no contract: for each one, a copy of the
source tree gets one forbidden import, and lint-imports must name that
contract as broken (and only that one stays broken once the line is gone).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# contract id -> (module that gets the import, the forbidden import)
VIOLATIONS = {
    "roles": ("guest/runner.py", "import vhost_balloon.backend.balloon.records"),
    "protocol-pure": ("protocol/virtio.py", "import vhost_balloon.guest.errors"),
    "backend-rooms": ("backend/balloon/report_plan.py", "import vhost_balloon.backend.observe"),
    "vhost-generic": ("backend/vhost/worker.py", "import vhost_balloon.backend.latency.delays"),
    "balloon-latency": (
        "backend/balloon/device.py",
        "import vhost_balloon.backend.latency.contention",
    ),
}


def _contracts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        config = tomllib.load(f)["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def _copy_tree(target: Path) -> Path:
    for folder in ("protocol", "backend", "guest"):
        shutil.copytree(
            ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    (target / "vhost_balloon").mkdir()
    shutil.copy(ROOT / "vhost_balloon" / "__init__.py", target / "vhost_balloon")
    for folder in ("protocol", "backend", "guest"):
        (target / "vhost_balloon" / folder).symlink_to(f"../{folder}")
    shutil.copy(ROOT / "pyproject.toml", target)
    return target


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # cwd first on sys.path: the copy, not the checkout the venv points to.
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--config", "pyproject.toml"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )


def test_every_contract_has_a_violation_below() -> None:
    assert set(_contracts()) == set(VIOLATIONS)


def test_the_checkout_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout
    for name in _contracts().values():
        assert f"{name} KEPT" in result.stdout


@pytest.mark.parametrize("contract", sorted(VIOLATIONS))
def test_a_violation_breaks_its_contract(tmp_path: Path, contract: str) -> None:
    tree = _copy_tree(tmp_path)
    module, line = VIOLATIONS[contract]
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = _lint(tree)
    assert result.returncode == 1, result.stdout
    assert f"{_contracts()[contract]} BROKEN" in result.stdout
