"""Many front-ends, hostile front-ends, and what each one can (not) break."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

import pytest

from tests.conftest import MiB, StartBackend, open_fds
from vhost_balloon.guest.frontend import FrontendOptions, VhostUserFrontend
from vhost_balloon.guest.runner import MockGuest
from vhost_balloon.protocol.vhost_user import (
    HEADER,
    REQUEST_SPECS,
    U64,
    ConfigPayload,
    FrontendRequest,
    LogPayload,
    MemoryRegionDesc,
    MemoryTable,
    SingleMemoryRegion,
    VringFile,
    VringState,
    encode_frame,
)
from vhost_balloon.protocol.virtqueue import Buffer


async def _frontend(socket_path: str) -> VhostUserFrontend:
    frontend = VhostUserFrontend(socket_path, FrontendOptions())
    await frontend.connect()
    await frontend.init()
    return frontend


async def _still_serving(frontend: VhostUserFrontend) -> bool:
    return await frontend.get_u64(FrontendRequest.GET_FEATURES) != 0


async def test_concurrent_sessions_are_served_independently(start_backend: StartBackend) -> None:
    backend = await start_backend()

    async def one_guest() -> dict[str, object]:
        async with MockGuest(backend.guest_options(memory=128 * MiB)) as guest:
            return guest.summary(await guest.run(5))

    summaries = await asyncio.gather(*(one_guest() for _ in range(3)))
    assert all(s["reports"] == 5 and s["freed_bytes"] == s["reported_bytes"] for s in summaries)
    assert len({record["session"] for record in backend.trace()}) == 3


async def test_sessions_one_after_another_leave_no_fd_behind(start_backend: StartBackend) -> None:
    backend = await start_backend()
    baseline = open_fds()
    for _ in range(3):
        async with MockGuest(backend.guest_options(memory=96 * MiB)) as guest:
            await guest.run(2)
    await _wait_for(lambda: not backend.server.sessions)
    assert backend.server.sessions_served == 3
    assert open_fds() == baseline


GARBAGE = {
    "bad version": HEADER.pack(FrontendRequest.GET_FEATURES, 0x2, 0),
    "unknown flag bits": HEADER.pack(FrontendRequest.GET_FEATURES, 0x101, 0),
    "oversized payload": HEADER.pack(FrontendRequest.SET_FEATURES, 0x1, 1 << 20),
    "wrong payload size": encode_frame(FrontendRequest.SET_FEATURES, b"\x01\x02\x03"),
    "memory table claiming 9 regions": encode_frame(
        FrontendRequest.SET_MEM_TABLE, struct.pack("=II", 9, 0) + bytes(32 * 8)
    ),
    "kick without its fd": encode_frame(
        FrontendRequest.SET_VRING_KICK, VringFile(2, False).encode()
    ),
    "a reply instead of a request": HEADER.pack(FrontendRequest.GET_FEATURES, 0x5, 0),
    "truncated frame": HEADER.pack(FrontendRequest.SET_FEATURES, 0x1, 8) + b"\x00\x01",
}


@pytest.mark.parametrize("garbage", list(GARBAGE), ids=list(GARBAGE))
async def test_garbage_ends_only_its_own_session(
    start_backend: StartBackend, garbage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vhost_balloon")
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        await guest.run(1)
        hostile = await _frontend(str(backend.socket_path))
        try:
            await hostile.send_raw(GARBAGE[garbage])
            if garbage == "truncated frame":
                hostile.channel.sock.shutdown(socket.SHUT_WR)
            assert await hostile.wait_closed(timeout=5.0), "the backend kept the session"
        finally:
            await hostile.close()
        # The other session never noticed.
        summary = guest.summary(await guest.run(3))
        assert summary["reports"] == 3 and summary["integrity_ok"]
    ended = [
        r.getMessage()
        for r in caplog.records
        if "ending session" in r.getMessage() or "mid-message" in r.getMessage()
    ]
    assert len(ended) == 1, "exactly one log line must say why the session ended"


async def test_unknown_request_is_refused_and_the_session_goes_on(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    frontend = await _frontend(str(backend.socket_path))
    try:
        reply = await frontend.request(44, b"", need_reply=True, expect_reply=True)
        assert reply is not None and U64.decode(reply).value != 0
        await frontend.request(99, b"abc", need_reply=False, expect_reply=False)
        assert await _still_serving(frontend)
    finally:
        await frontend.close()


@pytest.mark.parametrize(
    ("request_id", "payload", "with_fd"),
    [
        (FrontendRequest.GET_INFLIGHT_FD, bytes(24), False),
        (FrontendRequest.SET_LOG_BASE, LogPayload(4096, 0).encode(), True),
        (FrontendRequest.GET_STATUS, b"", False),
        (FrontendRequest.CHECK_DEVICE_STATE, b"", False),
        (FrontendRequest.SET_VRING_NUM, VringState(7, 64).encode(), False),
        (FrontendRequest.SET_VRING_NUM, VringState(2, 100).encode(), False),
        (FrontendRequest.SET_FEATURES, U64(1 << 63).encode(), False),
        (FrontendRequest.SET_PROTOCOL_FEATURES, U64(1 << 12).encode(), False),
    ],
    ids=[
        "inflight",
        "log-base",
        "status",
        "device-state",
        "queue-index",
        "queue-size",
        "unoffered-feature",
        "unoffered-protocol-feature",
    ],
)
async def test_refused_requests_get_an_error_reply(
    start_backend: StartBackend, request_id: int, payload: bytes, with_fd: bool
) -> None:
    backend = await start_backend()
    frontend = await _frontend(str(backend.socket_path))
    fds = [os.memfd_create("log")] if with_fd else []
    try:
        reply = await frontend.request(
            request_id, payload, fds=fds, need_reply=True, expect_reply=True
        )
        assert reply is not None and U64.decode(reply[:8]).value != 0
        assert await _still_serving(frontend)
    finally:
        for fd in fds:
            os.close(fd)
        await frontend.close()


async def test_region_larger_than_its_file_is_refused(start_backend: StartBackend) -> None:
    backend = await start_backend()
    frontend = await _frontend(str(backend.socket_path))
    fd = os.memfd_create("small")
    os.ftruncate(fd, 16 * MiB)
    baseline = open_fds()
    try:
        table = MemoryTable((MemoryRegionDesc(0, 64 * MiB, 0x7F0000000000, 0),))
        reply = await frontend.request(
            FrontendRequest.SET_MEM_TABLE, table, fds=[fd], need_reply=True, expect_reply=True
        )
        assert reply is not None and U64.decode(reply).value != 0
        overlapping = MemoryTable(
            (
                MemoryRegionDesc(0, 8 * MiB, 0x7F0000000000, 0),
                MemoryRegionDesc(4 * MiB, 8 * MiB, 0x7F1000000000, 0),
            )
        )
        reply = await frontend.request(
            FrontendRequest.SET_MEM_TABLE,
            overlapping,
            fds=[fd, fd],
            need_reply=True,
            expect_reply=True,
        )
        assert reply is not None and U64.decode(reply).value != 0
        assert await _still_serving(frontend)
        assert open_fds() == baseline  # every fd of the refused tables was closed
    finally:
        os.close(fd)
        await frontend.close()


async def test_kick_fd_that_is_not_an_eventfd_is_refused(start_backend: StartBackend) -> None:
    backend = await start_backend()
    frontend = await _frontend(str(backend.socket_path))
    not_an_eventfd = os.memfd_create("file")  # always readable: would spin the loop
    try:
        reply = await frontend.request(
            FrontendRequest.SET_VRING_KICK,
            VringFile(2, False),
            fds=[not_an_eventfd],
            need_reply=True,
            expect_reply=True,
        )
        assert reply is not None and U64.decode(reply).value != 0
        assert await _still_serving(frontend)
    finally:
        os.close(not_an_eventfd)
        await frontend.close()


async def test_config_reads_outside_the_config_space_get_an_empty_reply(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    frontend = await _frontend(str(backend.socket_path))
    try:
        reply = await frontend.request(
            FrontendRequest.GET_CONFIG, ConfigPayload(8, 16, 0, bytes(16))
        )
        assert reply is not None
        assert ConfigPayload.decode(reply).size == 0
        good = await frontend.get_config(0, 16)
        assert len(good) == 16
    finally:
        await frontend.close()


async def test_frontend_disconnecting_mid_report_loses_nothing(start_backend: StartBackend) -> None:
    backend = await start_backend()
    baseline = open_fds()
    guest = MockGuest(backend.guest_options())
    await guest.start()
    driver = guest.driver
    reporting = driver.reporting_queue
    # Post a big report and hang up without waiting for it.
    blocks = driver.layout.blocks[:32]
    size = driver.layout.block_size
    for block in blocks:
        mapping, offset = guest.ram.locate(block.gpa, size)
        mapping[offset : offset + size] = b"\x5a" * size
    driver.queue(reporting).add([Buffer(b.gpa, size, True) for b in blocks])
    guest.frontend.kick(reporting)
    await guest.close()
    await _wait_for(lambda: not backend.server.sessions)
    assert open_fds() == baseline, "the ended session leaked fds or mappings"
    # The backend is still serving new front-ends.
    async with MockGuest(backend.guest_options()) as second:
        summary = second.summary(await second.run(2))
    assert summary["reports"] == 2


async def test_config_change_reaches_the_frontend(start_backend: StartBackend) -> None:
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        (device,) = backend.server.vhost.devices.values()
        assert device.frontend is not None  # the session attached itself
        assert await device.frontend.config_changed()
        await asyncio.wait_for(guest.frontend.config_changed.wait(), 5.0)
        assert guest.frontend.config_change_msgs == 1
        await guest.run(1)


async def _wait_for(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_unsealed_guest_memory_is_refused_unless_allowed(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    frontend = await _frontend(str(backend.socket_path))
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, 16 * MiB)
    try:
        table = MemoryTable((MemoryRegionDesc(0, 16 * MiB, 0x7F0000000000, 0),))
        reply = await frontend.request(
            FrontendRequest.SET_MEM_TABLE, table, fds=[fd], need_reply=True, expect_reply=True
        )
        assert reply is not None and U64.decode(reply).value != 0
        assert await _still_serving(frontend)
    finally:
        os.close(fd)
        await frontend.close()


@pytest.mark.parametrize("kind", ["semaphore", "blocking-then-saturated"])
async def test_hostile_eventfds_cannot_stall_the_loop(
    start_backend: StartBackend, kind: str
) -> None:
    backend = await start_backend()
    frontend = await _frontend(str(backend.socket_path))
    try:
        if kind == "semaphore":
            fd = os.eventfd(0, os.EFD_SEMAPHORE)
            reply = await frontend.request(
                FrontendRequest.SET_VRING_KICK,
                VringFile(2, False),
                fds=[fd],
                need_reply=True,
                expect_reply=True,
            )
            assert reply is not None and U64.decode(reply).value != 0
        else:
            fd = os.eventfd(0)  # blocking, as a hostile front-end may pass it
            reply = await frontend.request(
                FrontendRequest.SET_VRING_CALL,
                VringFile(2, False),
                fds=[fd],
                need_reply=True,
                expect_reply=True,
            )
            assert reply == bytes(8)
            assert not os.get_blocking(fd)  # the backend made it non-blocking
            os.set_blocking(fd, True)  # and the peer flips it back ...
            os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)  # ... and saturates it
            (session,) = backend.server.sessions.values()
            session.rings.vrings[2].notify()  # must not block the event loop
        os.close(fd)
        assert await _still_serving(frontend)
    finally:
        await frontend.close()


async def test_rem_mem_reg_without_an_fd_as_qemu_sends_it(start_backend: StartBackend) -> None:
    backend = await start_backend()
    options = backend.guest_options(memory=384 << 20, regions=2)
    async with MockGuest(options) as guest:
        second = guest.ram.regions[1]
        reply = await guest.frontend.request(
            FrontendRequest.REM_MEM_REG,
            SingleMemoryRegion(second.desc()),
            fds=[],
            need_reply=True,
            expect_reply=True,
        )
        assert reply == bytes(8)
        (session,) = backend.server.sessions.values()
        assert len(session.memory_map) == 1
        summary = guest.summary(await guest.run(1))
        assert summary["reports"] == 1


async def test_the_device_holds_its_started_queues_until_they_stop(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        await guest.run(1)
        (device,) = backend.server.vhost.devices.values()
        reporting = device.queues.reporting
        assert reporting is not None and reporting in device.handles
        handle = device.handles[reporting]
        assert handle.index == reporting
        assert handle.memory_map is backend.server.sessions[device.session].memory_map
    await _wait_for(lambda: not backend.server.sessions)
    assert device.handles == {}  # every ring stopped with its session


async def test_every_route_takes_the_payload_its_request_decodes_to(
    start_backend: StartBackend,
) -> None:
    """A route whose payload type disagrees with REQUEST_SPECS would refuse
    every such request: check each against a payload of the smallest size."""
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        await guest.run(1)
        (session,) = backend.server.sessions.values()
        assert len(session.routes) == 23
        for request, route in session.routes.items():
            spec = REQUEST_SPECS[request]
            payload = bytearray(spec.sizes[0])
            if request is FrontendRequest.SET_MEM_TABLE:
                payload[0] = 1  # one region
            decoded = spec.decode(bytes(payload))
            assert isinstance(decoded, route.payload), request.name


def _file_of(fd: int) -> tuple[int, int] | None:
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _fds_of(files: set[tuple[int, int] | None]) -> set[int]:
    """The fds of this process (guest's and backend's) that refer to these files."""
    return {fd for fd in open_fds() if _file_of(fd) in files}


@pytest.mark.parametrize("regions", [1, 2])
@pytest.mark.parametrize("route", ["SET_MEM_TABLE", "ADD_MEM_REG"])
async def test_each_mapped_region_owns_exactly_the_fd_it_was_sent(
    start_backend: StartBackend, route: str, regions: int
) -> None:
    """Invariant 4 for the memory table: every received fd is kept by exactly
    one region (never closed under it, never closed twice) or closed."""
    backend = await start_backend()
    baseline = open_fds()
    options = backend.guest_options(
        memory=128 * MiB, regions=regions, configure_mem_slots=route == "ADD_MEM_REG"
    )
    async with MockGuest(options) as guest:
        (session,) = backend.server.sessions.values()
        files = {_file_of(fd) for fd in guest.ram.region_fds()}

        def owned() -> set[int]:
            mapped = session.memory_map.regions
            assert len(mapped) == regions
            for region in mapped:
                assert region.fd is not None
                identity = (region.identity.device, region.identity.inode)
                assert _file_of(region.fd) == identity, "a region's fd was closed under it"
            return {region.fd for region in mapped if region.fd is not None}

        regions_fds = owned()
        assert len(regions_fds) == regions
        # Python's mmap keeps a dup of its fd, so count rather than name them.
        ram_fds = len(_fds_of(files))
        if route == "SET_MEM_TABLE":  # a second table: its fds replace the first one's
            await guest.frontend.set_request(
                FrontendRequest.SET_MEM_TABLE,
                MemoryTable(tuple(guest.ram.descs())),
                guest.ram.region_fds(),
            )
            regions_fds = owned()
            assert len(_fds_of(files)) == ram_fds, "the old table's fds were not all closed"
        summary = guest.summary(await guest.run(2))
        assert summary["reports"] == 2 and summary["freed_bytes"] == summary["reported_bytes"]
        assert owned() == regions_fds
    await _wait_for(lambda: not backend.server.sessions)
    assert open_fds() == baseline
