"""launch drives QEMU through QMP (qemu.qmp): the version and run state in
the summary, a second QMP socket for the user while the guest runs, and a
stop that goes through QMP (system_powerdown, then quit) before signals.
(The fallbacks, step by step, are in tests/backend/test_qemu_stop.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from qemu.qmp import QMPClient

from tests.e2e.conftest import LAUNCH, ROOT


def test_qmp_is_the_users_while_the_guest_runs_and_stops_it(
    provisioned: dict[str, str], run_dir: Path, tmp_path: Path
) -> None:
    user_qmp = run_dir / f"e2e-user-{os.getpid()}.qmp"
    console = tmp_path / "console.log"
    launch = subprocess.Popen(
        [*LAUNCH, "--json", "--console-log", str(console), "--qmp", str(user_qmp),
         "--rounds", "50", "--size", "64", "--pause", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "VB round=1" not in (console.read_text(errors="replace") if console.exists() else ""):
            assert launch.poll() is None, launch.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the guest never started its rounds"
            time.sleep(0.5)

        async def users_view() -> tuple[str, str]:
            client = QMPClient("e2e-user")
            await client.connect(str(user_qmp))
            try:
                status = await client.execute("query-status")
                name = await client.execute("query-name")
            finally:
                await client.disconnect()
            assert isinstance(status, dict) and isinstance(name, dict)
            return str(status["status"]), str(name.get("name"))

        assert asyncio.run(users_view()) == ("running", "vhost-balloon-guest")
        launch.send_signal(signal.SIGINT)  # Ctrl-C mid-run
        stdout, stderr = launch.communicate(timeout=120)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    summary = json.loads(stdout)
    qmp = summary["qmp"]
    assert qmp["socket"] == str(user_qmp)
    assert qmp["version"] == provisioned["QEMU_VERSION"] and qmp["status"] == "running"
    # The test guest's acpid takes the power button and powers off: no quit, no signal.
    assert qmp["stopped_with"] == "system_powerdown", stderr[-3000:]
    assert "stopping the guest: system_powerdown (QMP)" in stderr
    assert "VB power_button" in console.read_text(errors="replace")
    assert "stopping the guest: quit (QMP)" not in stderr
    assert "stopping QEMU (SIGTERM)" not in stderr
    assert summary["interrupted"] is True and summary["qemu_exit"] is not None
    assert not user_qmp.exists()
