"""vhost-user message codec (sans-I/O).

Frames are a 12-byte header (u32 request, u32 flags, u32 size, native
endian) followed by `size` payload bytes; file descriptors travel beside the
frame as SCM_RIGHTS and are counted here, never touched. Decoding validates
the header and the declared size against what each request carries, and
returns typed payloads; the caller owns sockets and fds.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias

from vhost_balloon.protocol.errors import MessageError
from vhost_balloon.protocol.virtio import feature_mask

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
# Larger than any payload QEMU sends (GET_CONFIG with 256 bytes of config is
# the largest); anything bigger is garbage and is refused before reading it.
MAX_PAYLOAD_SIZE = 4096
MAX_FDS_PER_MESSAGE = 8
MAX_MEM_REGIONS = 8  # SET_MEM_TABLE's fixed region array
# Feature bit 30 gates the protocol-feature negotiation.
F_PROTOCOL_FEATURES = 30
VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF


class FrontendRequest(enum.IntEnum):
    """Requests a front-end (QEMU) sends on the main socket."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the backend channel (SET_BACKEND_REQ_FD)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of vhost-user protocol features."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def protocol_feature_mask(*features: ProtocolFeature) -> int:
    return feature_mask(*features)


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


def _known(request: int) -> int:
    """The FrontendRequest member for a known id (errors then name it), else the id."""
    try:
        return FrontendRequest(request)
    except ValueError:
        return request


def decode_header(data: bytes) -> Header:
    """Validate and decode a 12-byte header (before reading the payload)."""
    if len(data) != HEADER_SIZE:
        raise MessageError(None, f"truncated header: {len(data)} of {HEADER_SIZE} bytes")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise MessageError(
            _known(request), f"unsupported version {flags & VERSION_MASK} in flags {flags:#x}"
        )
    if flags & ~KNOWN_FLAGS:
        raise MessageError(_known(request), f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if size > MAX_PAYLOAD_SIZE:
        raise MessageError(_known(request), f"payload size {size} exceeds {MAX_PAYLOAD_SIZE}")
    return Header(request, flags, size)


def encode_frame(request: int, payload: bytes = b"", *, flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """A back-end reply: QEMU accepts only flags == VERSION | REPLY (0x5)."""
    return encode_frame(request, payload, flags=VERSION | FLAG_REPLY)


# --- payloads ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class U64:
    value: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=Q")

    @classmethod
    def decode(cls, data: bytes) -> U64:
        return cls(*cls.FORMAT.unpack(data))

    def encode(self) -> bytes:
        return self.FORMAT.pack(self.value)


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def decode(cls, data: bytes) -> VringState:
        return cls(*cls.FORMAT.unpack(data))

    def encode(self) -> bytes:
        return self.FORMAT.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Ring addresses in the FRONT-END's virtual address space (not GPAs)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")

    @classmethod
    def decode(cls, data: bytes) -> VringAddr:
        return cls(*cls.FORMAT.unpack(data))

    def encode(self) -> bytes:
        return self.FORMAT.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: a queue index and whether an fd comes along."""

    index: int
    no_fd: bool
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=Q")

    @classmethod
    def decode(cls, data: bytes) -> VringFile:
        (value,) = cls.FORMAT.unpack(data)
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD_MASK))

    def encode(self) -> bytes:
        if not 0 <= self.index <= VRING_IDX_MASK:
            raise ValueError(f"vring index {self.index} does not fit the 8-bit index field")
        return self.FORMAT.pack(self.index | (VRING_NOFD_MASK if self.no_fd else 0))


@dataclass(frozen=True, slots=True)
class MemoryRegionDesc:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQQQ")

    @classmethod
    def decode(cls, data: bytes) -> MemoryRegionDesc:
        return cls(*cls.FORMAT.unpack(data))

    def encode(self) -> bytes:
        return self.FORMAT.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


@dataclass(frozen=True, slots=True)
class MemoryTable:
    regions: tuple[MemoryRegionDesc, ...]
    COUNT: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def decode(cls, data: bytes) -> MemoryTable:
        if len(data) < cls.COUNT.size:
            raise MessageError(FrontendRequest.SET_MEM_TABLE, "memory table shorter than 8 bytes")
        nregions, _padding = cls.COUNT.unpack_from(data)
        if not 1 <= nregions <= MAX_MEM_REGIONS:
            raise MessageError(
                FrontendRequest.SET_MEM_TABLE, f"{nregions} regions, expected 1..{MAX_MEM_REGIONS}"
            )
        needed = cls.COUNT.size + nregions * MemoryRegionDesc.FORMAT.size
        if len(data) < needed:
            raise MessageError(
                FrontendRequest.SET_MEM_TABLE,
                f"{nregions} regions need {needed} bytes, got {len(data)}",
            )
        step = MemoryRegionDesc.FORMAT.size
        regions = tuple(
            MemoryRegionDesc.decode(data[8 + i * step : 8 + (i + 1) * step])
            for i in range(nregions)
        )
        return cls(regions)

    def encode(self) -> bytes:
        return self.COUNT.pack(len(self.regions), 0) + b"".join(r.encode() for r in self.regions)


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding then one region."""

    region: MemoryRegionDesc
    SIZE: ClassVar[int] = 8 + MemoryRegionDesc.FORMAT.size

    @classmethod
    def decode(cls, data: bytes) -> SingleMemoryRegion:
        return cls(MemoryRegionDesc.decode(data[8:]))

    def encode(self) -> bytes:
        return bytes(8) + self.region.encode()


@dataclass(frozen=True, slots=True)
class ConfigPayload:
    """GET_CONFIG / SET_CONFIG: u32 offset, u32 size, u32 flags, then data."""

    offset: int
    size: int
    flags: int
    data: bytes
    HEAD: ClassVar[struct.Struct] = struct.Struct("=III")
    MAX_DATA: ClassVar[int] = 256

    @classmethod
    def decode(cls, data: bytes) -> ConfigPayload:
        if len(data) < cls.HEAD.size:
            raise MessageError(FrontendRequest.GET_CONFIG, "config payload shorter than 12 bytes")
        offset, size, flags = cls.HEAD.unpack_from(data)
        body = data[cls.HEAD.size :]
        if size > cls.MAX_DATA or size != len(body):
            raise MessageError(
                FrontendRequest.GET_CONFIG,
                f"config size field {size} does not match {len(body)} data bytes",
            )
        return cls(offset, size, flags, bytes(body))

    def encode(self) -> bytes:
        return self.HEAD.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True, slots=True)
class LogPayload:
    mmap_size: int
    mmap_offset: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=QQ")

    @classmethod
    def decode(cls, data: bytes) -> LogPayload:
        return cls(*cls.FORMAT.unpack(data))

    def encode(self) -> bytes:
        return self.FORMAT.pack(self.mmap_size, self.mmap_offset)


@dataclass(frozen=True, slots=True)
class DeviceStatePayload:
    direction: int
    phase: int
    FORMAT: ClassVar[struct.Struct] = struct.Struct("=II")

    @classmethod
    def decode(cls, data: bytes) -> DeviceStatePayload:
        return cls(*cls.FORMAT.unpack(data))

    def encode(self) -> bytes:
        return self.FORMAT.pack(self.direction, self.phase)


@dataclass(frozen=True, slots=True)
class Empty:
    @classmethod
    def decode(cls, data: bytes) -> Empty:
        return cls()

    def encode(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class RawPayload:
    """Requests the device refuses: kept as bytes, only their size is checked."""

    data: bytes

    @classmethod
    def decode(cls, data: bytes) -> RawPayload:
        return cls(bytes(data))

    def encode(self) -> bytes:
        return self.data


Payload: TypeAlias = (
    U64
    | VringState
    | VringAddr
    | VringFile
    | MemoryTable
    | SingleMemoryRegion
    | ConfigPayload
    | LogPayload
    | DeviceStatePayload
    | Empty
    | RawPayload
)


class FdRule(enum.Enum):
    NONE = "no fd"
    ONE = "exactly one fd"
    ONE_OR_NONE = "at most one fd"
    PER_REGION = "one fd per memory region"
    VRING = "one fd unless the payload's no-fd bit is set"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    decode: Callable[[bytes], Payload]
    sizes: tuple[int, int]  # inclusive range of accepted payload sizes
    fds: FdRule
    # True where the front-end always waits for a reply (GET_* and friends);
    # other requests are acked only when NEED_REPLY is set.
    always_replies: bool


def _fixed(
    decode: Callable[[bytes], Payload], size: int, fds: FdRule = FdRule.NONE, replies: bool = False
) -> RequestSpec:
    return RequestSpec(decode, (size, size), fds, replies)


def _ranged(
    decode: Callable[[bytes], Payload],
    low: int,
    high: int,
    fds: FdRule = FdRule.NONE,
    replies: bool = False,
) -> RequestSpec:
    return RequestSpec(decode, (low, high), fds, replies)


_R = FrontendRequest
_CONFIG_SIZES = (ConfigPayload.HEAD.size, ConfigPayload.HEAD.size + ConfigPayload.MAX_DATA)
_RAW_ANY = (0, MAX_PAYLOAD_SIZE)

REQUEST_SPECS: dict[FrontendRequest, RequestSpec] = {
    _R.GET_FEATURES: _ranged(Empty.decode, 0, 0, replies=True),
    _R.SET_FEATURES: _fixed(U64.decode, 8),
    _R.SET_OWNER: _fixed(Empty.decode, 0),
    _R.RESET_OWNER: _ranged(RawPayload.decode, 0, 8),
    _R.SET_MEM_TABLE: _ranged(
        MemoryTable.decode,
        8 + MemoryRegionDesc.FORMAT.size,
        8 + MAX_MEM_REGIONS * MemoryRegionDesc.FORMAT.size,
        FdRule.PER_REGION,
    ),
    _R.SET_LOG_BASE: _fixed(LogPayload.decode, 16, FdRule.ONE),
    _R.SET_LOG_FD: _ranged(RawPayload.decode, 0, 8, FdRule.ONE),
    _R.SET_VRING_NUM: _fixed(VringState.decode, 8),
    _R.SET_VRING_ADDR: _fixed(VringAddr.decode, VringAddr.FORMAT.size),
    _R.SET_VRING_BASE: _fixed(VringState.decode, 8),
    _R.GET_VRING_BASE: _fixed(VringState.decode, 8, replies=True),
    _R.SET_VRING_KICK: _fixed(VringFile.decode, 8, FdRule.VRING),
    _R.SET_VRING_CALL: _fixed(VringFile.decode, 8, FdRule.VRING),
    _R.SET_VRING_ERR: _fixed(VringFile.decode, 8, FdRule.VRING),
    _R.GET_PROTOCOL_FEATURES: _fixed(Empty.decode, 0, replies=True),
    _R.SET_PROTOCOL_FEATURES: _fixed(U64.decode, 8),
    _R.GET_QUEUE_NUM: _fixed(Empty.decode, 0, replies=True),
    _R.SET_VRING_ENABLE: _fixed(VringState.decode, 8),
    _R.SEND_RARP: _fixed(RawPayload.decode, 8),
    _R.NET_SET_MTU: _fixed(U64.decode, 8),
    _R.SET_BACKEND_REQ_FD: _ranged(RawPayload.decode, 0, 8, FdRule.ONE),
    _R.IOTLB_MSG: RequestSpec(RawPayload.decode, _RAW_ANY, FdRule.NONE, False),
    _R.SET_VRING_ENDIAN: _fixed(VringState.decode, 8),
    _R.GET_CONFIG: RequestSpec(ConfigPayload.decode, _CONFIG_SIZES, FdRule.NONE, True),
    _R.SET_CONFIG: RequestSpec(ConfigPayload.decode, _CONFIG_SIZES, FdRule.NONE, False),
    _R.CREATE_CRYPTO_SESSION: RequestSpec(RawPayload.decode, _RAW_ANY, FdRule.NONE, True),
    _R.CLOSE_CRYPTO_SESSION: _fixed(U64.decode, 8),
    _R.POSTCOPY_ADVISE: _fixed(Empty.decode, 0, replies=True),
    _R.POSTCOPY_LISTEN: _fixed(Empty.decode, 0),
    _R.POSTCOPY_END: _fixed(Empty.decode, 0, replies=True),
    _R.GET_INFLIGHT_FD: RequestSpec(RawPayload.decode, _RAW_ANY, FdRule.NONE, True),
    _R.SET_INFLIGHT_FD: RequestSpec(RawPayload.decode, _RAW_ANY, FdRule.ONE, False),
    _R.GPU_SET_SOCKET: _ranged(RawPayload.decode, 0, 8, FdRule.ONE),
    _R.RESET_DEVICE: _fixed(Empty.decode, 0),
    _R.VRING_KICK: _fixed(VringState.decode, 8),
    _R.GET_MAX_MEM_SLOTS: _fixed(Empty.decode, 0, replies=True),
    _R.ADD_MEM_REG: _fixed(SingleMemoryRegion.decode, SingleMemoryRegion.SIZE, FdRule.ONE),
    _R.REM_MEM_REG: RequestSpec(
        SingleMemoryRegion.decode,
        (SingleMemoryRegion.SIZE, SingleMemoryRegion.SIZE),
        FdRule.ONE_OR_NONE,
        False,
    ),
    _R.SET_STATUS: _fixed(U64.decode, 8),
    _R.GET_STATUS: _fixed(Empty.decode, 0, replies=True),
    _R.GET_SHARED_OBJECT: _fixed(RawPayload.decode, 16, replies=True),
    _R.SET_DEVICE_STATE_FD: _fixed(DeviceStatePayload.decode, 8, FdRule.ONE, replies=True),
    _R.CHECK_DEVICE_STATE: _fixed(Empty.decode, 0, replies=True),
}


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded front-end request; fds stay with the caller."""

    request: FrontendRequest
    header: Header
    payload: Payload

    @property
    def expects_reply(self) -> bool:
        return REQUEST_SPECS[self.request].always_replies or self.header.need_reply


def expected_fd_count(request: FrontendRequest, payload: Payload) -> int:
    rule = REQUEST_SPECS[request].fds
    if rule is FdRule.NONE:
        return 0
    if rule is FdRule.ONE:
        return 1
    if rule is FdRule.ONE_OR_NONE:
        return 1
    if rule is FdRule.PER_REGION:
        assert isinstance(payload, MemoryTable)
        return len(payload.regions)
    assert isinstance(payload, VringFile)
    return 0 if payload.no_fd else 1


def accepted_fd_counts(request: FrontendRequest, payload: Payload) -> tuple[int, ...]:
    """Every fd count the request may carry (QEMU sends REM_MEM_REG without one)."""
    if REQUEST_SPECS[request].fds is FdRule.ONE_OR_NONE:
        return (0, 1)
    return (expected_fd_count(request, payload),)


def decode_request(header: Header, payload: bytes, nfds: int) -> Request:
    """Decode a front-end request whose payload has been read in full.

    Raises MessageError for an unknown request, a reply where a request was
    expected, a payload whose size the request does not allow, or a number of
    file descriptors the request does not carry.
    """
    if header.is_reply:
        raise MessageError(_known(header.request), "a reply arrived where a request was expected")
    try:
        request = FrontendRequest(header.request)
    except ValueError:
        raise MessageError(header.request, "unknown request") from None
    if len(payload) != header.size:
        raise MessageError(request, f"declared {header.size} payload bytes, got {len(payload)}")
    spec = REQUEST_SPECS[request]
    low, high = spec.sizes
    if not low <= header.size <= high:
        accepted = str(low) if low == high else f"{low}..{high}"
        raise MessageError(request, f"payload is {header.size} bytes, accepted: {accepted}")
    try:
        decoded = spec.decode(payload)
    except MessageError as error:
        # Payload decoders are shared (GET_CONFIG/SET_CONFIG): name the request
        # that actually carried the payload.
        raise MessageError(request, error.reason) from None
    wanted = expected_fd_count(request, decoded)
    if nfds not in accepted_fd_counts(request, decoded):
        raise MessageError(request, f"carries {wanted} fd(s) ({spec.fds.value}), got {nfds}")
    return Request(request, header, decoded)


def encode_request(
    request: FrontendRequest, payload: Payload | None = None, *, need_reply: bool = False
) -> bytes:
    """Front-end side: encode a request frame (the mocked guest uses this)."""
    body = payload.encode() if payload is not None else b""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return encode_frame(request, body, flags=flags)


def encode_backend_request(
    request: BackendRequest, payload: bytes = b"", *, need_reply: bool = False
) -> bytes:
    """Back-end channel message, e.g. CONFIG_CHANGE_MSG (no payload)."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return encode_frame(request, payload, flags=flags)


def check_reply(header: Header, expected_request: int) -> None:
    """Validate a reply header the way QEMU does (flags exactly 0x5, same request)."""
    if header.flags != VERSION | FLAG_REPLY:
        raise MessageError(header.request, f"reply flags {header.flags:#x}, expected 0x5")
    if header.request != expected_request:
        raise MessageError(
            header.request, f"reply to request {header.request}, expected {expected_request}"
        )


def decode_reply(expected_request: int, data: bytes) -> tuple[Header, bytes]:
    """Front-end side: validate a whole reply frame (see `check_reply`)."""
    header = decode_header(data[:HEADER_SIZE])
    check_reply(header, expected_request)
    body = data[HEADER_SIZE:]
    if len(body) != header.size:
        raise MessageError(header.request, f"reply declares {header.size} bytes, got {len(body)}")
    return header, body
