"""`python -m build` makes an sdist and a wheel that install and run in a
fresh venv, and with pipx, away from the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_balloon import __version__

ROOT = Path(__file__).resolve().parents[2]
# Build and install need the package index (pip's own configuration): minutes, not seconds.
pytestmark = pytest.mark.timeout(900)


def run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """sdist and wheel built from a clean copy of the checkout (git's files)."""
    work = tmp_path_factory.mktemp("dist")
    source = work / "source"
    files = run("git", "ls-files", "-z", cwd=ROOT).split("\0")
    for name in filter(None, files):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        origin = ROOT / name
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        elif origin.exists():  # a file deleted but not yet committed is skipped
            shutil.copy2(origin, target)
    run(sys.executable, "-m", "build", "--outdir", work / "out", source, cwd=work)
    yield work / "out"


def test_build_makes_an_sdist_and_a_wheel_with_everything(dist: Path) -> None:
    (wheel,) = dist.glob(f"vhost_balloon-{__version__}-py3-none-any.whl")
    (sdist,) = dist.glob(f"vhost_balloon-{__version__}.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"vhost_balloon-{__version__}.dist-info/METADATA").decode()
    assert (
        f"vhost_balloon-{__version__}.data/data/share/qemu/vhost-user/50-vhost-user-balloon.json"
        in names
    )
    for field in (
        "Name: vhost-balloon",
        f"Version: {__version__}",
        "Requires-Python: >=3.11",
        "Summary: ",
        "Keywords: ",
        "Author: ",
        "Classifier: Typing :: Typed",
        "Requires-Dist: prometheus-client",
        "Description-Content-Type: text/markdown",
    ):
        assert field in metadata, field
    assert any(line.startswith("License") for line in metadata.splitlines())
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    for needed in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "share/qemu/vhost-user/50-vhost-user-balloon.json",
        "share/systemd/vhost-user-balloon@.service",
        "backend/cli/vhost_user.py",
    ):
        assert needed in members, needed


def check_installed(bin_dir: Path, cwd: Path) -> None:
    """What a user runs first, from the installed copy alone."""
    version = run(bin_dir / "vhost-balloon", "--version", cwd=cwd)
    assert version.strip() == f"vhost-balloon {__version__}"
    capabilities = run(bin_dir / "vhost-user-balloon", "--print-capabilities", cwd=cwd)
    assert json.loads(capabilities) == {"type": "balloon"}
    demo = json.loads(
        run(
            bin_dir / "vhost-balloon",
            "demo",
            "--guest",
            "mock",
            "--reports",
            "3",
            "--memory",
            "128M",
            "--json",
            cwd=cwd,
        )
    )
    assert demo["reports"] == 3 and demo["freed_bytes"] == demo["reported_bytes"]


def test_the_wheel_and_the_sdist_install_and_run_in_a_fresh_venv(
    dist: Path, tmp_path: Path
) -> None:
    for artifact in (*dist.glob("*.whl"), *dist.glob("*.tar.gz")):
        venv = tmp_path / artifact.name.replace(".", "-")
        run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
        run(venv / "bin/python", "-m", "pip", "install", "--quiet", artifact, cwd=tmp_path)
        check_installed(venv / "bin", cwd=tmp_path)
        # The descriptor and the units land under the venv's prefix.
        assert (venv / "share/qemu/vhost-user/50-vhost-user-balloon.json").is_file()
        assert (venv / "lib/systemd/system/vhost-user-balloon@.service").is_file()
        descriptor = json.loads(run(venv / "bin/vhost-balloon", "descriptor", cwd=tmp_path))
        assert descriptor["binary"] == str(venv / "bin/vhost-user-balloon")


def test_pipx_installs_the_wheel(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    env = {
        **os.environ,
        "PIPX_HOME": str(tmp_path / "pipx"),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
        "PIPX_MAN_DIR": str(tmp_path / "man"),
    }
    run(sys.executable, "-m", "pipx", "install", wheel, cwd=tmp_path, env=env)
    check_installed(tmp_path / "bin", cwd=tmp_path)
