"""run-guest.sh (and the QEMU under it) as a child process group: started,
its two streams read with host timestamps, stopped on a signal or a timeout.

stdout is the guest's console: every line is stamped (monotonic seconds
since the launch started), written to the console stream and the console
log, and fed to GuestConsole. stderr is run-guest.sh's notes and QEMU's
complaints (RunGuestNotes); the QEMU pid they name is what MemorySampler
samples. Ctrl-C or SIGTERM stops QEMU: through QMP first when launch has its
monitor (monitor.py: system_powerdown, then quit), then SIGTERM, then SIGKILL
of its process group after STOP_GRACE_S; a run-guest.sh that outlives its
own --timeout is killed 30 s later.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from typing import TextIO

from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.monitor import QemuMonitor
from vhost_balloon.backend.qemu.notes import RunGuestNotes
from vhost_balloon.backend.qemu.progress import LaunchProgress
from vhost_balloon.backend.qemu.sampler import MemorySampler

STOP_GRACE_S = 10.0
POWERDOWN_GRACE_S = 5.0  # for the guest to power off after its power button
QUIT_GRACE_S = 5.0  # for QEMU to exit after QMP quit
GUARD_SLACK_S = 30


class QemuProcess:
    """One run of a run-guest.sh command line, until it exits."""

    def __init__(
        self,
        *,
        timeout_s: int,
        clock: Callable[[], float],
        note: Callable[[str], None],
        console_out: TextIO,
        console_log: TextIO | None,
        guest: GuestConsole,
        notes: RunGuestNotes,
        sampler: MemorySampler,
    ) -> None:
        self.timeout_s = timeout_s  # run-guest.sh's own --timeout
        self.clock = clock
        self.note = note
        self.console_out = console_out
        self.console_log = console_log
        self.guest = guest
        self.notes = notes
        self.sampler = sampler
        self.returncode: int | None = None
        self.interrupted = False  # stopped by Ctrl-C or SIGTERM
        self.monitor: QemuMonitor | None = None  # launch's QMP, once connected
        self.progress: LaunchProgress | None = None  # the workload's, fed every line
        self.stopped_with: str | None = None  # system_powerdown, quit, SIGTERM or SIGKILL

    async def run(self, command: list[str]) -> None:
        loop = asyncio.get_running_loop()
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # our signals decide when QEMU stops
        )
        stop = asyncio.Event()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
                installed.append(signum)
        assert process.stdout is not None and process.stderr is not None
        tasks = [
            loop.create_task(self._read_console(process.stdout)),
            loop.create_task(self._read_notes(process.stderr)),
            loop.create_task(self.sampler.run(self.clock)),
        ]
        stopper = loop.create_task(self._stop_on(stop, process))
        guard = loop.create_task(self._guard(process))
        try:
            self.returncode = await process.wait()
            await asyncio.gather(tasks[0], tasks[1])
        finally:
            for task in (*tasks, stopper, guard):
                task.cancel()
            await asyncio.gather(*tasks, stopper, guard, return_exceptions=True)
            if process.returncode is None:
                _kill_group(process.pid, signal.SIGKILL)
                await process.wait()
            for signum in installed:
                loop.remove_signal_handler(signum)

    async def _stop_on(self, stop: asyncio.Event, process: asyncio.subprocess.Process) -> None:
        await stop.wait()
        self.interrupted = True
        if await self._stop_through_qmp(process):
            return
        self.stopped_with = "SIGTERM"
        self.note("stopping QEMU (SIGTERM)")
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)  # run-guest.sh passes it on to QEMU
        await asyncio.sleep(STOP_GRACE_S)
        self.stopped_with = "SIGKILL"
        self.note(f"QEMU still running after {STOP_GRACE_S:.0f} s: SIGKILL")
        _kill_group(process.pid, signal.SIGKILL)

    async def _stop_through_qmp(self, process: asyncio.subprocess.Process) -> bool:
        """The guest's power button, then QMP quit; True once QEMU exited."""
        monitor = self.monitor
        if monitor is None:
            return False
        steps = (
            ("system_powerdown", monitor.powerdown, POWERDOWN_GRACE_S),
            ("quit", monitor.quit, QUIT_GRACE_S),
        )
        for name, step, grace_s in steps:
            self.note(f"stopping the guest: {name} (QMP)")
            try:
                await asyncio.wait_for(step(), grace_s)
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                self.note(f"QEMU still running {grace_s:.0f} s after {name}")
                continue
            except Exception as error:  # QMP gone or refusing: the next step
                self.note(f"QMP {name} failed: {error!r}")
                continue
            self.stopped_with = name
            return True
        return False

    async def _guard(self, process: asyncio.subprocess.Process) -> None:
        """run-guest.sh enforces --timeout; this is the backstop if it cannot."""
        await asyncio.sleep(self.timeout_s + GUARD_SLACK_S)
        self.note("run-guest.sh outlived its timeout: killing its process group")
        _kill_group(process.pid, signal.SIGKILL)

    async def _read_console(self, stream: asyncio.StreamReader) -> None:
        while line_bytes := await _readline(stream):
            line = line_bytes.decode(errors="replace").rstrip("\r\n").replace("\r", "")
            now = self.clock()
            stamped = f"[{now:9.3f}] {line}\n"
            if self.progress is not None and self.progress.live:
                self.progress.console_line(stamped)  # above the live bar
            else:
                self.console_out.write(stamped)
                self.console_out.flush()
            if self.console_log is not None:
                self.console_log.write(stamped)
                self.console_log.flush()
            self.guest.feed(line, now)
            self.sampler.on_console_line(line, now)
            if self.progress is not None:
                self.progress.update(self.guest, now)

    async def _read_notes(self, stream: asyncio.StreamReader) -> None:
        while line_bytes := await _readline(stream):
            line = line_bytes.decode(errors="replace").rstrip("\r\n")
            if not line.strip():
                continue
            now = self.clock()
            self.note(f"[{now:9.3f}] {line}")
            if self.console_log is not None:
                self.console_log.write(f"[{now:9.3f}] (host) {line}\n")
            self.notes.feed(line)
            if self.notes.qemu_pid is not None:
                self.sampler.pid = self.notes.qemu_pid


def _kill_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


async def _readline(stream: asyncio.StreamReader) -> bytes:
    """The next line; an over-long one (no newline within the stream's limit)
    comes back in pieces instead of ending the reader."""
    try:
        return await stream.readline()
    except asyncio.LimitOverrunError as overrun:
        return await stream.read(overrun.consumed) + b"\n"
    except ValueError:  # readline's wrapper of LimitOverrunError
        return await stream.read(65536) + b"\n"
