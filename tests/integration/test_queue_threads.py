"""The per-queue-thread data path under ring and memory changes, hang-ups,
kick storms, concurrent sessions and a hostile front-end.

Every started vring has its own thread (backend/vhost/worker.py). What the
session does to a ring (GET_VRING_BASE, a new memory table, a hang-up) must
wait for the report that thread has in flight: only then may it answer, swap
mappings or close fds. These tests hold a report in flight (a gated discard
syscall, or a held injected delay) and check what the front-end sees.
Each test says, above it, what wrong behaviour makes it fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

import pytest

import vhost_balloon.backend.balloon.discard
import vhost_balloon.backend.latency.injection
import vhost_balloon.backend.vhost.worker
from tests.conftest import MiB, RunningBackend, StartBackend, open_fds
from tests.integration.discard_gate import TIMESTAMPS, Gate
from vhost_balloon.backend.balloon.records import ReportRecord
from vhost_balloon.backend.latency.delays import parse_delay
from vhost_balloon.backend.latency.injection import LatencySettings, Point
from vhost_balloon.backend.latency.timer import sleep_exact_ns as real_sleep_exact_ns
from vhost_balloon.backend.vhost.session import SessionState
from vhost_balloon.guest.layout import Block
from vhost_balloon.guest.runner import GuestOptions, MockGuest
from vhost_balloon.protocol.vhost_user import (
    FrontendRequest,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    VringFile,
    VringState,
)
from vhost_balloon.protocol.virtqueue import DESC, USED_ELEM, Buffer, DriverQueue

MS = 1_000_000
U16 = struct.Struct("<H")
WAIT_S = 5.0  # every wait for the backend; never a speed assertion


def _options(backend: RunningBackend, memory: int = 64 * MiB, **extra: Any) -> GuestOptions:
    """A small guest: reports of 4 (or `capacity`) 2 MiB entries."""
    extra.setdefault("capacity", 4)
    return backend.guest_options(memory=memory, **extra)


def _delays(**points: str) -> LatencySettings:
    return LatencySettings(delays={Point(p): parse_delay(m) for p, m in points.items()})


def _populate(guest: MockGuest, blocks: Sequence[Block]) -> None:
    """Write the blocks, so that a discard of them shows as freed bytes."""
    size = guest.driver.layout.block_size
    for block in blocks:
        mapping, offset = guest.ram.locate(block.gpa, size)
        mapping[offset : offset + size] = b"\x5a" * size


def _post(guest: MockGuest, blocks: Sequence[Block], *, kick: bool = True) -> int:
    """Make one report of `blocks` available (a direct chain); its head."""
    driver = guest.driver
    index = driver.reporting_queue
    size = driver.layout.block_size
    vq = driver.queue(index)
    head = vq.add([Buffer(block.gpa, size, True) for block in blocks])
    # Asked, as a driver asks, so that the driver's later kicks follow the
    # device's suppression from here (a device that leaves kicks disabled
    # then stalls the guest); kicked anyway: a spurious kick is harmless.
    vq.kick_needed()
    if kick:
        guest.frontend.kick(index)
    return head


async def _collect_used(vq: DriverQueue, count: int) -> list[tuple[int, int]]:
    """The used entries, once there are `count` of them (or after WAIT_S).

    get_used raises if the device publishes a head that is not in flight:
    a report published twice fails here."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    used: list[tuple[int, int]] = []
    while len(used) < count and loop.time() < deadline:
        used += vq.get_used()
        await asyncio.sleep(0.01)
    return used


async def _wait_until_no_sessions(backend: RunningBackend) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while backend.server.sessions and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert not backend.server.sessions, "a session never ended"


def _queue_threads(session: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"{session}-q")]


def _ring_heads(guest: MockGuest, index: int) -> tuple[int, list[int], int, list[int]]:
    """(avail.idx, heads made available, used.idx, heads used) from guest RAM
    (the ring must not have wrapped)."""
    ring = guest.driver.layout.rings[index]
    memory = guest.ram.memory
    (avail_idx,) = U16.unpack(memory.read(ring.avail + 2, 2))
    (used_idx,) = U16.unpack(memory.read(ring.used + 2, 2))
    assert avail_idx <= ring.size and used_idx <= ring.size
    posted = [U16.unpack(memory.read(ring.avail + 4 + 2 * i, 2))[0] for i in range(avail_idx)]
    used = [
        USED_ELEM.unpack(memory.read(ring.used + 4 + USED_ELEM.size * i, USED_ELEM.size))[0]
        for i in range(used_idx)
    ]
    return avail_idx, posted, used_idx, used


# 1. Catches: GET_VRING_BASE answered while the ring's thread still runs a
# report (the reply comes during the held discard, the front-end would move
# the ring elsewhere with the report half done); a base that does not count
# the popped chain (after the restart the backend pops it again: head twice in
# the used ring or the trace); a used entry published after the reply; a ring
# that cannot be restarted with SET_VRING_BASE + a new kick fd + enable.
async def test_get_vring_base_waits_for_the_report_in_flight_and_the_ring_restarts(
    start_backend: StartBackend, gate: Gate
) -> None:
    backend = await start_backend()
    async with MockGuest(_options(backend)) as guest:
        frontend = guest.frontend
        driver = guest.driver
        index = driver.reporting_queue
        vq = driver.queue(index)
        blocks = driver.layout.blocks
        _populate(guest, blocks[:8])
        first = _post(guest, blocks[:4])
        assert await asyncio.to_thread(gate.entered.wait, WAIT_S)
        reply_task = asyncio.ensure_future(
            frontend.request(
                FrontendRequest.GET_VRING_BASE,
                VringState(index, 0),
                need_reply=False,
                expect_reply=True,
            )
        )
        await asyncio.sleep(0.1)
        assert not reply_task.done(), "GET_VRING_BASE answered with a discard in flight"
        assert vq.get_used() == []
        gate.opened.set()
        reply = await asyncio.wait_for(reply_task, WAIT_S)
        assert reply is not None
        state = VringState.decode(reply)
        assert (state.index, state.num) == (index, 1)  # the popped chain is counted
        # The report was published before the reply, and only once.
        assert [head for head, _ in vq.get_used()] == [first]

        # Restart the ring as QEMU does after a stop.
        new_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            await frontend.set_request(FrontendRequest.SET_VRING_BASE, VringState(index, state.num))
            await frontend.set_request(
                FrontendRequest.SET_VRING_KICK, VringFile(index, False), [new_kick]
            )
            assert frontend.protocol_features_offered
            await frontend.set_request(FrontendRequest.SET_VRING_ENABLE, VringState(index, 1))
            second = _post(guest, blocks[4:8], kick=False)
            os.eventfd_write(new_kick, 1)
            used = await _collect_used(vq, 1)
            assert [head for head, _ in used] == [second]
        finally:
            os.close(new_kick)
        records = backend.trace()
        assert [(r["seq"], r["head"]) for r in records] == [(1, first), (2, second)]
        assert all(r["discarded_entries"] == 4 and not r["errors"] for r in records)
        assert all(r["freed_bytes"] == r["bytes"] for r in records)
        # Nothing more was published: used.idx is where the two reports left it.
        avail_idx, _, used_idx, used_heads = _ring_heads(guest, index)
        assert avail_idx == used_idx == 2
        assert used_heads == [first, second]


# 1d. Catches: a session cancelled (the event loop shutting down) while
# GET_VRING_BASE waits for a report in flight, whose close then forgets the
# stopped ring's thread: it closes the kick fd and unmaps guest RAM under the
# running discard (the record shows an error or fewer freed bytes), or ends
# before the thread has.
async def test_a_session_cancelled_while_get_vring_base_waits_still_waits_for_the_report(
    start_backend: StartBackend, gate: Gate
) -> None:
    backend = await start_backend()
    guest = MockGuest(_options(backend))
    try:
        await guest.start()
        driver = guest.driver
        index = driver.reporting_queue
        _populate(guest, driver.layout.blocks[:4])
        head = _post(guest, driver.layout.blocks[:4])
        assert await asyncio.to_thread(gate.entered.wait, WAIT_S)
        (session,) = backend.server.sessions.values()
        (task,) = [t for t in asyncio.all_tasks() if t.get_name() == session.name]
        reply_task = asyncio.ensure_future(
            guest.frontend.request(
                FrontendRequest.GET_VRING_BASE,
                VringState(index, 0),
                need_reply=False,
                expect_reply=True,
            )
        )
        await asyncio.sleep(0.1)
        assert not reply_task.done()
        task.cancel()
        await asyncio.sleep(0.1)
        assert not task.done(), "the session ended with a discard in flight"
        assert _queue_threads(session.name) != []
        gate.opened.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT_S)
        reply_task.cancel()
        with contextlib.suppress(BaseException):
            await reply_task
    finally:
        await guest.close()
    (record,) = backend.trace()
    assert record["head"] == head and record["errors"] == []
    assert record["freed_bytes"] == record["bytes"] > 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while _queue_threads(session.name) and loop.time() < deadline:
        await asyncio.sleep(0.01)  # a thread ends a moment after saying so
    assert _queue_threads(session.name) == []


async def _err_signalled(guest: MockGuest, index: int) -> int:
    """How many times the err eventfd was signalled, once it was (or after WAIT_S)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while (count := guest.frontend.err_count(index)) == 0 and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return count


# 1b. Catches: a report that fails while SET_VRING_KICK waits for it, on a
# ring the new kick fd then restarts as if nothing happened (no err eventfd,
# the session not broken, the queue silently dead: the front-end is never
# told why the guest's reports stop); a failed report published anyway.
async def test_a_ring_that_breaks_while_a_new_kick_fd_waits_stays_broken_and_says_so(
    start_backend: StartBackend, gate: Gate
) -> None:
    backend = await start_backend()
    gate.fails = True
    async with MockGuest(_options(backend)) as guest:
        frontend = guest.frontend
        driver = guest.driver
        index = driver.reporting_queue
        _post(guest, driver.layout.blocks[:4])
        assert await asyncio.to_thread(gate.entered.wait, WAIT_S)
        new_kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            reply_task = asyncio.ensure_future(
                frontend.set_request(
                    FrontendRequest.SET_VRING_KICK, VringFile(index, False), [new_kick]
                )
            )
            await asyncio.sleep(0.1)
            assert not reply_task.done(), "SET_VRING_KICK answered with a discard in flight"
            gate.opened.set()
            await asyncio.wait_for(reply_task, WAIT_S)
            assert await _err_signalled(guest, index) == 1
            (session,) = backend.server.sessions.values()
            assert session.state is SessionState.BROKEN
            _post(guest, driver.layout.blocks[4:8], kick=False)
            os.eventfd_write(new_kick, 1)  # the restarted ring runs nothing
            await asyncio.sleep(0.1)
            assert session.state is SessionState.BROKEN
            assert _ring_heads(guest, index)[2] == 0  # used.idx: nothing published
            assert gate.calls == 1
        finally:
            os.close(new_kick)
    stats = await backend.server.handle_control({"cmd": "stats"})
    assert stats["totals"]["queue_errors"] == 1


class _ModuleWith:
    """A module with some of its names replaced, for one module's view of it."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class _ThreadThatCannotStart(threading.Thread):
    def start(self) -> None:
        raise RuntimeError("can't start new thread")


def _no_fds(*_args: Any) -> int:
    raise OSError(24, "Too many open files")


def _bug(*_args: Any) -> None:
    raise RuntimeError("a bug in the queue thread")


QUEUE_THREAD_FAULTS = {
    # what fails: (the name in worker.py replaced, its replacement)
    "no-wake-eventfd": ("os", _ModuleWith(os, eventfd=_no_fds)),
    "thread-cannot-start": ("threading", _ModuleWith(threading, Thread=_ThreadThatCannotStart)),
    "thread-setup-fails": ("precise_sleeps_for_this_thread", _bug),
    "kick-read-fails": ("read_eventfd", _bug),
}


# 1c. Catches: a queue thread that cannot be made (out of fds or threads) or
# that dies of a bug, leaving its ring silently dead (no err eventfd, the
# session not broken), or leaving a future nobody resolves (the hang-up then
# waits for ever: the session never ends, its fds stay open); a fault that
# reaches beyond its own session (the next guest is not served).
@pytest.mark.parametrize("fault", QUEUE_THREAD_FAULTS)
async def test_a_queue_thread_that_cannot_start_or_dies_breaks_only_its_ring(
    start_backend: StartBackend, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    backend = await start_backend()
    baseline = open_fds()
    name, replacement = QUEUE_THREAD_FAULTS[fault]
    with monkeypatch.context() as patched:
        patched.setattr(vhost_balloon.backend.vhost.worker, name, replacement)
        guest = MockGuest(_options(backend))
        try:
            await guest.start()
            index = guest.driver.reporting_queue
            if fault == "kick-read-fails":
                _post(guest, guest.driver.layout.blocks[:4])
            assert await _err_signalled(guest, index) == 1
            (session,) = backend.server.sessions.values()
            assert session.state is SessionState.BROKEN
        finally:
            await guest.close()
        await _wait_until_no_sessions(backend)
    assert session.state.value == "closed"  # (not `is`: mypy keeps it BROKEN)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while _queue_threads(session.name) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert _queue_threads(session.name) == []
    assert open_fds() == baseline
    async with MockGuest(_options(backend)) as next_guest:
        summary = next_guest.summary(await next_guest.run(2))
    assert summary["reports"] == 2 and summary["integrity_ok"]


MEMORY_CHANGES = ["set-mem-table", "add-mem-reg", "rem-mem-reg"]


# 2. Catches: a memory change (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) that
# swaps or unmaps mappings, or closes region fds, while a queue thread's
# discard still runs on them (the reply comes during the held discard; the
# discard then hits a closed or reused fd: an error in the record, fewer
# freed bytes; the publish hits a released mapping: the queue breaks); a
# report lost or repeated across the change; queues not re-parsed over the
# new mapping (later reports time out or corrupt guest memory); a batch cut
# short by the change that leaves kicks suppressed (the guest, which obeys
# suppression, never kicks again: its next report times out).
@pytest.mark.parametrize("change", MEMORY_CHANGES)
async def test_a_memory_change_waits_for_the_report_in_flight(
    start_backend: StartBackend, gate: Gate, change: str
) -> None:
    backend = await start_backend()
    options = _options(backend, memory=128 * MiB, regions=2, configure_mem_slots=True)
    async with MockGuest(options) as guest:
        frontend = guest.frontend
        driver = guest.driver
        index = driver.reporting_queue
        vq = driver.queue(index)
        regions = guest.ram.regions
        fds = guest.ram.region_fds()
        second_region = SingleMemoryRegion(regions[1].desc())
        in_region = {r: [b for b in driver.layout.blocks if b.region == r][:4] for r in (0, 1)}

        async def region_request(request: FrontendRequest) -> None:
            reply = await frontend.request(
                request, second_region, fds=[fds[1]], need_reply=True, expect_reply=True
            )
            assert reply == bytes(8)

        if change != "set-mem-table":
            assert frontend.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if change == "add-mem-reg":
            await region_request(FrontendRequest.REM_MEM_REG)  # so that it can be added
        held = in_region[0] if change == "add-mem-reg" else in_region[1]
        _populate(guest, held)
        head = _post(guest, held)
        assert await asyncio.to_thread(gate.entered.wait, WAIT_S)
        if change == "set-mem-table":
            request = frontend.request(
                FrontendRequest.SET_MEM_TABLE,
                MemoryTable(tuple(r.desc() for r in regions)),
                fds=fds,
                need_reply=True,
                expect_reply=True,
            )
        else:
            kind = (
                FrontendRequest.ADD_MEM_REG
                if change == "add-mem-reg"
                else FrontendRequest.REM_MEM_REG
            )
            request = frontend.request(
                kind, second_region, fds=[fds[1]], need_reply=True, expect_reply=True
            )
        reply_task = asyncio.ensure_future(request)
        await asyncio.sleep(0.1)
        assert not reply_task.done(), f"{change} answered with a discard in flight"
        gate.opened.set()
        assert await asyncio.wait_for(reply_task, WAIT_S) == bytes(8)
        used = await _collect_used(vq, 1)
        assert [h for h, _ in used] == [head]
        (record,) = backend.trace()
        assert record["head"] == head and record["discarded_entries"] == 4
        assert record["errors"] == []  # the discard ran on the region's own, open fd
        assert record["freed_bytes"] == record["bytes"] > 0
        if change == "rem-mem-reg":
            await region_request(FrontendRequest.ADD_MEM_REG)  # back, for the reports below
        (session,) = backend.server.sessions.values()
        assert len(session.memory_map) == 2
        summary = guest.summary(await guest.run(3))
    assert summary["reports"] == 3 and summary["integrity_ok"]
    assert summary["freed_bytes"] == summary["reported_bytes"]
    records = backend.trace()
    assert [r["seq"] for r in records] == [1, 2, 3, 4]  # nothing processed twice
    assert all(not r["errors"] and not r["skipped_outside"] for r in records)


# 3. Catches: a session that, when its front-end hangs up, closes its memory
# map and eventfds while the queue thread is still inside an injected delay
# (the report is never published, or published into unmapped memory; the
# record hook then finds the session gone or its map empty); a delay cut
# short by the hang-up; a queue thread, wake eventfd or region fd left behind; a
# server that cannot serve the next guest.
async def test_hanging_up_during_an_injected_delay_finishes_the_report_first(
    start_backend: StartBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered = threading.Event()
    hung_up = threading.Event()

    def held_sleep(duration_ns: int) -> int:
        # The delay starts only once the guest has hung up: the hang-up
        # lands inside the delay whatever the machine's load.
        entered.set()
        hung_up.wait(30)
        return real_sleep_exact_ns(duration_ns)

    monkeypatch.setattr(vhost_balloon.backend.latency.injection, "sleep_exact_ns", held_sleep)
    backend = await start_backend(latency=_delays(publish="const:300ms"))
    at_record: list[tuple[bool, int]] = []

    def note_session(record: ReportRecord) -> None:  # on the queue's thread
        session = backend.server.sessions.get(record.session)
        at_record.append((session is not None, len(session.memory_map) if session else 0))

    backend.server.record_hooks.append(note_session)
    baseline = open_fds()
    guest = MockGuest(_options(backend))
    try:
        await guest.start()
        (session,) = backend.server.sessions.values()
        _populate(guest, guest.driver.layout.blocks[:4])
        head = _post(guest, guest.driver.layout.blocks[:4])
        assert await asyncio.to_thread(entered.wait, WAIT_S)
    finally:
        await guest.close()  # the front-end is gone while the delay is in flight
        hung_up.set()
    await _wait_until_no_sessions(backend)
    assert session.state is SessionState.CLOSED
    assert session.end_reason  # it saw the hang-up
    assert at_record == [(True, 1)], "the session ended before its report finished"
    (record,) = backend.trace()
    assert record["head"] == head and record["discarded_entries"] == 4
    assert record["injected_ns"]["publish"] >= 300 * MS  # the delay ran in full
    assert open_fds() == baseline
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while _queue_threads(session.name) and loop.time() < deadline:
        await asyncio.sleep(0.01)  # a thread ends a moment after saying so
    assert _queue_threads(session.name) == []
    async with MockGuest(_options(backend)) as next_guest:
        summary = next_guest.summary(await next_guest.run(1))
    assert summary["reports"] == 1 and summary["integrity_ok"]
    assert [r["seq"] for r in backend.trace() if r["session"] != record["session"]] == [1]


N_STORM = 40


# 4. Catches: a report lost or served twice when thousands of kicks and
# SET_VRING_ENABLE 0/1 toggles arrive while reports run (the driver times
# out; a head used twice makes get_used raise or used.idx overshoot
# avail.idx); a disable treated as a stop (the ring never runs again); a kick
# that arrives while the ring is disabled dropped instead of held back until
# the enable (the last report is never served); records lost, repeated or
# out of order.
async def test_a_kick_storm_and_enable_toggles_lose_and_repeat_nothing(
    start_backend: StartBackend,
) -> None:
    # Each report spends 2 ms in an injected delay: most toggles land while a
    # report is in flight, not between two reports.
    backend = await start_backend(latency=_delays(report="const:2ms"))
    async with MockGuest(_options(backend, capacity=2)) as guest:
        frontend = guest.frontend
        index = guest.driver.reporting_queue
        kick_fd = frontend.kick_fd(index)
        assert frontend.protocol_features_offered  # SET_VRING_ENABLE is in use
        stop = threading.Event()
        kicks = 0

        def storm() -> None:
            nonlocal kicks
            while not stop.is_set():
                os.eventfd_write(kick_fd, 1)
                kicks += 1
                if kicks % 200 == 0:
                    stop.wait(0.0005)  # let the event loop have the GIL now and then

        async def toggle(done: asyncio.Event) -> int:
            toggles = 0
            while not done.is_set():  # from the first report to the last
                await frontend.set_request(FrontendRequest.SET_VRING_ENABLE, VringState(index, 0))
                await asyncio.sleep(0.01)
                await frontend.set_request(FrontendRequest.SET_VRING_ENABLE, VringState(index, 1))
                toggles += 1
                await asyncio.sleep(0.02)
            return toggles

        storming = threading.Thread(target=storm, name="kick-storm", daemon=True)
        storming.start()
        done = asyncio.Event()
        toggling: asyncio.Future[int] | None = None
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while kicks < 100 and loop.time() < deadline:  # the storm is on before reports
                await asyncio.sleep(0.001)
            toggling = asyncio.ensure_future(toggle(done))
            result = await guest.run(N_STORM - 1)
            done.set()
            assert await asyncio.wait_for(toggling, WAIT_S) >= 1
            deadline = loop.time() + WAIT_S
            while kicks < 2000 and loop.time() < deadline:  # thousands, whatever the speed
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            storming.join(WAIT_S)
            if toggling is not None:
                toggling.cancel()
        assert kicks >= 2000
        summary = guest.summary(result)
        assert summary["reports"] == N_STORM - 1 and summary["integrity_ok"]
        # The last report is kicked while its ring is disabled (no storm now):
        # the kick is held back, and enabling the ring serves it.
        vq = guest.driver.queue(index)
        await frontend.set_request(FrontendRequest.SET_VRING_ENABLE, VringState(index, 0))
        last = _post(guest, guest.driver.layout.blocks[:2])
        await asyncio.sleep(0.05)
        assert vq.get_used() == []  # a disabled ring runs no batch
        await frontend.set_request(FrontendRequest.SET_VRING_ENABLE, VringState(index, 1))
        assert [head for head, _ in await _collect_used(vq, 1)] == [last]
        records = backend.trace()  # waits for the running batches
        avail_idx, posted, used_idx, used = _ring_heads(guest, index)
        assert avail_idx == used_idx == N_STORM
        assert used == posted  # every head made available was used once, in order
    assert [r["seq"] for r in records] == list(range(1, N_STORM + 1))
    assert [r["head"] for r in records] == posted
    assert len({r["session"] for r in records}) == 1


# 5. Catches: records dropped or duplicated when two sessions' threads record
# at once (the trace queue, the per-device seq), a record written before its
# publish or with phases stamped out of order, seq shared across sessions or
# not contiguous, the trace counters reporting drops.
async def test_trace_records_of_concurrent_sessions_are_complete_and_in_order(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()

    async def one_guest() -> dict[str, Any]:
        async with MockGuest(_options(backend, capacity=2)) as guest:
            return guest.summary(await guest.run(30))

    summaries = await asyncio.gather(one_guest(), one_guest())
    assert all(s["reports"] == 30 and s["integrity_ok"] for s in summaries)
    records = backend.trace()
    assert len(records) == 60
    sessions: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        sessions.setdefault(record["session"], []).append(record)
    assert len(sessions) == 2
    for name, mine in sessions.items():
        assert [r["seq"] for r in mine] == list(range(1, 31)), name
        for record in mine:
            stamps = [record[key] for key in TIMESTAMPS]
            assert stamps == sorted(stamps), record
            assert record["t_kick_ns"] > 0 and record["t_notified_ns"] > 0
        published = [r["t_published_ns"] for r in mine]
        assert all(a < b for a, b in itertools.pairwise(published)), name
    stats = await backend.server.handle_control({"cmd": "stats"})
    assert stats["trace"]["dropped"] == 0 and stats["trace"]["error"] is None
    assert stats["trace"]["written"] == 60
    assert stats["totals"]["reports"] == 60


def _descriptor_loop(guest: MockGuest) -> None:
    """Make one available chain whose descriptors point at each other."""
    index = guest.driver.reporting_queue
    ring = guest.driver.layout.rings[index]
    memory = guest.ram.memory
    (avail_idx,) = U16.unpack(memory.read(ring.avail + 2, 2))
    slot = ring.avail + 4 + 2 * (avail_idx % ring.size)
    memory.write(ring.desc, DESC.pack(0x1000000, 4096, 1 | 2, 1))  # 0 -> 1
    memory.write(ring.desc + 16, DESC.pack(0x1200000, 4096, 1 | 2, 0))  # 1 -> 0
    memory.write(slot, U16.pack(0))
    memory.write(ring.avail + 2, U16.pack(avail_idx + 1))


async def _flood(hostile: MockGuest, stop: asyncio.Event) -> int:
    """Keep the reporting ring full of useless chains and kick all the time;
    how many chains were posted."""
    driver = hostile.driver
    index = driver.reporting_queue
    vq = driver.queue(index)
    block = driver.layout.blocks[0]
    useless = (
        Buffer(1 << 62, 4096, True),  # nowhere near RAM
        Buffer(block.gpa + 512, 4096, True),  # not page-aligned
    )
    posted = 0
    while not stop.is_set():
        vq.get_used()
        while vq.free_descriptors:
            vq.add([useless[posted % 2]])
            posted += 1
        hostile.frontend.kick(index)
        await asyncio.sleep(0.001)
    return posted


# 6. Catches: one session's flooded ring starving the other sessions' queue
# threads or the event loop (the good guests' reports time out, the hostile
# session's GET_CONFIG is not answered), a malformed ring taking down more
# than its own queue, useless chains being discarded (integrity errors), a
# server that cannot serve a new guest afterwards.
async def test_four_good_guests_and_a_hostile_one_at_once(start_backend: StartBackend) -> None:
    backend = await start_backend()
    hostile = MockGuest(_options(backend))
    await hostile.start()
    try:
        (hostile_name,) = backend.server.sessions
        index = hostile.driver.reporting_queue
        stop = asyncio.Event()
        flooding = asyncio.ensure_future(_flood(hostile, stop))

        async def good_guest() -> dict[str, Any]:
            async with MockGuest(_options(backend)) as guest:
                return guest.summary(await guest.run(10))

        try:
            summaries = await asyncio.gather(*(good_guest() for _ in range(4)))
            # Still flooding: the hostile session's own messages are answered.
            assert await asyncio.wait_for(hostile.frontend.get_config(0, 16), WAIT_S)
        finally:
            stop.set()
            posted = await asyncio.wait_for(flooding, WAIT_S)
        assert all(s["reports"] == 10 and s["integrity_ok"] for s in summaries)
        assert all(s["freed_bytes"] == s["reported_bytes"] for s in summaries)
        assert posted > hostile.driver.config.queue_size  # the ring was refilled
        hostile_device = backend.server.vhost.devices[hostile_name]
        assert hostile_device.stats.skipped_outside > 0
        assert hostile_device.stats.discarded_entries == 0

        # Then it breaks its ring: only its queue breaks, it still gets answers.
        _descriptor_loop(hostile)
        hostile.frontend.kick(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while hostile.frontend.err_count(index) == 0:
            assert loop.time() < deadline, "the err eventfd was never signalled"
            await asyncio.sleep(0.01)
        session = backend.server.sessions[hostile_name]
        assert session.state is SessionState.BROKEN
        assert session.rings.vrings[index].broken
        assert await asyncio.wait_for(hostile.frontend.get_config(0, 16), WAIT_S)
    finally:
        await hostile.close()
    await _wait_until_no_sessions(backend)
    async with MockGuest(_options(backend)) as guest:
        summary = guest.summary(await guest.run(2))
    assert summary["reports"] == 2 and summary["integrity_ok"]
    good = [r for r in backend.trace() if r["session"] != hostile_name]
    assert len(good) == 4 * 10 + 2
    assert all(r["discarded_entries"] == r["entries"] for r in good)
