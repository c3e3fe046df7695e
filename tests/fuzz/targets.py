"""Coverage-guided fuzz targets for the backend's untrusted input, beside
the protocol's (tests/unit/fuzz_targets.py: header, request, ring).

- `session`: a front-end's whole conversation. The input is a sequence of
  vhost-user messages, each with a request id, flags, a payload and a choice
  of fds (an eventfd, a sealed memfd, a socket, /dev/null); they are sent on
  a real socket to a real Session with a real BalloonDevice, which runs them
  to the end. What must hold: the session ends (no hang), nothing escapes it
  but the errors it is allowed to end on, and every fd it was given is
  closed when it is gone.
- `balloon`: an inflate or deflate chain over a real memory map: read_pfns,
  then BalloonedPages.inflate/deflate. What must hold: only BadChain is
  raised; every discard target lies in one region, page-aligned in its file,
  and covers only pages marked ballooned; the ballooned count matches.
- `stats`: a stats-queue chain: parse_stats raises only BadStats, and a
  sample names only tags it knows.

scripts/fuzz.py runs them under atheris; tests/backend/test_fuzz_corpus.py
runs every input of tests/fuzz/corpus/ through them in the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from tests.unit.fuzz_targets import fuzz_header, fuzz_request, fuzz_ring
from vhost_balloon.backend.balloon.ballooned import BadChain, BalloonedPages, read_pfns
from vhost_balloon.backend.balloon.device import BalloonDevice, BalloonSettings
from vhost_balloon.backend.balloon.guest_stats import STAT_NAMES, BadStats, parse_stats
from vhost_balloon.backend.vhost.mapping import MappedRegion, MemoryMap
from vhost_balloon.backend.vhost.session import Session, SessionLogger
from vhost_balloon.protocol.memory import GuestMemory, Region, RegionTable
from vhost_balloon.protocol.vhost_user import FrontendRequest, MemoryRegionDesc
from vhost_balloon.protocol.virtqueue import Chain, Descriptor

MiB = 1 << 20
PAGE = 4096
SESSION_TIMEOUT_S = 5.0  # a session still running after this is a hang
SESSION_RAM = 1 * MiB
MAX_MESSAGES = 24
REQUESTS = list(FrontendRequest)
HEADER = struct.Struct("<III")


# -- session ---------------------------------------------------------------------


def _memfd(size: int) -> int:
    fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _fds(mask: int) -> list[int]:
    """Fds to send with a message, chosen by the bits of `mask`."""
    fds: list[int] = []
    if mask & 1:
        fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    if mask & 2:
        fds.append(_memfd(SESSION_RAM))
    if mask & 4:
        left, right = socket.socketpair()
        right.close()
        fds.append(left.detach())
    if mask & 8:
        fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    return fds


def messages(data: bytes) -> list[tuple[bytes, list[int]]]:
    """The frames (and fds to send with them) an input describes: per
    message, a request byte, a flags byte, an fd-mask byte, a length byte,
    then that many payload bytes."""
    out: list[tuple[bytes, list[int]]] = []
    pos = 0
    while pos + 4 <= len(data) and len(out) < MAX_MESSAGES:
        request = REQUESTS[data[pos] % len(REQUESTS)].value
        flags = 0x1 | (0x8 if data[pos + 1] & 1 else 0) | (data[pos + 1] & 0xF0) << 24
        mask = data[pos + 2] & 0xF
        length = data[pos + 3]
        payload = data[pos + 4 : pos + 4 + length]
        pos += 4 + length
        out.append((HEADER.pack(request, flags, len(payload)) + payload, _fds(mask)))
    return out


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


_LOOPS: list[asyncio.AbstractEventLoop] = []  # one, made at the first input


def _loop() -> asyncio.AbstractEventLoop:
    if not _LOOPS:
        _LOOPS.append(asyncio.new_event_loop())
    return _LOOPS[0]


async def _converse(frames: list[tuple[bytes, list[int]]]) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log = SessionLogger(logging.getLogger("vhost_balloon.fuzz"), {"session": "f"})
    device = BalloonDevice(BalloonSettings(), "f", log)
    session = Session("f", theirs, device, log)
    runner = asyncio.ensure_future(session.run())

    def send_all() -> None:
        # On a thread, blocking: the session reads as it goes (and may wait
        # for its queue threads between two messages).
        try:
            for frame, fds in frames:
                socket.send_fds(ours, [frame], fds)
        except OSError:
            pass  # the session hung up on an earlier message
        finally:
            for _, fds in frames:
                for fd in fds:
                    os.close(fd)  # ours; the session got its own copies
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_WR)

    try:
        await asyncio.get_running_loop().run_in_executor(None, send_all)
        await asyncio.wait_for(runner, SESSION_TIMEOUT_S)  # a hang raises TimeoutError
    finally:
        ours.close()
        if not runner.done():
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
        await session.close()


def fuzz_session(data: bytes) -> None:
    loop = _loop()  # its own fds (epoll, self-pipe) are made once, before counting
    before = _open_fds()
    loop.run_until_complete(_converse(messages(data)))
    leaked = _open_fds() - before
    assert not leaked, f"fds left open after the session: {sorted(leaked)}"


# -- balloon chains -----------------------------------------------------------------


class _Ram:
    """Two 4 MiB regions of one memfd at GPA 0 and 16 MiB, made once."""

    memory_map: MemoryMap | None = None

    @classmethod
    def get(cls) -> MemoryMap:
        if cls.memory_map is None:
            fd = _memfd(8 * MiB)
            regions = [
                MappedRegion(MemoryRegionDesc(0, 4 * MiB, 0x7F0000000000, 0), os.dup(fd)),
                MappedRegion(
                    MemoryRegionDesc(16 * MiB, 4 * MiB, 0x7F0000400000, 4 * MiB), os.dup(fd)
                ),
            ]
            os.close(fd)
            cls.memory_map = MemoryMap(regions)
        return cls.memory_map


def _chain(data: bytes, memory_len: int) -> Chain:
    """Up to 4 descriptors from the first bytes: (addr, length, flags) each."""
    descriptors = []
    count = data[0] % 5 if data else 0
    for i in range(count):
        part = data[1 + 9 * i : 10 + 9 * i].ljust(9, b"\0")
        addr = int.from_bytes(part[:4], "little") % (memory_len + PAGE)
        length = int.from_bytes(part[4:8], "little") % 2048
        descriptors.append(Descriptor(addr, length, part[8] & 2))
    return Chain(0, tuple(descriptors), False)


def fuzz_balloon(data: bytes) -> None:
    memory_map = _Ram.get()
    region0 = memory_map.regions[0]
    # The PFN arrays are read from the first page of guest RAM, written from the input.
    page = data[40 : 40 + PAGE].ljust(PAGE, b"\0")
    region0.view[:PAGE] = page
    chain = _chain(data[:40], PAGE)
    granularity = 2 * MiB if data[:1] and data[0] & 0x80 else PAGE
    for mapped in memory_map.regions:
        mapped.granularity = granularity
    pages = BalloonedPages()
    for kind in ("inflate", "deflate", "inflate"):
        try:
            pfns = read_pfns(chain, memory_map.memory)
        except BadChain:
            return
        # Shift into the regions, so that most PFNs land somewhere in RAM.
        pfns = [pfn % (6 * MiB // PAGE) for pfn in pfns]
        pfns = [pfn + (16 * MiB // PAGE - 1024) if pfn >= 1024 else pfn for pfn in pfns]
        plan = (
            pages.inflate(pfns, memory_map)
            if kind == "inflate"
            else pages.deflate(pfns, memory_map)
        )
        assert (
            plan.pages
            + plan.duplicates
            + plan.unknown
            + plan.skipped_outside
            + plan.skipped_unaligned
            == len(pfns)
        )
        for target in plan.targets:
            index, _ = memory_map.memory.table.find(target.gpa, target.length)
            mapped = memory_map.regions[index]
            assert target.file_offset % mapped.granularity == 0
            assert target.length % mapped.granularity == 0
            assert all(
                pfn in pages
                for pfn in range(target.gpa // PAGE, (target.gpa + target.length) // PAGE)
            ), "a discard covers a page that is not ballooned"
    assert pages.count >= 0


# -- stats ------------------------------------------------------------------------------


def fuzz_stats(data: bytes) -> None:
    ram = bytearray(data[40 : 40 + 2 * PAGE].ljust(2 * PAGE, b"\0"))
    memory = GuestMemory(RegionTable([Region(0, len(ram), 1 << 40, 0)]), [ram])
    chain = _chain(data[:40], len(ram))
    try:
        sample = parse_stats(chain, memory)
    except BadStats:
        return
    assert set(sample.stats) <= set(STAT_NAMES)
    assert all(tag >= len(STAT_NAMES) for tag in sample.unknown)


TARGETS: dict[str, Callable[[bytes], Any]] = {
    "header": fuzz_header,
    "request": fuzz_request,
    "ring": fuzz_ring,
    "session": fuzz_session,
    "balloon": fuzz_balloon,
    "stats": fuzz_stats,
}
