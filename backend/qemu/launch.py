"""`vhost-balloon launch`: the backend (in this process) beside a real QEMU
running the project's test guest (or the user's own kernel and initrd).

Launch puts the pieces together for one run: provisioning (provisioning.py),
the run-guest.sh command line (command.py), the backend's socket and
server, QEMU as a child process group with its console and notes
(process.py, console.py, notes.py), QEMU's shared RAM sampled
(sampler.py), then the summary (summary.py; summary_table.py prints it).
The backend stops when QEMU exits; Ctrl-C or SIGTERM stops QEMU first.

Workloads: `fill` (fill/free rounds), `gigantic` (a 1 GiB hugetlb page
allocated and freed in a loop; its failures are attributed to the reports
that held the pages, backend/qemu/attribution.py) and `balloon` (inflate to
a target and deflate back, the host's side in balloon_steps.py; on the
baseline through QMP). Balloon devices: the backend
(default), QEMU's built-in device (`baseline`), or none (`no_balloon`, a
control for the gigantic workload).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from qemu.qmp import QMPError

from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.qemu.balloon_steps import (
    BackendBalloon,
    BalloonControl,
    BalloonError,
    QmpBalloon,
    run_balloon_steps,
)
from vhost_balloon.backend.qemu.command import (
    RANGE_LOOPS,
    LaunchOptions,
    check_qemu_option_values,
    qemu_option,
    run_guest_command,
)
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.monitor import MonitorError, QemuMonitor
from vhost_balloon.backend.qemu.notes import RunGuestNotes
from vhost_balloon.backend.qemu.process import QemuProcess
from vhost_balloon.backend.qemu.progress import LaunchProgress
from vhost_balloon.backend.qemu.provisioning import (
    LaunchError,
    check_device,
    ensure_provisioned,
    qemu_version,
)
from vhost_balloon.backend.qemu.sampler import MemorySampler
from vhost_balloon.backend.qemu.summary import (
    backend_summary,
    fill_summary,
    gigantic_summary,
    guest_summary,
    launch_failure,
    pattern_summary,
    vmem_summary,
)
from vhost_balloon.backend.qemu.vmem_steps import VmemError, run_vmem_steps
from vhost_balloon.backend.server import Server, ServerSettings
from vhost_balloon.backend.vhost.server import UnixListener, bind_unix

BALLOON_STEP_TIMEOUT_S = 300.0  # each balloon step, under TCG
BUILTIN_STATS_INTERVAL_S = 2  # QEMU's guest-stats-polling-interval in the baseline
MONITOR_CONNECT_TIMEOUT_S = 300.0  # QEMU starts after the initramfs is built
UNIX_PATH_MAX = 107  # sun_path, less its NUL


def check_qmp_path(path: Path, env: dict[str, str]) -> None:
    """A QMP socket QEMU can make and the user can reach: absent (QEMU would
    replace a file there, and launch removes its sockets at the end), in a
    folder QEMU shares with the host (QEMU_SHARED_DIRS, VHOST_BALLOON_SHARED_DIRS:
    in chroot mode any other path is inside QEMU's root), and short enough
    for a unix socket. LaunchError otherwise."""
    if not path.is_absolute():
        raise LaunchError(f"--qmp {path}: give an absolute path")
    if os.path.lexists(path):
        raise LaunchError(f"--qmp {path} exists: remove it first, or choose another path")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise LaunchError(
            f"--qmp {path}: over the {UNIX_PATH_MAX} bytes a unix socket path may have"
        )
    shared = [
        Path(d).resolve()
        for d in (
            env.get("QEMU_SHARED_DIRS", "") + ":" + os.environ.get("VHOST_BALLOON_SHARED_DIRS", "")
        ).split(":")
        if d
    ]
    if env.get("QEMU_MODE") == "chroot" and not any(
        path.parent.resolve().is_relative_to(d) for d in shared
    ):
        folders = ", ".join(map(str, shared))
        raise LaunchError(f"--qmp {path}: QEMU runs in a chroot and sees only {folders}")


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
        self.balloon: dict[str, Any] | None = None  # the balloon workload's steps
        self.balloon_error: str | None = None
        self.qemu_version: str | None = None
        self.guest_kernel: str | None = None
        self.process: QemuProcess | None = None
        self.user_qmp: Path | None = None  # the QMP socket left to the user
        self.qmp: dict[str, Any] = {}  # version, status at start, or error

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
        sockets: list[Path] = []
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
            self.process.progress = LaunchProgress(
                self.options.workload, self.options.rounds, sys.stderr, self.console_out
            )
            command = run_guest_command(self.options, socket_path, features)
            run_dir = Path(env.get("VB_RUN_DIR", "/tmp"))
            monitor_path = run_dir / f"launch-{os.getpid()}-monitor.qmp"
            self.user_qmp = self.options.qmp_socket or run_dir / f"launch-{os.getpid()}.qmp"
            for path in (monitor_path, self.user_qmp):
                check_qmp_path(path, env)
            # Only these are ours to remove: checked absent, QEMU makes them.
            sockets += [monitor_path, self.user_qmp]
            for path in (monitor_path, self.user_qmp):
                command += ["-qmp", f"unix:{qemu_option(path)},server=on,wait=off"]
            monitor_task = asyncio.ensure_future(self._monitor(monitor_path))
            balloon_task = None
            if self.options.workload == "balloon":
                balloon_task = asyncio.ensure_future(self._balloon(monitor_task))
            elif self.options.workload == "vmem":
                balloon_task = asyncio.ensure_future(self._vmem(monitor_task))
            try:
                with self.process.progress:
                    await self.process.run(command)
            finally:
                if balloon_task is not None:
                    await self._end_balloon(balloon_task)
                await self._end_monitor(monitor_task)
        finally:
            for path in sockets:  # QEMU's, left behind if it was killed
                with contextlib.suppress(OSError):
                    if path.is_socket():
                        path.unlink()
            if self.server is not None:
                await self.server.close()
            if listener is not None:
                listener.close()  # and its file, unless another backend took the path
            if console_log is not None:
                console_log.close()
        return self.summary()

    async def _monitor(self, path: Path) -> QemuMonitor | None:
        """launch's QMP: the version and run state for the summary, and the
        graceful stop (process.py). Without it, launch still runs: a stop
        then falls back to signals."""
        try:
            monitor = await QemuMonitor.connect(path, MONITOR_CONNECT_TIMEOUT_S)
        except MonitorError as error:
            self.qmp["error"] = str(error)
            self.note(f"QMP: {error}; a stop falls back to signals")
            return None
        try:
            self.qmp["version"] = await monitor.version()
            self.qmp["status"] = await monitor.status()
        except QMPError as error:
            self.qmp["error"] = f"query failed: {error}"
        if self.process is not None:
            self.process.monitor = monitor
        self.note(
            f"QMP for you at {self.user_qmp} while the guest runs "
            f"(QEMU {self.qmp.get('version')}, {self.qmp.get('status')})"
        )
        return monitor

    async def _end_monitor(self, task: asyncio.Future[QemuMonitor | None]) -> None:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            monitor = await task
            if monitor is not None:
                await monitor.close()

    async def _balloon(self, monitor_task: asyncio.Future[QemuMonitor | None]) -> None:
        """The host's steps of the balloon workload (balloon_steps.py)."""
        options = self.options
        assert options.balloon_target is not None
        try:
            control: BalloonControl
            if options.baseline:
                monitor = await asyncio.shield(monitor_task)
                if monitor is None:
                    raise BalloonError(f"no QMP to QEMU: {self.qmp.get('error')}")
                qmp = QmpBalloon(monitor.client, options.guest_ram_bytes)
                await qmp.poll_stats(BUILTIN_STATS_INTERVAL_S)
                control = qmp
            else:
                assert self.server is not None
                control = BackendBalloon(self.server)
            self.balloon = await run_balloon_steps(
                control,
                self.guest,
                self.sampler,
                ram_bytes=options.guest_ram_bytes,
                target=options.balloon_target,
                oom=options.oom_mib > 0,
                timeout_s=BALLOON_STEP_TIMEOUT_S,
                note=self.note,
            )
            if isinstance(control, BackendBalloon):
                self.balloon["backend"] = control.status()
        except (BalloonError, QMPError, ValueError) as error:
            self.balloon_error = f"balloon: {error}"
            self.note(self.balloon_error)
        except Exception as error:  # a bug must not cost the run's summary
            self.balloon_error = f"balloon: the steps failed: {error!r}"
            self.note(self.balloon_error)

    async def _vmem(self, monitor_task: asyncio.Future[QemuMonitor | None]) -> None:
        """The host's plug/unplug cycles of the vmem workload (vmem_steps.py),
        through launch's own QMP monitor."""
        options = self.options
        assert options.virtio_mem is not None
        try:
            monitor = await asyncio.shield(monitor_task)
            if monitor is None:
                raise VmemError(f"no QMP to QEMU: {self.qmp.get('error')}")
            self.balloon = await run_vmem_steps(
                monitor.client,
                self.guest,
                self.clock,
                plug_bytes=options.vmem_size or options.virtio_mem << 20,
                pause_s=options.vmem_pause_s,
                note=self.note,
            )
        except (VmemError, QMPError) as error:
            self.balloon_error = f"vmem: {error}"
            self.note(self.balloon_error)
        except Exception as error:  # a bug must not cost the run's summary
            self.balloon_error = f"vmem: the steps failed: {error!r}"
            self.note(self.balloon_error)

    async def _end_balloon(self, task: asyncio.Future[None]) -> None:
        """Wait for the host's steps (balloon, vmem) after QEMU ended."""
        if not task.done():
            task.cancel()
            if self.balloon_error is None and self.balloon is None:
                what = self.options.workload
                self.balloon_error = f"{what}: QEMU exited before the {what} steps were done"
        with contextlib.suppress(asyncio.CancelledError):
            await task

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
        if self.options.workload in RANGE_LOOPS:
            records = self.records if self.server is not None else None
            result[self.options.workload] = gigantic_summary(self.guest, records)
        if self.options.workload == "fill":
            result["fill"] = fill_summary(self.guest)
        if self.options.workload == "pattern":
            result["pattern"] = pattern_summary(self.guest)
        if self.options.workload == "balloon":
            result["balloon"] = {**(self.balloon or {}), "error": self.balloon_error}
        if self.options.workload == "vmem":
            records = self.records if self.server is not None else None
            result["vmem"] = {
                **vmem_summary(self.guest, self.balloon, records),
                "error": self.balloon_error,
            }
        stopped_with = None if self.process is None else self.process.stopped_with
        socket = None if self.user_qmp is None else str(self.user_qmp)
        result["qmp"] = {"socket": socket, **self.qmp, "stopped_with": stopped_with}
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
        failure = launch_failure(
            self.options,
            interrupted=self.interrupted,
            returncode=None if self.process is None else self.process.returncode,
            notes=self.notes,
            guest=self.guest,
            server=self.server,
            records=self.records,
        )
        # The guest's or QEMU's own reason first: it says more than "the balloon
        # steps were not done".
        if failure is None and self.balloon_error is not None and not self.interrupted:
            return self.balloon_error
        return failure
