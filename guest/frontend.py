"""A vhost-user front-end: what QEMU's vhost-user-base does on the socket.

Message order follows QEMU 11.1 (see FACTS.md):

- `init()`: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
  [GET_QUEUE_NUM], [GET_MAX_MEM_SLOTS], [SET_BACKEND_REQ_FD], SET_OWNER,
  GET_FEATURES, then SET_VRING_CALL + SET_VRING_ERR per queue.
- `start()` (the guest sets DRIVER_OK): SET_FEATURES, the memory table
  (SET_MEM_TABLE, or ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS), per
  queue SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK,
  SET_VRING_CALL; SET_VRING_ENABLE(1) per queue (each followed by a
  GET_FEATURES sync point when REPLY_ACK is off, as QEMU >= 8.2 does);
  GET_CONFIG.
- `stop()`: SET_VRING_ENABLE(0) and GET_VRING_BASE per queue.

The front-end owns every eventfd: kick (written by the driver), call (what
the back-end signals; the driver waits on it) and err. With REPLY_ACK, every
set-request after SET_PROTOCOL_FEATURES carries NEED_REPLY and its u64 ack
is checked. `send_raw`, `request` and `recv_raw` let tests send anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from vhost_balloon.guest.channel import Channel
from vhost_balloon.guest.errors import (
    BackendClosedError,
    BadReplyError,
    ConnectError,
    FrontendError,
    NackError,
    ReplyTimeoutError,
)
from vhost_balloon.guest.ram import GuestRam
from vhost_balloon.protocol.errors import MessageError
from vhost_balloon.protocol.vhost_user import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    HEADER,
    MAX_MEM_REGIONS,
    REQUEST_SPECS,
    U64,
    VERSION,
    BackendRequest,
    ConfigPayload,
    FrontendRequest,
    MemoryTable,
    Payload,
    ProtocolFeature,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
    decode_reply,
    encode_frame,
    encode_reply,
    protocol_feature_mask,
)
from vhost_balloon.protocol.virtio import BalloonConfig
from vhost_balloon.protocol.virtqueue import RingLayout

log = logging.getLogger(__name__)

_R = FrontendRequest
_CONNECT_RETRY_S = 0.05
_LIVENESS_POLL_S = 0.25


def _always_replies(request: int) -> bool:
    try:
        return REQUEST_SPECS[FrontendRequest(request)].always_replies
    except (ValueError, KeyError):
        return False


def _request_name(request: int) -> str:
    try:
        return FrontendRequest(request).name
    except ValueError:
        return f"request {request}"


@dataclass(frozen=True, slots=True)
class FrontendOptions:
    """Which protocol features this front-end supports, and its timeouts."""

    num_queues: int = 3
    reply_ack: bool = True
    config: bool = True
    mq: bool = True
    configure_mem_slots: bool = True
    backend_req: bool = True
    reply_timeout: float = 5.0
    config_size: int = BalloonConfig.SIZE

    @property
    def protocol_features(self) -> int:
        wanted = (
            (ProtocolFeature.REPLY_ACK, self.reply_ack),
            (ProtocolFeature.CONFIG, self.config),
            (ProtocolFeature.MQ, self.mq),
            (ProtocolFeature.CONFIGURE_MEM_SLOTS, self.configure_mem_slots),
            (ProtocolFeature.BACKEND_REQ, self.backend_req),
        )
        return protocol_feature_mask(*(feature for feature, on in wanted if on))


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class VhostUserFrontend:
    """One connection to a vhost-user back-end, driven like QEMU drives it."""

    def __init__(self, socket_path: str, options: FrontendOptions | None = None) -> None:
        self.socket_path = socket_path
        self.options = options or FrontendOptions()
        if not 1 <= self.options.num_queues <= 0xFF:
            raise ValueError(f"num_queues {self.options.num_queues} outside 1..255")
        self._channel: Channel | None = None
        self._lock = asyncio.Lock()
        # What the back-end offered and what was negotiated.
        self.raw_device_features = 0  # first GET_FEATURES reply, bit 30 included
        self.device_features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None
        self.acked_features: int | None = None
        self.config: BalloonConfig | None = None
        # Every request sent, in order (tests assert on the sequence).
        self.sent_requests: list[int] = []
        # eventfds, owned here
        self._masked_call_fds: list[int] = []
        self._err_fds: list[int] = []
        self._kick_fds: list[int] = []
        self._call_fds: list[int] = []
        # the backend channel (BACKEND_REQ)
        self._backend_channel: Channel | None = None
        self._backend_task: asyncio.Task[None] | None = None
        self.config_change_msgs = 0
        self.config_changed = asyncio.Event()
        self.backend_requests_refused = 0
        self.backend_channel_error: str | None = None
        self.started = False

    # -- connection -----------------------------------------------------------

    async def connect(self, timeout: float = 5.0) -> None:
        """Connect to the socket, retrying while it is absent or refusing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                # A unix connect succeeds or fails at once; the timeout only
                # guards against a listener whose backlog stays full.
                await asyncio.wait_for(
                    loop.sock_connect(sock, self.socket_path),
                    max(deadline - loop.time(), 1.0),
                )
                # A unix connect into a full backlog is EAGAIN, which asyncio
                # waits out as if it were in progress: the socket may come
                # back writable but not connected. Then it is tried again.
                sock.getpeername()
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as error:
                sock.close()
                if loop.time() + _CONNECT_RETRY_S >= deadline:
                    raise ConnectError(
                        f"cannot connect to the vhost-user socket {self.socket_path}: "
                        f"{error.strerror or error}"
                    ) from None
                await asyncio.sleep(_CONNECT_RETRY_S)
                continue
            except TimeoutError:
                sock.close()
                raise ConnectError(
                    f"connecting to the vhost-user socket {self.socket_path} timed out"
                ) from None
            except OSError as error:
                sock.close()
                if error.errno == errno.ENOTCONN and loop.time() + _CONNECT_RETRY_S < deadline:
                    await asyncio.sleep(_CONNECT_RETRY_S)  # the backlog was full: try again
                    continue
                raise ConnectError(
                    f"cannot connect to the vhost-user socket {self.socket_path}: "
                    f"{error.strerror or error}"
                ) from None
            self._channel = Channel(sock, "vhost-user socket")
            return

    @property
    def channel(self) -> Channel:
        if self._channel is None or self._channel.closed:
            raise FrontendError("the front-end is not connected")
        return self._channel

    # -- low-level helpers (also for tests) -------------------------------------

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    @property
    def reply_ack(self) -> bool:
        return self.has_protocol_feature(ProtocolFeature.REPLY_ACK)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (malformed messages included)."""
        if len(data) >= 4:
            self.sent_requests.append(int.from_bytes(data[:4], "little"))
        await self.channel.send(data, fds, timeout=self.options.reply_timeout)

    async def recv_raw(self, timeout: float | None = None) -> tuple[bytes, list[int]]:
        """One whole frame from the back-end and the fds that came with it."""
        return await self.channel.recv_frame(
            timeout=self.options.reply_timeout if timeout is None else timeout,
            waiting_for="a message",
        )

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Whether the back-end closes the connection within `timeout`."""
        return await self.channel.wait_eof(
            self.options.reply_timeout if timeout is None else timeout
        )

    async def request(
        self,
        request: int,
        payload: Payload | bytes = b"",
        *,
        fds: Sequence[int] = (),
        need_reply: bool | None = None,
        expect_reply: bool | None = None,
    ) -> bytes | None:
        """Send one request; return the reply payload when one is expected.

        need_reply defaults to "REPLY_ACK negotiated and the request is not a
        GET"; expect_reply to "a GET, or NEED_REPLY set". A reply is
        validated as QEMU does (flags exactly 0x5, same request number).
        """
        body = payload if isinstance(payload, bytes) else payload.encode()
        always = _always_replies(request)
        if need_reply is None:
            need_reply = self.reply_ack and not always
        if expect_reply is None:
            expect_reply = always or need_reply
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        async with self._lock:
            self.sent_requests.append(request)
            await self.channel.send(
                encode_frame(request, body, flags=flags), fds, timeout=self.options.reply_timeout
            )
            if not expect_reply:
                return None
            return await self._read_reply(request)

    async def _read_reply(self, request: int) -> bytes:
        name = _request_name(request)
        frame, fds = await self.channel.recv_frame(
            timeout=self.options.reply_timeout, waiting_for=f"the reply to {name}"
        )
        for fd in fds:
            os.close(fd)
        if fds:
            raise BadReplyError(f"the reply to {name} carried {len(fds)} unexpected fd(s)")
        try:
            _header, body = decode_reply(request, frame)
        except MessageError as error:
            raise BadReplyError(f"bad reply to {name}: {error}") from None
        return body

    async def set_request(
        self, request: FrontendRequest, payload: Payload | bytes = b"", fds: Sequence[int] = ()
    ) -> None:
        """A set-request; with REPLY_ACK its ack must be 0."""
        reply = await self.request(request, payload, fds=fds)
        if reply is None:
            return
        status = self._u64(request, reply)
        if status != 0:
            raise NackError(request.name, status)

    async def get_u64(self, request: FrontendRequest) -> int:
        reply = await self.request(request, expect_reply=True, need_reply=False)
        assert reply is not None
        return self._u64(request, reply)

    @staticmethod
    def _u64(request: FrontendRequest, body: bytes) -> int:
        if len(body) != U64.FORMAT.size:
            raise BadReplyError(f"the reply to {request.name} has {len(body)} bytes, expected 8")
        return U64.decode(body).value

    # -- init -------------------------------------------------------------------

    async def init(self) -> int:
        """The connect-time sequence; returns the device features (minus bit 30)."""
        self.raw_device_features = await self.get_u64(_R.GET_FEATURES)
        if self.protocol_features_offered:
            self.offered_protocol_features = await self.get_u64(_R.GET_PROTOCOL_FEATURES)
            wanted = self.offered_protocol_features & self.options.protocol_features
            # Sent before REPLY_ACK is in force, like QEMU (no NEED_REPLY).
            await self.request(_R.SET_PROTOCOL_FEATURES, U64(wanted), need_reply=False)
            self.protocol_features = wanted
            await self._negotiate_limits()
            if self.has_protocol_feature(ProtocolFeature.BACKEND_REQ):
                await self._setup_backend_channel()
        await self.set_request(_R.SET_OWNER)
        features = await self.get_u64(_R.GET_FEATURES)
        self.device_features = features & ~(1 << F_PROTOCOL_FEATURES)
        for index in range(self.options.num_queues):
            call_fd = _eventfd()
            self._masked_call_fds.append(call_fd)
            await self.set_request(_R.SET_VRING_CALL, VringFile(index, False), [call_fd])
            err_fd = _eventfd()
            self._err_fds.append(err_fd)
            await self.set_request(_R.SET_VRING_ERR, VringFile(index, False), [err_fd])
        return self.device_features

    @property
    def protocol_features_offered(self) -> bool:
        return bool(self.raw_device_features >> F_PROTOCOL_FEATURES & 1)

    async def _negotiate_limits(self) -> None:
        if self.has_protocol_feature(ProtocolFeature.MQ):
            self.queue_num = await self.get_u64(_R.GET_QUEUE_NUM)
            if self.queue_num < self.options.num_queues:
                raise FrontendError(
                    f"the back-end supports {self.queue_num} queue(s), "
                    f"the device needs {self.options.num_queues}"
                )
        if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = await self.get_u64(_R.GET_MAX_MEM_SLOTS)

    async def _setup_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            await self.set_request(_R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._backend_channel = Channel(ours, "back-end channel")
        self._backend_task = asyncio.create_task(
            self._serve_backend_channel(self._backend_channel), name="backend-channel"
        )

    async def _serve_backend_channel(self, channel: Channel) -> None:
        """Answer back-end requests; count CONFIG_CHANGE_MSG."""
        while True:
            try:
                frame, fds = await channel.recv_frame(
                    timeout=None, waiting_for="a back-end request"
                )
            except FrontendError as error:
                if not channel.peer_closed:
                    self.backend_channel_error = str(error)
                    log.warning("back-end channel: %s", error)
                return
            for fd in fds:
                os.close(fd)
            request, flags, _size = HEADER.unpack_from(frame)
            if request == BackendRequest.CONFIG_CHANGE_MSG:
                self.config_change_msgs += 1
                self.config_changed.set()
                status = 0
            else:
                self.backend_requests_refused += 1
                status = 1
            if flags & FLAG_NEED_REPLY:
                try:
                    await channel.send(
                        encode_reply(request, U64(status).encode()),
                        timeout=self.options.reply_timeout,
                    )
                except FrontendError as error:
                    self.backend_channel_error = str(error)
                    return

    # -- start / stop -----------------------------------------------------------

    async def start(
        self,
        features: int,
        ram: GuestRam,
        rings: Sequence[RingLayout],
        bases: Sequence[int] | None = None,
    ) -> BalloonConfig | None:
        """DRIVER_OK: features, memory, rings, enable; returns the config (if CONFIG).

        `rings` are guest-physical layouts, one per queue; their addresses
        are sent as this process's virtual addresses.
        """
        count = self.options.num_queues
        if len(rings) != count:
            raise ValueError(f"{len(rings)} ring layouts for {count} queues")
        bases = list(bases) if bases is not None else [0] * count
        with_protocol = self.protocol_features_offered
        self.acked_features = features | (1 << F_PROTOCOL_FEATURES if with_protocol else 0)
        await self.set_request(_R.SET_FEATURES, U64(self.acked_features))
        await self._send_memory(ram)
        self._close_fds(self._kick_fds)
        self._close_fds(self._call_fds)
        for index, layout in enumerate(rings):
            await self.set_request(_R.SET_VRING_NUM, VringState(index, layout.size))
            await self.set_request(_R.SET_VRING_BASE, VringState(index, bases[index]))
            await self.set_request(
                _R.SET_VRING_ADDR,
                VringAddr(
                    index,
                    0,
                    ram.table.gpa_to_uva(layout.desc),
                    ram.table.gpa_to_uva(layout.used),
                    ram.table.gpa_to_uva(layout.avail),
                    0,
                ),
            )
            kick_fd = _eventfd()
            self._kick_fds.append(kick_fd)
            await self.set_request(_R.SET_VRING_KICK, VringFile(index, False), [kick_fd])
            call_fd = _eventfd()
            self._call_fds.append(call_fd)
            await self.set_request(_R.SET_VRING_CALL, VringFile(index, False), [call_fd])
        if with_protocol:
            for index in range(count):
                await self._set_vring_enable(index, 1)
        elif not self.reply_ack:
            # Nothing above waited for the back-end. A real guest resumes well
            # after DRIVER_OK; this driver kicks at once, so wait until the
            # back-end has processed the start sequence before returning.
            await self.get_u64(_R.GET_FEATURES)
        self.started = True
        if self.has_protocol_feature(ProtocolFeature.CONFIG):
            self.config = BalloonConfig.decode(
                (await self.get_config(0, self.options.config_size)).ljust(
                    BalloonConfig.SIZE, b"\0"
                )[: BalloonConfig.SIZE]
            )
        return self.config

    async def _set_vring_enable(self, index: int, enable: int) -> None:
        """SET_VRING_ENABLE is synchronous in QEMU >= 8.2: an ack, else a GET_FEATURES."""
        await self.set_request(_R.SET_VRING_ENABLE, VringState(index, enable))
        if not self.reply_ack:
            await self.get_u64(_R.GET_FEATURES)

    async def _send_memory(self, ram: GuestRam) -> None:
        regions, fds = ram.descs(), ram.region_fds()
        if self.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            if self.max_mem_slots is not None and len(regions) > self.max_mem_slots:
                raise FrontendError(
                    f"the back-end accepts {self.max_mem_slots} memory slot(s), "
                    f"guest RAM has {len(regions)} regions"
                )
            for region, fd in zip(regions, fds, strict=True):
                await self.set_request(_R.ADD_MEM_REG, SingleMemoryRegion(region), [fd])
            return
        if len(regions) > MAX_MEM_REGIONS:
            raise FrontendError(f"{len(regions)} regions exceed SET_MEM_TABLE's {MAX_MEM_REGIONS}")
        await self.set_request(_R.SET_MEM_TABLE, MemoryTable(tuple(regions)), fds)

    async def get_config(self, offset: int = 0, size: int = BalloonConfig.SIZE) -> bytes:
        """GET_CONFIG: the back-end's config bytes [offset, offset+size)."""
        if not self.has_protocol_feature(ProtocolFeature.CONFIG):
            raise FrontendError("the back-end did not negotiate the CONFIG protocol feature")
        reply = await self.request(
            _R.GET_CONFIG,
            ConfigPayload(offset, size, 0, bytes(size)),
            need_reply=False,
            expect_reply=True,
        )
        assert reply is not None
        try:
            config = ConfigPayload.decode(reply)
        except MessageError as error:
            raise BadReplyError(f"bad GET_CONFIG reply: {error}") from None
        if config.size != size or config.offset != offset:
            raise BadReplyError(
                f"GET_CONFIG reply covers {config.offset}+{config.size}, asked {offset}+{size}"
            )
        return config.data

    async def set_config(self, data: bytes, offset: int = 0) -> None:
        """SET_CONFIG of `data` at `offset` (QEMU writes the whole buffer)."""
        if not self.has_protocol_feature(ProtocolFeature.CONFIG):
            raise FrontendError("the back-end did not negotiate the CONFIG protocol feature")
        await self.set_request(_R.SET_CONFIG, ConfigPayload(offset, len(data), 0, data))

    async def stop(self) -> list[int]:
        """Disable the rings and read back each queue's next avail index."""
        count = self.options.num_queues
        if self.protocol_features_offered:
            for index in range(count):
                await self._set_vring_enable(index, 0)
        bases: list[int] = []
        for index in range(count):
            reply = await self.request(
                _R.GET_VRING_BASE, VringState(index, 0), need_reply=False, expect_reply=True
            )
            assert reply is not None
            if len(reply) != VringState.FORMAT.size:
                raise BadReplyError(f"GET_VRING_BASE reply has {len(reply)} bytes, expected 8")
            state = VringState.decode(reply)
            if state.index != index:
                raise BadReplyError(f"GET_VRING_BASE reply for queue {state.index}, asked {index}")
            bases.append(state.num)
        self.started = False
        return bases

    # -- notifications ------------------------------------------------------------

    def kick(self, index: int) -> None:
        """The driver's notify: write the queue's kick eventfd."""
        os.eventfd_write(self._kick_fds[index], 1)

    def call_fd(self, index: int) -> int:
        return self._call_fds[index]

    def kick_fd(self, index: int) -> int:
        return self._kick_fds[index]

    async def wait_call(self, index: int, timeout: float) -> int:
        """Wait until the back-end signals the queue's call eventfd; returns the count.

        Raises ReplyTimeoutError after `timeout`, and BackendClosedError soon
        after the back-end closes the socket (checked every quarter second).
        """
        fd = self._call_fds[index]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(BlockingIOError):
                return os.eventfd_read(fd)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ReplyTimeoutError(
                    f"the back-end did not signal queue {index}'s call eventfd in {timeout:g} s"
                )
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _wake, ready)
            try:
                await asyncio.wait_for(ready, min(remaining, _LIVENESS_POLL_S))
            except TimeoutError:
                self._check_connection(f"queue {index}'s call eventfd")
            finally:
                loop.remove_reader(fd)

    def _check_connection(self, waiting_for: str) -> None:
        """Raise BackendClosedError if the back-end has closed the socket."""
        if self._lock.locked():
            return  # a request in progress reads the socket and will notice
        channel = self.channel
        if channel.peer_closed or channel.peek_eof():
            raise BackendClosedError(
                f"the back-end closed the vhost-user socket while the guest was waiting "
                f"for {waiting_for}"
            )

    def err_count(self, index: int) -> int:
        """How many times the back-end signalled the queue's err eventfd (resets it)."""
        try:
            return os.eventfd_read(self._err_fds[index])
        except BlockingIOError:
            return 0

    # -- teardown -----------------------------------------------------------------

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        fds.clear()

    async def close(self) -> None:
        """Close the socket, the back-end channel and every eventfd (idempotent)."""
        if self._backend_task is not None:
            self._backend_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backend_task
            self._backend_task = None
        if self._backend_channel is not None:
            self._backend_channel.close()
            self._backend_channel = None
        if self._channel is not None:
            self._channel.close()
        for fds in (self._masked_call_fds, self._err_fds, self._kick_fds, self._call_fds):
            self._close_fds(fds)

    async def __aenter__(self) -> VhostUserFrontend:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
