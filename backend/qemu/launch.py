"""`vhost-balloon launch`: the backend (in this process) beside a real QEMU
running the project's test guest (or the user's own kernel and initrd).

Launch puts the pieces together for one run: provisioning (provisioning.py),
the run-guest.sh command line (command.py), the backend's socket and
server, QEMU as a child process group with its console and notes
(process.py, console.py, notes.py), QEMU's shared RAM sampled
(sampler.py), then the summary (summary.py; summary_table.py prints it).
The backend stops when QEMU exits; Ctrl-C or SIGTERM stops QEMU first.

Workloads: `fill` (fill/free rounds) and `gigantic` (a 1 GiB hugetlb page
allocated and freed in a loop; its failures are attributed to the reports
that held the pages, backend/qemu/attribution.py). Balloon devices: the backend
(default), QEMU's built-in device (`baseline`), or none (`no_balloon`, a
control for the gigantic workload).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.qemu.command import (
    LaunchOptions,
    check_qemu_option_values,
    run_guest_command,
)
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.notes import RunGuestNotes
from vhost_balloon.backend.qemu.process import QemuProcess
from vhost_balloon.backend.qemu.provisioning import (
    LaunchError,
    check_device,
    ensure_provisioned,
    qemu_version,
)
from vhost_balloon.backend.qemu.sampler import MemorySampler
from vhost_balloon.backend.qemu.summary import (
    backend_summary,
    gigantic_summary,
    guest_summary,
    launch_failure,
)
from vhost_balloon.backend.server import Server, ServerSettings
from vhost_balloon.backend.vhost.server import UnixListener, bind_unix


class Launch:
    """One run: backend (unless baseline) + run-guest.sh + console + sampler."""

    def __init__(
        self,
        options: LaunchOptions,
        settings: ServerSettings | None,
        note: Callable[[str], None],
        console: TextIO,
    ) -> None:
        self.options = options
        self.settings = settings
        self.note = note
        self.console_out = console
        self.t0 = time.monotonic()
        self.guest = GuestConsole()
        self.notes = RunGuestNotes()
        self.sampler = MemorySampler()
        self.server: Server | None = None
        self.records: list[ReportRecord] = []  # every report, in completion order
        self.qemu_version: str | None = None
        self.guest_kernel: str | None = None
        self.process: QemuProcess | None = None

    def clock(self) -> float:
        return time.monotonic() - self.t0

    @property
    def interrupted(self) -> bool:
        return self.process is not None and self.process.interrupted

    async def run(self) -> dict[str, Any]:
        env = ensure_provisioned(self.note)
        qemu = self.options.qemu or env.get("QEMU", "")
        self.qemu_version = qemu_version(qemu)
        if self.options.mode == "vhost-user":
            check_device(qemu, self.qemu_version)
        self.guest_kernel = (
            self.options.kernel.name if self.options.kernel else env.get("GUEST_KERNEL_VERSION")
        )
        socket_path = self._socket_path(env)
        check_qemu_option_values(self.options)
        listener: UnixListener | None = None
        console_log: TextIO | None = None
        try:
            if self.options.console_log is not None:
                console_log = self.options.console_log.open("w", encoding="utf-8")
            if self.settings is not None and socket_path is not None:
                self.server = Server(self.settings, record_hooks=[self.records.append])
                listener = bind_unix(socket_path)
            if self.server is not None and listener is not None:
                await self.server.start_services()
                self.server.start(listener.sock)
                self.note(f"backend listening on {socket_path}")
            features = (self.settings or ServerSettings()).balloon.features
            self.process = QemuProcess(
                timeout_s=self.options.timeout_s,
                clock=self.clock,
                note=self.note,
                console_out=self.console_out,
                console_log=console_log,
                guest=self.guest,
                notes=self.notes,
                sampler=self.sampler,
            )
            await self.process.run(run_guest_command(self.options, socket_path, features))
        finally:
            if self.server is not None:
                await self.server.close()
            if listener is not None:
                listener.close()  # and its file, unless another backend took the path
            if console_log is not None:
                console_log.close()
        return self.summary()

    def _socket_path(self, env: dict[str, str]) -> Path | None:
        if self.options.mode != "vhost-user":
            return None
        if self.options.socket_path is not None:
            path = self.options.socket_path
        else:
            run_dir = Path(env.get("VB_RUN_DIR", "/tmp"))
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / f"launch-{os.getpid()}.sock"
        if not path.parent.is_dir():
            raise LaunchError(f"the socket's directory {path.parent} does not exist")
        return path

    def summary(self) -> dict[str, Any]:
        result: dict[str, Any] = {"mode": self.options.mode, "workload": self.options.workload}
        if self.server is not None:
            result |= backend_summary(self.server, self.records)
        result |= guest_summary(self.guest, self.sampler)
        if self.options.workload == "gigantic":
            records = self.records if self.server is not None else None
            result["gigantic"] = gigantic_summary(self.guest, records)
        result |= {
            "qemu_version": self.qemu_version,
            "guest_kernel": self.guest_kernel,
            "accel": self.notes.accel,
            "accel_reason": self.notes.accel_reason,
            "qemu_exit": None if self.process is None else self.process.returncode,
            "guest_done": self.guest.done,
            "qemu_errors": self.notes.qemu_errors,
            "interrupted": self.interrupted,
            "duration_s": round(self.clock(), 3),
        }
        return result

    def failure(self) -> str | None:
        """The one-sentence reason this run failed, or None."""
        return launch_failure(
            self.options,
            interrupted=self.interrupted,
            returncode=None if self.process is None else self.process.returncode,
            notes=self.notes,
            guest=self.guest,
            server=self.server,
            records=self.records,
        )
