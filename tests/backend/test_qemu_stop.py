"""How launch stops QEMU on Ctrl-C: QMP's system_powerdown, then quit, then
signals; each step only if the one before did not end it."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from pathlib import Path

import pytest

from vhost_balloon.backend.qemu import process as process_module
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.notes import RunGuestNotes
from vhost_balloon.backend.qemu.process import QemuProcess
from vhost_balloon.backend.qemu.sampler import MemorySampler


class FakeMonitor:
    """Does to a `sleep` child what a guest or QEMU would do to itself."""

    def __init__(self, on_powerdown: bool, on_quit: bool, fail: bool = False) -> None:
        self.on_powerdown, self.on_quit, self.fail = on_powerdown, on_quit, fail
        self.pid = 0
        self.calls: list[str] = []

    async def powerdown(self) -> None:
        self.calls.append("system_powerdown")
        if self.fail:
            raise ConnectionResetError("QMP gone")
        if self.on_powerdown:
            os.kill(self.pid, signal.SIGKILL)

    async def quit(self) -> None:
        self.calls.append("quit")
        if self.on_quit:
            os.kill(self.pid, signal.SIGKILL)


async def stop_with(monitor: FakeMonitor | None, monkeypatch: pytest.MonkeyPatch) -> QemuProcess:
    monkeypatch.setattr(process_module, "POWERDOWN_GRACE_S", 0.5)
    monkeypatch.setattr(process_module, "QUIT_GRACE_S", 0.5)
    monkeypatch.setattr(process_module, "STOP_GRACE_S", 0.5)
    qemu = QemuProcess(
        timeout_s=60,
        clock=lambda: 0.0,
        note=lambda _text: None,
        console_out=io.StringIO(),
        console_log=None,
        guest=GuestConsole(),
        notes=RunGuestNotes(),
        sampler=MemorySampler(),
    )
    # A stand-in for run-guest.sh that ignores SIGTERM, so that a step that
    # does not end it falls through to SIGKILL.
    task = asyncio.ensure_future(qemu.run(["sh", "-c", 'trap "" TERM; exec sleep 60']))
    pid = await _child_pid()
    if monitor is not None:
        monitor.pid = pid
        qemu.monitor = monitor  # type: ignore[assignment]
    os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C
    await asyncio.wait_for(task, 10)
    return qemu


async def _child_pid() -> int:
    """The pid of our `sleep` child, once sh has exec'd it."""
    own = os.getpid()
    for _ in range(500):
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().split()[3])
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if parent == own and command.startswith(b"sleep"):
                return int(entry)
        await asyncio.sleep(0.01)
    raise AssertionError("the child never ran sleep")


@pytest.mark.parametrize(
    ("monitor", "stopped_with", "calls"),
    [
        (FakeMonitor(on_powerdown=True, on_quit=False), "system_powerdown", ["system_powerdown"]),
        (FakeMonitor(on_powerdown=False, on_quit=True), "quit", ["system_powerdown", "quit"]),
        (FakeMonitor(on_powerdown=False, on_quit=False), "SIGKILL", ["system_powerdown", "quit"]),
        (
            FakeMonitor(on_powerdown=False, on_quit=True, fail=True),
            "quit",
            ["system_powerdown", "quit"],
        ),
        (None, "SIGKILL", []),
    ],
)
async def test_each_step_runs_only_if_the_last_did_not_end_qemu(
    monitor: FakeMonitor | None,
    stopped_with: str,
    calls: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    qemu = await stop_with(monitor, monkeypatch)
    assert qemu.interrupted
    assert qemu.stopped_with == stopped_with
    if monitor is not None:
        assert monitor.calls == calls
