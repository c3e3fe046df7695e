"""Finding (and if needed making) the QEMU, guest kernel and scripts that
`vhost-balloon launch` runs: qemu-configs/provision.sh and its CACHE/env.sh."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/vhost-balloon")
DEVICE = "vhost-user-test-device-pci"


class LaunchError(Exception):
    """Something the user can fix: one sentence, no traceback."""


def configs_dir() -> Path:
    """qemu-configs/ of the checkout this package runs from."""
    override = os.environ.get("VHOST_BALLOON_QEMU_CONFIGS")
    here = Path(override) if override else Path(__file__).resolve().parents[2] / "qemu-configs"
    if not (here / "run-guest.sh").is_file():
        raise LaunchError(
            f"{here}/run-guest.sh not found: run launch from a checkout of vhost-balloon "
            "or set VHOST_BALLOON_QEMU_CONFIGS to its qemu-configs directory"
        )
    return here


def cache_dir() -> Path:
    return Path(os.environ.get("VHOST_BALLOON_CACHE", str(DEFAULT_CACHE)))


def read_env(path: Path) -> dict[str, str]:
    """The KEY='value' assignments of a generated env.sh (no shell is run)."""
    values: dict[str, str] = {}
    for raw_line in path.read_text(encoding="utf-8").splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        values[key] = words[0] if words else ""
    return values


def ensure_provisioned(note: Callable[[str], None]) -> dict[str, str]:
    """CACHE/env.sh, running provision.sh first when it is missing.

    provision.sh's progress goes to stderr as it runs; a failure raises
    LaunchError with the step that failed and its reason."""
    env_file = cache_dir() / "env.sh"
    if not env_file.is_file():
        script = configs_dir() / "provision.sh"
        note(f"{env_file} not found: running {script} (QEMU, guest kernel, busybox)")
        failure = run_provision(script)
        if failure is not None:
            raise LaunchError(failure)
        if not env_file.is_file():
            raise LaunchError(f"{script} finished but did not write {env_file}")
    return read_env(env_file)


def run_provision(script: Path, *args: str) -> str | None:
    """Run provision.sh, echoing its output to stderr; None on success, else
    its `FAILED at step ...` sentence (or the exit status)."""
    process = subprocess.Popen(
        ["bash", str(script), *args],
        stdout=sys.stderr,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    assert process.stderr is not None
    failed: str | None = None
    for line in process.stderr:
        sys.stderr.write(line)
        if "FAILED at step" in line and failed is None:
            failed = line.strip().removeprefix("provision: ")
    status = process.wait()
    if status == 0:
        return None
    return f"provisioning failed: {failed}" if failed else f"{script} exited with status {status}"


def qemu_version(qemu: str) -> str:
    """`QEMU emulator version ...`, or LaunchError when it does not run."""
    try:
        result = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError as error:
        raise LaunchError(f"cannot run QEMU {qemu}: {error.strerror}") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"QEMU {qemu} --version did not answer within 60 s") from None
    first = (result.stdout or result.stderr).strip().splitlines()
    if result.returncode != 0 or not first:
        raise LaunchError(f"{qemu} --version failed (status {result.returncode})")
    return first[0]


def check_device(qemu: str, version: str) -> None:
    """LaunchError unless `qemu -device help` lists vhost-user-test-device-pci."""
    try:
        result = subprocess.run(
            [qemu, "-device", "help"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LaunchError(f"cannot list the devices of QEMU {qemu}: {error}") from None
    if f'"{DEVICE}"' not in result.stdout:
        raise LaunchError(
            f"{qemu} ({version}) has no {DEVICE} device, which needs QEMU >= 10.2: "
            "run qemu-configs/provision.sh and launch without --qemu, or use --baseline"
        )
