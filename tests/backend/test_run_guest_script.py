"""qemu-configs/run-guest.sh builds QEMU's command line: user values stay inside
their QEMU option, whatever they contain.

Runs the real script against a fake cache (a fake QEMU that records its argv,
a fake kernel and initrd), so no QEMU is needed.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "qemu-configs" / "run-guest.sh"


def _fake_cache(tmp_path: Path) -> dict[str, str]:
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "vmlinuz").write_text("k")
    (tmp_path / "initrd").write_text("i")
    qemu = tmp_path / "fake-qemu"
    qemu.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n')
    qemu.chmod(0o755)
    (cache / "env.sh").write_text(
        f"QEMU_MODE='user'\nQEMU='{qemu}'\nQEMU_VERSION='11.1.3'\nQEMU_VERSION_FULL='fake'\n"
        f"KERNEL='{tmp_path}/vmlinuz'\nVB_RUN_DIR='{tmp_path}'\nGUEST_KERNEL_VERSION='fake'\n"
    )
    return {**os.environ, "VHOST_BALLOON_CACHE": str(cache), "VB_INITRD": str(tmp_path / "initrd")}


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "--accel", "tcg", *args],
        env=_fake_cache(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_commas_in_paths_are_escaped_inside_qemu_options(tmp_path: Path) -> None:
    """`a,server=on.sock` must stay a path: QEMU's escape is ',,'."""
    sock = tmp_path / "a,server=on.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    mem_dir = tmp_path / "huge,share=off"
    mem_dir.mkdir()
    try:
        run = _run(tmp_path, "--mem-path", str(mem_dir), str(sock))
    finally:
        listener.close()
    assert run.returncode == 0, run.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    chardev = argv[argv.index("-chardev") + 1]
    assert chardev == f"socket,id=vub,path={str(sock).replace(',', ',,')}"
    backend = next(a for a in argv if a.startswith("memory-backend-file,"))
    assert f"mem-path={str(mem_dir).replace(',', ',,')},share=on" in backend
    assert not any(a.startswith("server=") or a == "share=off" for a in argv)


@pytest.mark.parametrize("mem", ["512M,maxmem=64G", "size=1G", ""])
def test_a_mem_that_is_not_a_size_is_refused(tmp_path: Path, mem: str) -> None:
    run = _run(tmp_path, "--mem", mem, "--builtin")  # --builtin ends the options
    assert run.returncode != 0
    assert "--mem must be a size" in run.stderr
    assert not (tmp_path / "argv").exists()
