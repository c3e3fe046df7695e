"""launch's own QMP connection to QEMU, through the qemu.qmp library.

QEMU gets two QMP sockets: this one, which launch uses (the version and run
state for the summary, the built-in balloon's commands for the baseline, and
a graceful stop), and a second one left to the user while the guest runs
(`launch --qmp PATH`): a QMP socket serves one client at a time.

A graceful stop asks the guest first (`system_powerdown`, the ACPI power
button: a guest with acpid powers off), then QEMU (`quit`), and only then
do signals follow (process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from qemu.qmp import ConnectError, QMPClient

CONNECT_RETRY_S = 0.2
# qemu.qmp logs every failed connect and a peer hang-up as ERROR: launch
# reports what matters itself (its notes, the summary).
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class MonitorError(Exception):
    """No QMP connection to QEMU."""


class QemuMonitor:
    def __init__(self, client: QMPClient) -> None:
        self.client = client

    @classmethod
    async def connect(cls, path: Path, timeout_s: float) -> QemuMonitor:
        """Connect once QEMU has made its QMP socket (it starts after the
        initramfs is built), retrying until timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():  # qemu.qmp logs an ERROR line per failed try
            if time.monotonic() > deadline:
                raise MonitorError(f"no QMP socket at {path} after {timeout_s:.0f} s")
            await asyncio.sleep(CONNECT_RETRY_S)
        while True:
            client = QMPClient("vhost-balloon-launch")
            try:
                await client.connect(str(path))
                return cls(client)
            except ConnectError as error:  # no socket yet, or QEMU not listening yet
                if time.monotonic() > deadline:
                    raise MonitorError(f"no QMP socket at {path}: {error}") from None
                await asyncio.sleep(CONNECT_RETRY_S)

    async def status(self) -> str:
        """The run state: running, paused, prelaunch, shutdown, ..."""
        reply = await self.client.execute("query-status")
        assert isinstance(reply, dict)
        return str(reply["status"])

    async def version(self) -> str:
        reply = await self.client.execute("query-version")
        assert isinstance(reply, dict)
        number = reply["qemu"]
        return f"{number['major']}.{number['minor']}.{number['micro']}"

    async def powerdown(self) -> None:
        """Press the guest's ACPI power button."""
        await self.client.execute("system_powerdown")

    async def quit(self) -> None:
        """QEMU exits at once, cleanly; it may hang up before it answers."""
        with contextlib.suppress(Exception):
            await self.client.execute("quit")

    async def close(self) -> None:
        # QEMU may be gone already (qemu.qmp then raises EOFError, among others).
        with contextlib.suppress(Exception):
            await self.client.disconnect()
