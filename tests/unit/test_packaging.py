"""One installed name: `vhost_balloon`, whatever the folders of a checkout are called."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("protocol", "backend", "guest")


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def test_every_package_folder_is_installed_under_vhost_balloon() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]  # type: ignore[index]
    listed = set(setuptools["packages"])
    found = {"vhost_balloon"}
    for folder in FOLDERS:
        assert setuptools["package-dir"][f"vhost_balloon.{folder}"] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join(("vhost_balloon", *parts)))
    assert listed == found


def test_the_checkout_names_match_the_installed_names() -> None:
    for folder in FOLDERS:
        link = ROOT / "vhost_balloon" / folder
        assert link.is_symlink()
        assert link.resolve() == (ROOT / folder).resolve()


def _copy_checkout(target: Path) -> Path:
    """The files a clean checkout has: a build in the checkout itself would
    leave build/ behind, whose stale modules a later wheel would pick up."""
    shutil.copy(ROOT / "pyproject.toml", target)
    shutil.copy(ROOT / "README.md", target)
    shutil.copy(ROOT / "LICENSE", target)
    for folder in FOLDERS:
        shutil.copytree(
            ROOT / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copytree(ROOT / "vhost_balloon", target / "vhost_balloon", symlinks=True)
    shutil.copytree(ROOT / "share", target / "share")  # the descriptor and the units
    return target


def test_a_wheel_installs_only_vhost_balloon(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    source = _copy_checkout(tmp_path / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path, source],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {
        name.split("/")[0]
        for name in names
        if not name.split("/")[0].endswith((".dist-info", ".data"))
    }
    assert top == {"vhost_balloon"}
    data = {name.split(".data/data/", 1)[1] for name in names if ".data/data/" in name}
    assert data == {
        "share/qemu/vhost-user/50-vhost-user-balloon.json",
        "lib/systemd/system/vhost-user-balloon@.socket",
        "lib/systemd/system/vhost-user-balloon@.service",
    }
    modules = {name for name in names if name.endswith(".py")}
    expected = {"vhost_balloon/__init__.py"} | {  # every module of the checkout, and only those
        f"vhost_balloon/{module.relative_to(ROOT).as_posix()}"
        for folder in FOLDERS
        for module in (ROOT / folder).rglob("*.py")
    }
    assert modules == expected
    assert "vhost_balloon/backend/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        scripts = archive.read(entry_points).decode()
    assert "vhost-balloon = vhost_balloon.backend.cli.main:main" in scripts
    assert "vhost-user-balloon = vhost_balloon.backend.cli.vhost_user:main" in scripts

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", site, wheel],
        check=True,
        capture_output=True,
    )
    installed = {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")}
    # bin/: the console scripts; share/: the descriptor (pip --target drops the
    # units' lib/, where a --prefix or venv installation has them)
    assert installed == {"vhost_balloon", "bin", "share"}
    assert {p.name for p in (site / "bin").iterdir()} == {"vhost-balloon", "vhost-user-balloon"}
    # Outside the checkout, from the installed copy alone: the old names are gone.
    probe = (
        "import importlib.util, sys\n"
        "import vhost_balloon.guest.cli, vhost_balloon.backend.cli.main\n"
        f"assert vhost_balloon.backend.cli.main.__file__.startswith({str(site)!r})\n"
        "sys.exit(any(importlib.util.find_spec(n) for n in ('protocol', 'backend', 'guest')))\n"
    )
    subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site)},
    )
