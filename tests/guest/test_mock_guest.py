"""The mocked guest on its own, against a small in-test fake device.

The fake (a blocking thread, no validation beyond the protocol codec) can
misbehave on purpose in ways the real backend never does: discard at the
wrong file offset, hang up mid-report, stay silent, nack. These tests show
that the guest's own checks catch each of those, so a passing integration
test means something. Tests against the real backend are in
tests/integration/.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import json
import mmap
import os
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vhost_balloon.guest import cli
from vhost_balloon.guest.driver import DriverConfig
from vhost_balloon.guest.errors import BackendClosedError, ConfigError, NackError, ReplyTimeoutError
from vhost_balloon.guest.frontend import FrontendOptions, VhostUserFrontend
from vhost_balloon.guest.layout import plan_layout
from vhost_balloon.guest.ram import GuestRam
from vhost_balloon.guest.runner import GuestOptions, MockGuest, run_guest
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable, Space
from vhost_balloon.protocol.samples import nearest_rank, percentiles
from vhost_balloon.protocol.vhost_user import (
    HEADER,
    HEADER_SIZE,
    U64,
    BackendRequest,
    ConfigPayload,
    FrontendRequest,
    MemoryTable,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
    decode_header,
    decode_request,
    encode_backend_request,
    encode_reply,
    protocol_feature_mask,
)
from vhost_balloon.protocol.virtio import (
    BALLOON_F_PAGE_POISON,
    BALLOON_F_REPORTING,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    BalloonConfig,
    feature_mask,
)
from vhost_balloon.protocol.virtqueue import DeviceQueue, RingLayout

R = FrontendRequest
MiB = 1 << 20
OFFERED = feature_mask(
    F_VERSION_1, BALLOON_F_REPORTING, BALLOON_F_PAGE_POISON, F_INDIRECT_DESC, F_EVENT_IDX, 30
)
ALL_PROTOCOL = protocol_feature_mask(
    ProtocolFeature.MQ,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.CONFIG,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


@dataclass
class FakeVring:
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    fds: dict[str, int] = field(default_factory=dict)  # kick, call, err
    queue: DeviceQueue | None = None


@dataclass
class FakeDevice:
    """A blocking, single-connection fake vhost-user balloon device."""

    path: str
    discard: str = "punch-hole"  # or "none", or "wrong-offset" (the fd-offset bug)
    protocol: int = ALL_PROTOCOL
    offered: int = OFFERED
    close_after: int | None = None  # close the connection after N requests
    silent_on: int | None = None  # never reply to this request
    nack_on: int | None = None  # ack this request with 1
    close_on_kick: bool = False  # hang up instead of processing a report
    requests: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.stop_r, self.stop_w = os.pipe()
        self.regions: list[tuple[Region, mmap.mmap, int]] = []
        self.vrings: dict[int, FakeVring] = {}
        self.backend_sock: socket.socket | None = None
        self.reply_ack = False
        self.features = 0
        self.config = BalloonConfig(num_pages=0, actual=0)
        self.reports: list[int] = []
        self.thread.start()

    # -- plumbing ---------------------------------------------------------------

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        self.server.close()
        for _region, mapping, fd in self.regions:
            mapping.close()
            os.close(fd)
        for vring in self.vrings.values():
            for fd in vring.fds.values():
                os.close(fd)
        os.close(self.stop_r)
        os.close(self.stop_w)
        if self.backend_sock is not None:
            self.backend_sock.close()

    def _serve(self) -> None:
        ready, _, _ = select.select([self.server.fileno(), self.stop_r], [], [])
        if self.stop_r in ready:
            return
        conn, _ = self.server.accept()
        with conn:
            try:
                self._loop(conn)
            except Exception as error:  # the fake records, the test asserts
                self.errors.append(repr(error))

    def _loop(self, conn: socket.socket) -> None:
        while True:
            kicks = {
                vring.fds["kick"]: index
                for index, vring in self.vrings.items()
                if "kick" in vring.fds
            }
            ready, _, _ = select.select([conn.fileno(), self.stop_r, *kicks], [], [])
            if self.stop_r in ready:
                return
            for fd in ready:
                if fd in kicks:
                    if self.close_on_kick:
                        return
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                    self._process(kicks[fd])
            if conn.fileno() in ready and not self._message(conn):
                return

    def _recv(self, conn: socket.socket, size: int) -> tuple[bytes, list[int]]:
        data, fds = b"", list[int]()
        while len(data) < size:
            chunk, anc, _flags, _ = conn.recvmsg(size - len(data), socket.CMSG_SPACE(8 * 4))
            if not chunk:
                raise EOFError
            for _level, _kind, payload in anc:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            data += chunk
        return data, fds

    def _message(self, conn: socket.socket) -> bool:
        try:
            raw, fds = self._recv(conn, HEADER_SIZE)
        except EOFError:
            return False
        header = decode_header(raw)
        body, more = self._recv(conn, header.size) if header.size else (b"", [])
        fds += more
        request = decode_request(header, body, len(fds))
        self.requests.append(request.request)
        if self.close_after is not None and len(self.requests) >= self.close_after:
            return False
        if request.request == self.silent_on:
            return True
        reply = self._handle(request.request, request.payload, fds)
        if reply is not None:
            conn.sendall(encode_reply(request.request, reply))
        elif request.header.need_reply:
            status = 1 if request.request == self.nack_on else 0
            conn.sendall(encode_reply(request.request, U64(status).encode()))
        return True

    # -- the device ---------------------------------------------------------------

    def _handle(self, request: R, payload: object, fds: list[int]) -> bytes | None:
        if request is R.GET_FEATURES:
            return U64(self.offered).encode()
        if request is R.GET_PROTOCOL_FEATURES:
            return U64(self.protocol).encode()
        if request is R.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            self.reply_ack = bool(payload.value >> ProtocolFeature.REPLY_ACK & 1)
        elif request is R.GET_QUEUE_NUM:
            return U64(3).encode()
        elif request is R.GET_MAX_MEM_SLOTS:
            return U64(8).encode()
        elif request is R.SET_BACKEND_REQ_FD:
            self.backend_sock = socket.socket(fileno=fds[0])
            self.backend_sock.sendall(
                encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=False)
            )
        elif request is R.SET_FEATURES:
            assert isinstance(payload, U64)
            self.features = payload.value
        elif request is R.SET_MEM_TABLE:
            assert isinstance(payload, MemoryTable)
            for desc, fd in zip(payload.regions, fds, strict=True):
                self._map(
                    desc.guest_phys_addr,
                    desc.memory_size,
                    desc.userspace_addr,
                    desc.mmap_offset,
                    fd,
                )
        elif request is R.ADD_MEM_REG:
            assert isinstance(payload, SingleMemoryRegion)
            desc = payload.region
            self._map(
                desc.guest_phys_addr,
                desc.memory_size,
                desc.userspace_addr,
                desc.mmap_offset,
                fds[0],
            )
        elif request is R.SET_VRING_NUM:
            assert isinstance(payload, VringState)
            self.vrings.setdefault(payload.index, FakeVring()).num = payload.num
        elif request is R.SET_VRING_BASE:
            assert isinstance(payload, VringState)
            self.vrings.setdefault(payload.index, FakeVring()).base = payload.num
        elif request is R.SET_VRING_ADDR:
            assert isinstance(payload, VringAddr)
            self.vrings.setdefault(payload.index, FakeVring()).addr = payload
        elif request in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            assert isinstance(payload, VringFile)
            key = request.name.rsplit("_", 1)[1].lower()
            vring = self.vrings.setdefault(payload.index, FakeVring())
            if key in vring.fds:
                os.close(vring.fds[key])
            vring.fds[key] = fds[0]
        elif request is R.GET_CONFIG:
            assert isinstance(payload, ConfigPayload)
            data = self.config.read(payload.offset, payload.size)
            return ConfigPayload(payload.offset, payload.size, 0, data).encode()
        elif request is R.SET_CONFIG:
            assert isinstance(payload, ConfigPayload)
            self.config = self.config.write(payload.offset, payload.data)
        elif request is R.GET_VRING_BASE:
            assert isinstance(payload, VringState)
            known = self.vrings.get(payload.index)
            base = known.queue.next_avail if known and known.queue else 0
            return VringState(payload.index, base).encode()
        else:
            for fd in fds:
                os.close(fd)
        return None

    def _map(self, gpa: int, size: int, uva: int, offset: int, fd: int) -> None:
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=offset)
        self.regions.append((Region(gpa, size, uva, offset), mapping, fd))

    def _queue(self, index: int) -> DeviceQueue:
        vring = self.vrings[index]
        if vring.queue is not None:
            return vring.queue
        memory = GuestMemory(
            RegionTable([r for r, _m, _fd in self.regions]), [m for _r, m, _fd in self.regions]
        )
        assert vring.addr is not None
        addr = vring.addr
        vring.queue = DeviceQueue(
            memory,
            RingLayout(vring.num, addr.desc, addr.avail, addr.used),
            ring_space=Space.UVA,
            indirect=bool(self.features >> F_INDIRECT_DESC & 1),
            event_idx=bool(self.features >> F_EVENT_IDX & 1),
            next_avail=vring.base,
        )
        return vring.queue

    def _process(self, index: int) -> None:
        queue = self._queue(index)
        memory = queue.memory
        while True:
            queue.disable_notifications()
            while (chain := queue.pop()) is not None:
                for desc in chain.writable:
                    self._discard(memory.table, desc.addr, desc.length)
                self.reports.append(len(chain.writable))
                queue.push(chain.head, 0)
                if queue.needs_notify():
                    os.eventfd_write(self.vrings[index].fds["call"], 1)
            if not queue.enable_notifications():  # with EVENT_IDX: writes avail_event
                return

    def _discard(self, table: RegionTable, gpa: int, length: int) -> None:
        if self.discard == "none":
            return
        region_index, offset = table.find(gpa, length)
        region = table.regions[region_index]
        fd = self.regions[region_index][2]
        file_offset = offset if self.discard == "wrong-offset" else region.mmap_offset + offset
        if _libc.fallocate(fd, PUNCH, file_offset, length) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "vb.sock")


@contextlib.contextmanager
def fake_device(path: str, **kwargs: Any) -> Iterator[FakeDevice]:
    device = FakeDevice(path, **kwargs)
    try:
        yield device
    finally:
        device.close()


def small_options(path: str, **driver_kwargs: Any) -> GuestOptions:
    regions = driver_kwargs.pop("regions", 1)
    memory = driver_kwargs.pop("memory", 96 * MiB)
    frontend = {
        k: driver_kwargs.pop(k)
        for k in ("reply_ack", "configure_mem_slots", "backend_req", "mq", "config")
        if k in driver_kwargs
    }
    driver_kwargs.setdefault("report_timeout", 5.0)
    driver = DriverConfig(capacity=16, **driver_kwargs)
    return GuestOptions(
        socket_path=path,
        memory_bytes=memory,
        regions=regions,
        driver=driver,
        reply_timeout=2.0,
        discard_label="punch-hole",
        **frontend,
    )


async def test_reports_free_memory_and_read_back_zero(sock_path: str) -> None:
    with fake_device(sock_path) as device:
        summary = await run_guest(small_options(sock_path), 5)
    assert not device.errors
    assert summary["reports"] == 5
    assert summary["entries"] == 80
    assert summary["reported_bytes"] == 80 * 2 * MiB
    assert summary["freed_bytes"] == 80 * 2 * MiB
    assert summary["zeroed_bytes"] == 80 * 2 * MiB
    assert summary["integrity_ok"] is True
    assert summary["config_change_msgs"] == 1
    assert summary["indirect"] is True and summary["event_idx"] is True
    assert set(summary["features"]["names"]) == {
        "VERSION_1",
        "REPORTING",
        "INDIRECT_DESC",
        "EVENT_IDX",
    }
    assert device.reports == [16] * 5
    assert set(summary["hold_us"]) == {"p50", "p90", "p99", "max"}
    json.dumps(summary)


async def test_message_order_matches_qemu(sock_path: str) -> None:
    with fake_device(sock_path) as device:
        await run_guest(small_options(sock_path), 1)
    init = [
        R.GET_FEATURES,
        R.GET_PROTOCOL_FEATURES,
        R.SET_PROTOCOL_FEATURES,
        R.GET_QUEUE_NUM,
        R.GET_MAX_MEM_SLOTS,
        R.SET_BACKEND_REQ_FD,
        R.SET_OWNER,
        R.GET_FEATURES,
    ]
    init += [R.SET_VRING_CALL, R.SET_VRING_ERR] * 3
    start = [R.SET_FEATURES, R.ADD_MEM_REG]
    start += [
        R.SET_VRING_NUM,
        R.SET_VRING_BASE,
        R.SET_VRING_ADDR,
        R.SET_VRING_KICK,
        R.SET_VRING_CALL,
    ] * 3
    start += [R.SET_VRING_ENABLE] * 3 + [R.GET_CONFIG]
    stop = [R.SET_VRING_ENABLE] * 3 + [R.GET_VRING_BASE] * 3
    assert device.requests == init + start + stop
    assert device.features == OFFERED & ~feature_mask(BALLOON_F_PAGE_POISON)


async def test_two_regions_without_mem_slots_or_reply_ack(sock_path: str) -> None:
    options = small_options(
        sock_path,
        regions=2,
        memory=128 * MiB,
        configure_mem_slots=False,
        reply_ack=False,
        indirect=False,
        event_idx=False,
    )
    with fake_device(sock_path) as device:
        async with MockGuest(options) as guest:
            result = await guest.run(6)
            summary = guest.summary(result)
            table = guest.ram.table
            assert len(table) == 2
            assert table.regions[1].mmap_offset == 64 * MiB
            assert table.regions[1].guest_phys_addr > 64 * MiB
    assert R.SET_MEM_TABLE in device.requests and R.ADD_MEM_REG not in device.requests
    assert summary["freed_bytes"] == 6 * 16 * 2 * MiB
    assert summary["integrity_ok"] is True
    assert summary["indirect"] is False and summary["event_idx"] is False


async def test_discard_none_frees_nothing_and_data_stays(sock_path: str) -> None:
    with fake_device(sock_path, discard="none"):
        summary = await run_guest(small_options(sock_path), 3)
    assert summary["freed_bytes"] == 0
    assert summary["zeroed_bytes"] == 0
    assert summary["integrity_ok"] is True


async def test_wrong_file_offset_is_caught_by_integrity_checks(sock_path: str) -> None:
    # The 2025 QEMU bug: discarding region 1 at gpa-relative offsets punches
    # holes in region 0's live memory (rings and the integrity region).
    options = small_options(sock_path, regions=2, memory=128 * MiB, entries=4, report_timeout=1.0)
    with fake_device(sock_path, discard="wrong-offset"):
        async with MockGuest(options) as guest:
            with contextlib.suppress(Exception):  # broken rings may stall the device
                await guest.run(8)
            guest.driver.verify_integrity_region()
            assert guest.driver.corrupted_pages


async def test_page_poison_writes_config_and_stop_returns_bases(sock_path: str) -> None:
    options = small_options(sock_path, page_poison=True)
    with fake_device(sock_path) as device:
        async with MockGuest(options) as guest:
            await guest.run(5)
            assert "PAGE_POISON" in guest.summary(await guest.run(0))["features"]["names"]
        assert guest.stopped_bases == [0, 0, 5]
    assert R.SET_CONFIG in device.requests
    assert device.config.poison_val == 0


async def test_backend_without_protocol_features(sock_path: str) -> None:
    offered = OFFERED & ~(1 << 30)
    with fake_device(sock_path, offered=offered) as device:
        async with MockGuest(small_options(sock_path)) as guest:
            await guest.run(2)
            assert guest.frontend.config is None
    assert R.GET_PROTOCOL_FEATURES not in device.requests
    assert R.SET_VRING_ENABLE not in device.requests
    assert R.SET_MEM_TABLE in device.requests
    assert device.features >> 30 & 1 == 0


async def test_backend_closing_gives_clear_error(sock_path: str) -> None:
    with fake_device(sock_path, close_after=2):
        frontend = VhostUserFrontend(sock_path, FrontendOptions(reply_timeout=2.0))
        async with frontend:
            await frontend.connect()
            with pytest.raises(BackendClosedError, match="closed"):
                await frontend.init()


async def test_backend_hanging_up_during_a_report_is_noticed(sock_path: str) -> None:
    options = small_options(sock_path, report_timeout=30.0)
    with fake_device(sock_path, close_on_kick=True):
        guest = MockGuest(options)
        await guest.start()
        try:
            with pytest.raises(BackendClosedError, match="closed"):
                await asyncio.wait_for(guest.report(), 5.0)
        finally:
            await guest.close()


async def test_silent_backend_times_out(sock_path: str) -> None:
    with fake_device(sock_path, silent_on=R.GET_PROTOCOL_FEATURES):
        frontend = VhostUserFrontend(sock_path, FrontendOptions(reply_timeout=0.3))
        async with frontend:
            await frontend.connect()
            with pytest.raises(ReplyTimeoutError):
                await frontend.init()


async def test_nack_is_reported(sock_path: str) -> None:
    with fake_device(sock_path, nack_on=R.SET_OWNER):
        frontend = VhostUserFrontend(sock_path, FrontendOptions(reply_timeout=2.0))
        async with frontend:
            await frontend.connect()
            with pytest.raises(NackError, match="SET_OWNER"):
                await frontend.init()


async def test_raw_malformed_message_then_backend_reacts(sock_path: str) -> None:
    with fake_device(sock_path) as device:
        frontend = VhostUserFrontend(sock_path, FrontendOptions(reply_timeout=2.0))
        async with frontend:
            await frontend.connect()
            await frontend.send_raw(HEADER.pack(R.GET_FEATURES, 0x1, 0))
            frame, fds = await frontend.recv_raw()
            assert fds == [] and len(frame) == HEADER_SIZE + 8
            await frontend.send_raw(HEADER.pack(999, 0x1, 0))  # unknown request
            assert await frontend.wait_closed(2.0)
    assert device.errors  # the fake's decoder refused it


def test_cli_unreachable_socket_is_one_sentence(
    sock_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(
        [
            "--socket-path",
            sock_path,
            "--memory",
            "128M",
            "--reports",
            "1",
            "--connect-timeout",
            "0.1",
        ]
    )
    err = capsys.readouterr().err
    assert status != 0
    assert err.count("\n") == 1 and "cannot connect" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--memory", "1X"],
        ["--capacity", "8"],
        ["--reports", "0"],
        ["--queue-size", "16"],
        ["--regions", "9"],
    ],
)
def test_cli_bad_arguments_are_one_sentence(
    sock_path: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    status = cli.main(["--socket-path", sock_path, "--connect-timeout", "0", *argv])
    err = capsys.readouterr().err
    assert status != 0
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_json_run(sock_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with fake_device(sock_path):
        status = cli.main(
            [
                "--socket-path",
                sock_path,
                "--memory",
                "64M",
                "--reports",
                "2",
                "--capacity",
                "16",
                "--json",
                "--discard-label",
                "punch-hole",
            ]
        )
    out = capsys.readouterr().out
    assert status == 0
    summary = json.loads(out)
    assert summary["discard"] == "punch-hole" and summary["reports"] == 2


def test_percentiles_nearest_rank() -> None:
    samples = list(range(1, 101))
    assert percentiles(samples) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert nearest_rank([7.0], 99) == 7.0
    assert percentiles([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


def test_parse_size() -> None:
    assert cli.parse_size("1G") == 1 << 30
    assert cli.parse_size("512m") == 512 * MiB
    assert cli.parse_size("64KiB") == 64 << 10
    assert cli.parse_size("4096") == 4096


def test_guest_ram_regions_share_one_memfd() -> None:
    with GuestRam(64 * MiB, regions=2) as ram:
        first, second = ram.regions
        assert (first.guest_phys_addr, first.size, first.mmap_offset) == (0, 32 * MiB, 0)
        assert second.mmap_offset == 32 * MiB
        assert second.guest_phys_addr == 32 * MiB + (2 << 30)
        assert len({os.fstat(r.fd).st_ino for r in ram.regions} | {os.fstat(ram.fd).st_ino}) == 1
        assert ram.allocated_bytes() == 0
        ram.memory.write(second.guest_phys_addr, b"x" * 4096)
        assert ram.allocated_bytes() == 4096
        # userspace_addr is the real address of this process's mapping
        assert ctypes.string_at(second.userspace_addr, 1) == b"x"
        buffer = bytearray(4096)
        ram.pread_into(second.guest_phys_addr, buffer)
        assert buffer == b"x" * 4096
        assert ram.table.gpa_to_uva(second.guest_phys_addr + 5) == second.userspace_addr + 5
    assert ram.regions == ()


def test_layout_keeps_rings_and_integrity_out_of_reports() -> None:
    with GuestRam(96 * MiB, regions=2) as ram:
        layout = plan_layout(
            ram.table.regions,
            queues=3,
            queue_size=64,
            capacity=32,
            order=9,
            integrity_bytes=4 * MiB,
            min_blocks=32,
        )
    size = layout.block_size
    gpas = [block.gpa for block in layout.blocks]
    assert len(set(gpas)) == len(gpas)
    assert all(gpa % size == 0 for gpa in gpas)
    assert min(gpas) >= layout.integrity_end
    assert all(ring.end <= layout.reserved_end - 4096 for ring in layout.rings)
    assert gpas[:3] == [
        layout.blocks[0].gpa,
        layout.blocks[0].gpa + 2 * size,
        layout.blocks[0].gpa + 4 * size,
    ]


def test_too_little_memory_is_a_config_error() -> None:
    with GuestRam(32 * MiB) as ram, pytest.raises(ConfigError, match="needs at least 32"):
        plan_layout(
            ram.table.regions,
            queues=3,
            queue_size=64,
            capacity=32,
            order=9,
            integrity_bytes=4 * MiB,
            min_blocks=32,
        )
