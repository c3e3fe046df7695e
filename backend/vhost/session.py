"""One vhost-user session: a connection from one front-end, one device.

The session decodes requests and routes each to a handler typed by its
payload; it keeps the negotiated state, the memory map and the vrings'
configuration. The rings run in its `RingSet` (workers, parsing, breaking),
the back-end's own requests go through its `BackendChannel`. It knows nothing
about reports: those belong to the device behind `VirtioDevice`.

Errors, by who caused them:
- a frame that cannot be parsed, or a known request with the wrong payload
  size or fd count: the front-end is sending garbage; the session ends with
  one log line naming the request and the reason;
- a well-formed request the device does not implement, or cannot honour
  (bad index, unmappable region): refused; an error reply where the
  front-end waits for one, else a log line; the session goes on;
- a malformed ring (the guest's doing): that queue is marked broken, the err
  eventfd is signalled, the session goes on serving messages.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from vhost_balloon.backend.vhost.backend_channel import BackendChannel
from vhost_balloon.backend.vhost.device import VirtioDevice
from vhost_balloon.backend.vhost.mapping import MappedRegion, MappingError, MemoryMap
from vhost_balloon.backend.vhost.rings import RingSet, forget_queue
from vhost_balloon.backend.vhost.transport import ConnectionClosed, MessageChannel, close_fds
from vhost_balloon.backend.vhost.vring import EventFdError, Vring, check_eventfd
from vhost_balloon.protocol.errors import AddressError, MessageError
from vhost_balloon.protocol.vhost_user import (
    F_PROTOCOL_FEATURES,
    U64,
    ConfigPayload,
    Empty,
    FrontendRequest,
    Header,
    MemoryTable,
    Payload,
    ProtocolFeature,
    RawPayload,
    Request,
    SingleMemoryRegion,
    VringAddr,
    VringFile,
    VringState,
    decode_request,
    encode_reply,
    protocol_feature_mask,
)
from vhost_balloon.protocol.virtqueue import MAX_QUEUE_SIZE

# Only what this backend implements: QEMU 11.1 sends newer requests (and
# waits for replies) when more bits are offered.
PROTOCOL_FEATURES = protocol_feature_mask(
    ProtocolFeature.MQ,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.CONFIG,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
)
MAX_MEM_SLOTS = 32
_ERROR = U64(1).encode()
_OK = U64(0).encode()


class SessionState(enum.Enum):
    NEGOTIATING = "negotiating"  # connected, features being exchanged
    CONFIGURED = "configured"  # owner set, no ring running
    RUNNING = "running"  # at least one ring started
    BROKEN = "broken"  # a ring was malformed: the device needs a reset
    CLOSED = "closed"


class RequestRefused(Exception):
    """A well-formed request that cannot be honoured; the session goes on."""

    def __init__(self, reason: str, reply: bytes = _ERROR) -> None:
        super().__init__(reason)
        self.reply = reply  # error-form reply payload, sent if the front-end waits


class SessionLogger(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '?'}] {msg}", kwargs


P = TypeVar("P", bound=Payload)


class _Route(Generic[P]):
    """One request's handler and the payload type its RequestSpec decodes to:
    the one place a decoded payload is checked against its handler."""

    __slots__ = ("handle", "payload")

    def __init__(
        self, payload: type[P], handle: Callable[[P, list[int]], Awaitable[bytes | None]]
    ) -> None:
        self.payload = payload
        self.handle = handle

    async def __call__(self, request: Request, fds: list[int]) -> bytes | None:
        payload = request.payload
        if not isinstance(payload, self.payload):  # a spec and its route disagree: a bug
            raise RequestRefused(f"payload decoded as {type(payload).__name__}")
        return await self.handle(payload, fds)


class Session:
    def __init__(
        self,
        name: str,
        sock: socket.socket,
        device: VirtioDevice,
        log: SessionLogger,
        *,
        allow_unsealed_memory: bool = False,
    ) -> None:
        self.name = name
        self.allow_unsealed_memory = allow_unsealed_memory
        self.device = device
        self.log = log
        self.state = SessionState.NEGOTIATING
        self.channel = MessageChannel(sock)
        self.memory_map = MemoryMap()
        self.rings = RingSet(
            name,
            device,
            log,
            memory_map=lambda: self.memory_map,
            acked_features=lambda: self.acked_features,
            on_broken=lambda: self._set_state(SessionState.BROKEN),
            on_memory_lost=self.lost_memory,
        )
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.backend_channel = BackendChannel()
        self.end_reason = ""
        self._memory_lost: str | None = None
        # Each request's handler, typed by the payload its spec decodes to.
        self.routes: dict[FrontendRequest, _Route[Any]] = {
            FrontendRequest.GET_FEATURES: _Route(Empty, self._get_features),
            FrontendRequest.SET_FEATURES: _Route(U64, self._set_features),
            FrontendRequest.SET_OWNER: _Route(Empty, self._set_owner),
            FrontendRequest.RESET_OWNER: _Route(RawPayload, self._reset),
            FrontendRequest.RESET_DEVICE: _Route(Empty, self._reset),
            FrontendRequest.GET_PROTOCOL_FEATURES: _Route(Empty, self._get_protocol_features),
            FrontendRequest.SET_PROTOCOL_FEATURES: _Route(U64, self._set_protocol_features),
            FrontendRequest.GET_QUEUE_NUM: _Route(Empty, self._get_queue_num),
            FrontendRequest.GET_MAX_MEM_SLOTS: _Route(Empty, self._get_max_mem_slots),
            FrontendRequest.SET_MEM_TABLE: _Route(MemoryTable, self._set_mem_table),
            FrontendRequest.ADD_MEM_REG: _Route(SingleMemoryRegion, self._add_mem_reg),
            FrontendRequest.REM_MEM_REG: _Route(SingleMemoryRegion, self._rem_mem_reg),
            FrontendRequest.SET_VRING_NUM: _Route(VringState, self._set_vring_num),
            FrontendRequest.SET_VRING_ADDR: _Route(VringAddr, self._set_vring_addr),
            FrontendRequest.SET_VRING_BASE: _Route(VringState, self._set_vring_base),
            FrontendRequest.GET_VRING_BASE: _Route(VringState, self._get_vring_base),
            FrontendRequest.SET_VRING_KICK: _Route(VringFile, self._set_vring_kick),
            FrontendRequest.SET_VRING_CALL: _Route(VringFile, self._set_vring_call),
            FrontendRequest.SET_VRING_ERR: _Route(VringFile, self._set_vring_err),
            FrontendRequest.SET_VRING_ENABLE: _Route(VringState, self._set_vring_enable),
            FrontendRequest.GET_CONFIG: _Route(ConfigPayload, self._get_config),
            FrontendRequest.SET_CONFIG: _Route(ConfigPayload, self._set_config),
            FrontendRequest.SET_BACKEND_REQ_FD: _Route(RawPayload, self._set_backend_req_fd),
        }
        device.attach(self)

    # -- main loop ---------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                header, payload, fds = await self.channel.receive()
                await self._dispatch(header.request, header.need_reply, header, payload, fds)
        except ConnectionClosed as closed:
            if self._memory_lost is not None:
                self.end_reason = self._memory_lost
            else:
                self.end_reason = str(closed)
                self.log.info("front-end disconnected: %s", closed)
        except MessageError as error:
            self.end_reason = str(error)
            self.log.error("ending session: %s", error)
        except OSError as error:
            self.end_reason = f"socket error: {error}"
            self.log.error("ending session: socket error: %s", error)
        finally:
            await self.close()

    async def _dispatch(
        self, raw_request: int, need_reply: bool, header: Header, payload: bytes, fds: list[int]
    ) -> None:
        try:
            try:
                request = decode_request(header, payload, len(fds))
            except MessageError:
                if raw_request in FrontendRequest._value2member_map_ or header.is_reply:
                    raise
                # An id this protocol version does not know: framed correctly,
                # so refuse it and carry on.
                self.log.warning(
                    "refused unknown request %d (%d payload bytes)", raw_request, len(payload)
                )
                if need_reply:
                    await self.channel.send(encode_reply(raw_request, _ERROR))
                return
            handler = self.routes.get(request.request)
            try:
                if handler is None:
                    raise RequestRefused(f"{request.request.name} is not implemented")
                reply = await handler(request, fds)
            except RequestRefused as refused:
                self.log.warning("refused %s: %s", request.request.name, refused)
                if request.expects_reply:
                    await self.channel.send(encode_reply(request.request, refused.reply))
                return
            if reply is not None:
                await self.channel.send(encode_reply(request.request, reply))
            elif request.header.need_reply:
                await self.channel.send(encode_reply(request.request, _OK))
        finally:
            close_fds(fds)  # handlers pop the fds they keep

    # -- negotiation --------------------------------------------------------

    async def _get_features(self, payload: Empty, fds: list[int]) -> bytes:
        return U64(self.device.offered_features() | 1 << F_PROTOCOL_FEATURES).encode()

    async def _set_features(self, payload: U64, fds: list[int]) -> None:
        features = payload.value
        offered = self.device.offered_features() | 1 << F_PROTOCOL_FEATURES
        if features & ~offered:
            raise RequestRefused(f"features {features & ~offered:#x} were never offered")
        self.acked_features = features
        self.device.set_features(features & ~(1 << F_PROTOCOL_FEATURES))

    async def _set_owner(self, payload: Empty, fds: list[int]) -> None:
        if self.state is SessionState.NEGOTIATING:
            self._set_state(SessionState.CONFIGURED)

    async def _reset(self, payload: Empty | RawPayload, fds: list[int]) -> None:
        await self.rings.reset()
        self.device.reset()
        self.acked_features = 0
        self._set_state(SessionState.CONFIGURED)

    async def _get_protocol_features(self, payload: Empty, fds: list[int]) -> bytes:
        return U64(PROTOCOL_FEATURES).encode()

    async def _set_protocol_features(self, payload: U64, fds: list[int]) -> None:
        features = payload.value
        if features & ~PROTOCOL_FEATURES:
            raise RequestRefused(
                f"protocol features {features & ~PROTOCOL_FEATURES:#x} were never offered"
            )
        self.acked_protocol_features = features

    async def _get_queue_num(self, payload: Empty, fds: list[int]) -> bytes:
        return U64(self.device.max_queues).encode()

    async def _get_max_mem_slots(self, payload: Empty, fds: list[int]) -> bytes:
        return U64(MAX_MEM_SLOTS).encode()

    def _protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.acked_protocol_features >> feature & 1)

    # -- memory ---------------------------------------------------------------

    async def _set_mem_table(self, payload: MemoryTable, fds: list[int]) -> None:
        new_regions: list[MappedRegion] = []
        try:
            for desc in payload.regions:
                new_regions.append(
                    MappedRegion(desc, fds.pop(0), allow_unsealed=self.allow_unsealed_memory)
                )
            replacement = MemoryMap(new_regions)
            _ = replacement.memory  # validates overlaps
        except (MappingError, AddressError) as error:
            for region in new_regions:
                region.close()
            raise RequestRefused(f"memory table rejected: {error}") from None
        with self.rings.paused():
            await self.rings.quiesce()
            old, self.memory_map = self.memory_map, replacement
            self.rings.invalidate()
            old.close()
        self._log_regions()

    async def _add_mem_reg(self, payload: SingleMemoryRegion, fds: list[int]) -> None:
        if len(self.memory_map) >= MAX_MEM_SLOTS:
            raise RequestRefused(f"all {MAX_MEM_SLOTS} memory slots are in use")
        try:
            region = MappedRegion(
                payload.region, fds.pop(0), allow_unsealed=self.allow_unsealed_memory
            )
        except (MappingError, AddressError) as error:
            raise RequestRefused(f"region rejected: {error}") from None
        with self.rings.paused():
            await self.rings.quiesce()
            try:
                self.memory_map.add(region)
            except AddressError as error:
                region.close()
                raise RequestRefused(f"region rejected: {error}") from None
            self.rings.invalidate()
        self._log_regions()

    async def _rem_mem_reg(self, payload: SingleMemoryRegion, fds: list[int]) -> None:
        with self.rings.paused():
            await self.rings.quiesce()
            removed = self.memory_map.remove(payload.region)
            if removed is None:
                raise RequestRefused(f"no region at gpa {payload.region.guest_phys_addr:#x}")
            self.rings.invalidate()
            removed.close()

    def _log_regions(self) -> None:
        for mapped in self.memory_map.regions:
            r = mapped.region
            self.log.info(
                "region gpa %#x size %#x uva %#x file offset %#x granularity %d%s",
                r.guest_phys_addr,
                r.size,
                r.userspace_addr,
                r.mmap_offset,
                mapped.granularity,
                ""
                if mapped.sealed_against_shrink
                else " (NOT sealed against shrinking: a truncation would crash the backend)",
            )

    # -- vrings ---------------------------------------------------------------

    def _vring(self, index: int) -> Vring:
        vrings = self.rings.vrings
        if not 0 <= index < len(vrings):
            raise RequestRefused(f"queue index {index}, the device has {len(vrings)} queues")
        return vrings[index]

    async def _set_vring_num(self, payload: VringState, fds: list[int]) -> None:
        vring = self._vring(payload.index)
        num = payload.num
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RequestRefused(f"queue size {num} is not a power of two <= {MAX_QUEUE_SIZE}")
        vring.num = num

    async def _set_vring_addr(self, payload: VringAddr, fds: list[int]) -> None:
        vring = self._vring(payload.index)
        vring.addr = payload

    async def _set_vring_base(self, payload: VringState, fds: list[int]) -> None:
        vring = self._vring(payload.index)
        if vring.started:
            raise RequestRefused(f"queue {vring.index} is running")
        vring.base = payload.num & 0xFFFF

    async def _get_vring_base(self, payload: VringState, fds: list[int]) -> bytes:
        index = payload.index
        if not 0 <= index < len(self.rings.vrings):
            raise RequestRefused(
                f"queue index {index} out of range", reply=VringState(index, 0).encode()
            )
        vring = self.rings.vrings[index]
        self.rings.stop(vring)
        await self.rings.wait_idle(vring)
        forget_queue(vring)
        vring.replace_fd("kick", None)
        vring.broken = False
        if not self.rings.any_started and self.state is SessionState.RUNNING:
            self._set_state(SessionState.CONFIGURED)
        return VringState(index, vring.base).encode()

    def _take_eventfd(self, payload: VringFile, fds: list[int]) -> tuple[Vring, int | None]:
        vring = self._vring(payload.index)
        if payload.no_fd:
            return vring, None
        try:
            check_eventfd(fds[0])
        except EventFdError as error:
            raise RequestRefused(str(error)) from None
        fd = fds.pop(0)
        os.set_blocking(fd, False)  # a blocking read or write would stall every session
        return vring, fd

    async def _set_vring_kick(self, payload: VringFile, fds: list[int]) -> None:
        vring, fd = self._take_eventfd(payload, fds)
        self.rings.stop(vring)
        await self.rings.wait_idle(vring)  # a batch still running must finish first
        vring.replace_fd("kick", fd)
        if fd is None:
            raise RequestRefused("polling mode (no kick fd) is not supported")
        # Without protocol features a ring is enabled as soon as it starts.
        if not self.acked_features >> F_PROTOCOL_FEATURES & 1:
            vring.enabled = True
        self._set_state(SessionState.RUNNING)
        self.rings.start(vring, fd)

    async def _set_vring_call(self, payload: VringFile, fds: list[int]) -> None:
        vring, fd = self._take_eventfd(payload, fds)
        vring.replace_fd("call", fd)

    async def _set_vring_err(self, payload: VringFile, fds: list[int]) -> None:
        vring, fd = self._take_eventfd(payload, fds)
        vring.replace_fd("err", fd)

    async def _set_vring_enable(self, payload: VringState, fds: list[int]) -> None:
        vring = self._vring(payload.index)
        if payload.num not in (0, 1):
            raise RequestRefused(f"enable value {payload.num}")
        vring.enabled = payload.num == 1
        if vring.enabled:
            self.rings.schedule(vring, time.monotonic_ns())

    # -- config ---------------------------------------------------------------

    async def _get_config(self, payload: ConfigPayload, fds: list[int]) -> bytes:
        config = payload
        try:
            data = self.device.read_config(config.offset, config.size)
        except ValueError as error:
            raise RequestRefused(
                str(error), reply=ConfigPayload(config.offset, 0, config.flags, b"").encode()
            ) from None
        return ConfigPayload(config.offset, config.size, config.flags, data).encode()

    async def _set_config(self, payload: ConfigPayload, fds: list[int]) -> None:
        try:
            self.device.write_config(payload.offset, payload.data)
        except ValueError as error:
            raise RequestRefused(str(error)) from None

    async def _set_backend_req_fd(self, payload: RawPayload, fds: list[int]) -> None:
        if not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
            raise RequestRefused("backend request fd is not a socket")
        self.backend_channel.replace(socket.socket(fileno=fds.pop(0)))

    @property
    def can_change_config(self) -> bool:
        return self._protocol_feature(ProtocolFeature.CONFIG) and self.backend_channel.connected

    @property
    def guest_ram_bytes(self) -> int:
        """The guest's RAM as the memory table describes it."""
        return sum(mapped.region.size for mapped in self.memory_map.regions)

    async def config_changed(self) -> bool:
        """Tell the driver the config changed (CONFIG_CHANGE_MSG on the backend
        channel): the device's FrontendLink.

        Returns False when the front-end gave no backend channel or refused.
        """
        if not self._protocol_feature(ProtocolFeature.CONFIG):
            return False
        return await self.backend_channel.config_changed(
            need_reply=self._protocol_feature(ProtocolFeature.REPLY_ACK)
        )

    # -- lifecycle ----------------------------------------------------------------

    def lost_memory(self, reason: str) -> None:
        """The guest's memory faulted under us: end this session (only this one)."""
        if self._memory_lost is None:
            self._memory_lost = reason
            self.log.error("ending session: %s", reason)
            self.channel.hang_up()

    def _set_state(self, state: SessionState) -> None:
        if self.state is not state and self.state is not SessionState.CLOSED:
            if self.state is SessionState.BROKEN and state is SessionState.RUNNING:
                return  # stays broken until reset
            self.log.debug("state %s -> %s", self.state.value, state.value)
            self.state = state

    async def close(self) -> None:
        if self.state is SessionState.CLOSED:
            return
        self.rings.pause_for_good()
        await self.rings.close()
        self.memory_map.close()
        self.backend_channel.close()
        self.channel.close()
        self.state = SessionState.CLOSED
