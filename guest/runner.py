"""Wire guest RAM, the front-end and the driver together: one mocked guest.

    async with MockGuest(GuestOptions(socket_path=path, memory_bytes=256 << 20)) as guest:
        result = await guest.run(10)
        summary = guest.summary(result)

Entering connects, runs the vhost-user init sequence and probes the driver
(which starts the device); leaving stops the rings (when the connection is
still usable) and closes every fd and mapping.

With a balloon feature wanted (DriverConfig.balloon, must_tell_host,
deflate_on_oom or stats), `guest.balloon` is a BalloonDriver on the same
queues; unless `balloon_follow` is off, it follows the target on every
CONFIG_CHANGE_MSG and refills the stats buffer in background tasks, as
Linux's work items do, from start until stop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vhost_balloon.guest.balloon import BalloonDriver
from vhost_balloon.guest.driver import DriverConfig, ReportingDriver, ReportResult, RunResult
from vhost_balloon.guest.errors import GuestError
from vhost_balloon.guest.frontend import FrontendOptions, VhostUserFrontend
from vhost_balloon.guest.ram import GuestRam
from vhost_balloon.guest.summary import RunContext, build_summary
from vhost_balloon.protocol.virtio import F_EVENT_IDX, has_feature


@dataclass(frozen=True, slots=True)
class GuestOptions:
    socket_path: str
    memory_bytes: int = 1 << 30
    regions: int = 1
    driver: DriverConfig = field(default_factory=DriverConfig)
    reply_ack: bool = True
    config: bool = True
    mq: bool = True
    configure_mem_slots: bool = True
    backend_req: bool = True
    connect_timeout: float = 5.0
    reply_timeout: float = 5.0
    discard_label: str | None = None
    # Seal RAM against shrinking, as QEMU's memfd backend does; off to stand
    # in for hugetlbfs or tmpfs RAM, which a front-end can truncate.
    seal: bool = True
    # With the balloon: run follow() and stats_loop() in the background.
    balloon_follow: bool = True

    def frontend_options(self) -> FrontendOptions:
        return FrontendOptions(
            num_queues=self.driver.queue_count,
            reply_ack=self.reply_ack,
            config=self.config,
            mq=self.mq,
            configure_mem_slots=self.configure_mem_slots,
            backend_req=self.backend_req,
            reply_timeout=self.reply_timeout,
        )


class MockGuest:
    """A guest with RAM, a vhost-user front-end, a reporting driver and maybe a balloon."""

    def __init__(self, options: GuestOptions) -> None:
        options.driver.validate()
        self.options = options
        self.ram = GuestRam(options.memory_bytes, regions=options.regions, seal=options.seal)
        try:
            self.frontend = VhostUserFrontend(options.socket_path, options.frontend_options())
            self.driver = ReportingDriver(self.frontend, self.ram, options.driver)
        except BaseException:
            self.ram.close()
            raise
        self.balloon: BalloonDriver | None = (
            BalloonDriver(self.driver) if options.driver.uses_balloon else None
        )
        self._balloon_stop = asyncio.Event()
        self._balloon_tasks: list[asyncio.Task[Any]] = []
        self.stopped_bases: list[int] | None = None

    async def start(self) -> None:
        await self.frontend.connect(self.options.connect_timeout)
        await self.frontend.init()
        await self.driver.probe()
        if self.balloon is not None:
            await self.balloon.start()
            if self.options.balloon_follow:
                stop = self._balloon_stop
                self._balloon_tasks = [
                    asyncio.create_task(self.balloon.follow(stop), name="balloon-follow"),
                    asyncio.create_task(self.balloon.stats_loop(stop), name="balloon-stats"),
                ]

    async def _stop_balloon(self, grace_s: float) -> BaseException | None:
        """Stop the background tasks; returns the first error one of them hit.

        follow() gets `grace_s` to finish the chain it may be waiting for (it
        stops between chains); stats_loop() only waits, so it is cancelled.
        """
        tasks, self._balloon_tasks = self._balloon_tasks, []
        if not tasks:
            return None
        self._balloon_stop.set()
        follow, *others = tasks
        for task in others:
            task.cancel()
        if grace_s > 0:
            await asyncio.wait([follow], timeout=grace_s)
        follow.cancel()  # a no-op once it is done
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                return result
        return None

    async def report(self) -> ReportResult:
        return await self.driver.report()

    async def run(
        self,
        reports: int,
        *,
        pause_s: float = 0.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> RunResult:
        return await self.driver.run(reports, pause_s=pause_s, progress=progress)

    def context(self) -> RunContext:
        driver = self.driver
        return RunContext(
            capacity=self.options.driver.capacity,
            order=self.options.driver.order,
            memory_bytes=self.options.memory_bytes,
            regions=self.options.regions,
            indirect=driver.use_indirect,
            event_idx=has_feature(driver.accepted_features, F_EVENT_IDX),
            features=driver.accepted_features,
            queue_size=self.options.driver.queue_size,
            discard=self.options.discard_label,
            config_change_msgs=self.frontend.config_change_msgs,
            kicks=driver.kicks,
            calls=driver.calls,
            balloon=self.balloon.describe() if self.balloon is not None else None,
        )

    def summary(self, result: RunResult) -> dict[str, Any]:
        return build_summary(result, self.context())

    async def stop(self) -> list[int]:
        """Stop the rings (SET_VRING_ENABLE 0, GET_VRING_BASE); returns next avail indices.

        The balloon's background tasks stop first (one chain's timeout to
        finish what they are doing); an error one of them hit is raised here.
        """
        error = await self._stop_balloon(self.options.driver.report_timeout)
        if error is not None:
            raise error
        self.stopped_bases = await self.driver.remove()
        return self.stopped_bases

    async def close(self) -> None:
        try:
            await self._stop_balloon(0.0)
            await self.frontend.close()
        finally:
            self.ram.close()

    async def __aenter__(self) -> MockGuest:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_rest: object) -> None:
        try:
            if exc_type is None and self.frontend.started:
                await self.stop()
        finally:
            await self.close()


async def run_guest(
    options: GuestOptions,
    reports: int,
    *,
    pause_s: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    report_log: Path | None = None,
    linger_s: float = 0.0,
) -> dict[str, Any]:
    """Connect, report `reports` times, stop, and return the JSON summary.

    With `report_log`, each report as the guest saw it is written there as
    one JSON line (its own clock: monotonic ns, comparable with the backend's
    trace on the same host). With `linger_s`, the guest stays connected that
    long after its reports (a balloon follows the target meanwhile).
    """
    async with MockGuest(options) as guest:
        result = await guest.run(reports, pause_s=pause_s, progress=progress)
        if linger_s:
            await asyncio.sleep(linger_s)  # the balloon follows the target meanwhile
        summary = guest.summary(result)
    if report_log is not None:
        with report_log.open("w", encoding="utf-8") as log:
            for report in result.reports:
                log.write(json.dumps(report.to_dict(), separators=(",", ":")) + "\n")
    return summary


__all__ = ["GuestError", "GuestOptions", "MockGuest", "run_guest"]
