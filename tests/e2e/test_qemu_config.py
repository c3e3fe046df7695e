"""The arguments `vhost-balloon qemu-config` prints, given to a real QEMU:
it accepts them, connects to the backend and realizes the device."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vhost_balloon.backend.observe.control import control_request
from vhost_balloon.backend.qemu.monitor import QemuMonitor

CLI = [sys.executable, "-m", "vhost_balloon.backend"]


def test_qemu_takes_the_generated_arguments_and_connects(
    provisioned: dict[str, str], run_dir: Path
) -> None:
    sock = run_dir / f"qemu-config-{os.getpid()}.sock"
    control = run_dir / f"qemu-config-{os.getpid()}.ctl"
    qmp = run_dir / f"qemu-config-{os.getpid()}.qmp"
    backend = subprocess.Popen(
        [*CLI, "serve", "--socket-path", str(sock), "--control-socket", str(control)],
        stderr=subprocess.PIPE,
        text=True,
    )
    qemu: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        while not control.exists():
            assert backend.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        generated = subprocess.run(
            [*CLI, "qemu-config", "--socket-path", str(sock), "--memory", "256M"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        qemu = subprocess.Popen(
            [
                provisioned["QEMU"],
                "-accel", "tcg", "-S", "-nodefaults", "-display", "none",
                "-qmp", f"unix:{qmp},server=on,wait=off",
                *shlex.split(generated),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        sessions: dict[str, object] = {}
        while not sessions:
            assert qemu.poll() is None, qemu.communicate()[1]
            assert time.monotonic() < deadline + 60, "QEMU never connected to the backend"
            sessions = control_request(control, {"cmd": "stats"})["sessions"]
            time.sleep(0.1)

        async def status() -> str:
            monitor = await QemuMonitor.connect(qmp, 30)  # waits for the socket, retries
            try:
                state = await monitor.status()
                await monitor.quit()
            finally:
                await monitor.close()
            return state

        assert asyncio.run(status()) == "prelaunch"  # the device realized; -S: not started
        _, errors = qemu.communicate(timeout=30)
        assert qemu.returncode == 0, errors
    finally:
        for process in (qemu, backend):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
