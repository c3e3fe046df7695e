"""A guest for the integrity soak: it owns pages, checks them, and survives
its connection.

The guest's RAM outlives every connection: a disconnect (ours, injected) or
a backend that dies only ends the front-end and the driver, and the next
connection negotiates again over the same memory, as a rebooted device
would. Each reportable block is in one state:

- OWNED: allocated; every page holds a stamp of its gpa and the block's
  generation. Checked continuously: any byte changed is unreported memory
  the host altered.
- FREE: freed but not reported yet; it still holds its stamp and is checked
  the same way (a free page the guest never reported is not the host's).
- REPORTED: its report's used entry was seen. Right then the whole block
  must read zero (punch-hole and MADV_REMOVE zero it): a byte that does not
  is a report published before its discard returned.
- STRANDED: in a report still in flight when the connection ended. As in
  Linux, the guest leaves such pages isolated; they come back (content
  unknown, so only for allocation) after `stranded_grace_s`, so a dead
  session that touched them later than that would show as corruption.
- RELEASED: content unknown (stranded, then let go); only allocated again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import struct
import time
from dataclasses import dataclass, field, replace

from vhost_balloon.guest.driver import DriverConfig, ReportingDriver
from vhost_balloon.guest.errors import FrontendError, GuestError
from vhost_balloon.guest.frontend import FrontendOptions, VhostUserFrontend
from vhost_balloon.guest.layout import PAGE_SIZE
from vhost_balloon.guest.ram import GuestRam
from vhost_balloon.protocol.virtqueue import Buffer

_STAMP = struct.Struct("<QQ")
_SOAK_MAGIC = 0x534F_414B_0000_0000  # "SOAK" in the high half, the generation below


class BlockState(enum.Enum):
    OWNED = "owned"
    FREE = "free"
    REPORTED = "reported"
    STRANDED = "stranded"
    RELEASED = "released"


@dataclass(slots=True)
class SoakCounts:
    """What one guest saw; the soak's summary adds them up."""

    connections: int = 0
    disconnects_injected: int = 0
    connections_lost: int = 0  # the backend went away (a restart)
    reports_published: int = 0
    reports_abandoned: int = 0  # in flight when the connection ended
    blocks_allocated: int = 0
    blocks_freed: int = 0
    pages_checked: int = 0
    bytes_checked: int = 0
    altered_pages: int = 0  # unreported pages with any byte changed
    altered_bytes: int = 0
    reported_bytes: int = 0
    undiscarded_bytes: int = 0  # reported bytes not zero when the used entry was seen
    early_reports: int = 0  # reports with any such byte
    driver_errors: int = 0  # the device broke the protocol (see errors)
    errors: list[str] = field(default_factory=list)  # what ended a connection, first few

    def add(self, other: SoakCounts) -> None:
        for name in self.__slots__:
            if name == "errors":
                self.errors.extend(other.errors)
            else:
                setattr(self, name, getattr(self, name) + getattr(other, name))


def block_stamp(gpa: int, size: int, generation: int) -> bytes:
    """Every page of the block at `gpa`: its own gpa and the generation, repeated."""
    magic = _SOAK_MAGIC | (generation & 0xFFFF_FFFF)
    repeat = PAGE_SIZE // _STAMP.size
    return b"".join(_STAMP.pack(page, magic) * repeat for page in range(gpa, gpa + size, PAGE_SIZE))


def changed_bytes(got: bytes | memoryview, want: bytes) -> tuple[int, int]:
    """(pages with any byte changed, bytes changed) of `got` against `want`."""
    pages = changed = 0
    for start in range(0, len(want), PAGE_SIZE):
        a, b = got[start : start + PAGE_SIZE], want[start : start + PAGE_SIZE]
        if a != b:
            pages += 1
            changed += sum(x != y for x, y in zip(bytes(a), b, strict=True))
    return pages, changed


@dataclass(frozen=True, slots=True)
class SoakGuestOptions:
    socket_path: str
    memory_bytes: int = 256 << 20
    order: int = 9
    entries: int = 8  # at most, per report
    seed: int = 0
    stranded_grace_s: float = 2.0
    reconnect_after_s: float = 0.25  # after an injected hang-up
    connect_timeout: float = 30.0  # a restarted backend has this long to listen again
    report_timeout: float = 10.0
    check_blocks_per_step: int = 8


class SoakGuest:
    """One guest of the soak (see the module docstring)."""

    def __init__(self, options: SoakGuestOptions) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.config = DriverConfig(
            entries=options.entries,
            order=options.order,
            integrity_bytes=0,  # the block states below check every page
            report_timeout=options.report_timeout,
            populate=False,
        )
        self.ram = GuestRam(options.memory_bytes)
        self.counts = SoakCounts()
        self.frontend: VhostUserFrontend | None = None
        self.driver: ReportingDriver | None = None
        # The driver plans the layout (a front-end opens nothing until connect).
        probe = ReportingDriver(
            VhostUserFrontend(options.socket_path, self._frontend_options()), self.ram, self.config
        )
        self.block_size = probe.layout.block_size
        self.blocks = [block.gpa for block in probe.layout.blocks]
        self.state = dict.fromkeys(self.blocks, BlockState.RELEASED)
        self.generation = dict.fromkeys(self.blocks, 0)
        self.stranded_until: dict[int, float] = {}
        self._cursor = 0
        self._zero = bytes(self.block_size)
        self._buffer = bytearray(self.block_size)
        self._disconnect_wanted = False

    def _frontend_options(self) -> FrontendOptions:
        return FrontendOptions(num_queues=self.config.queue_count)

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> None:
        frontend = VhostUserFrontend(self.options.socket_path, self._frontend_options())
        try:
            await frontend.connect(self.options.connect_timeout)
            await frontend.init()
            driver = ReportingDriver(frontend, self.ram, self.config)
            await driver.probe()
        except BaseException:
            await frontend.close()
            raise
        self.frontend, self.driver = frontend, driver
        self.counts.connections += 1

    async def disconnect(self) -> None:
        if self.frontend is not None:
            await self.frontend.close()
        self.frontend = self.driver = None

    def want_disconnect(self) -> None:
        """Hang up during the next report (the soak's injected disconnect)."""
        self._disconnect_wanted = True

    async def close(self) -> None:
        await self.disconnect()
        self.ram.close()

    # -- the block model -------------------------------------------------------------

    def _pick(self, *states: BlockState, count: int = 1) -> list[int]:
        found = [gpa for gpa in self.blocks if self.state[gpa] in states]
        return self.rng.sample(found, min(count, len(found)))

    def _release_stranded(self) -> None:
        now = time.monotonic()
        for gpa, until in list(self.stranded_until.items()):
            if now >= until:
                del self.stranded_until[gpa]
                self.state[gpa] = BlockState.RELEASED

    def allocate(self) -> bool:
        chosen = self._pick(BlockState.REPORTED, BlockState.RELEASED)
        if not chosen:
            return False
        gpa = chosen[0]
        self.generation[gpa] += 1
        mapping, offset = self.ram.locate(gpa, self.block_size)
        mapping[offset : offset + self.block_size] = block_stamp(
            gpa, self.block_size, self.generation[gpa]
        )
        self.state[gpa] = BlockState.OWNED
        self.counts.blocks_allocated += 1
        return True

    def free(self) -> bool:
        chosen = self._pick(BlockState.OWNED)
        if not chosen:
            return False
        self.state[chosen[0]] = BlockState.FREE  # its stamp stays until it is reported
        self.counts.blocks_freed += 1
        return True

    def check_block(self, gpa: int) -> None:
        """Compare an OWNED or FREE block with its stamp; count what changed."""
        mapping, offset = self.ram.locate(gpa, self.block_size)
        want = block_stamp(gpa, self.block_size, self.generation[gpa])
        with memoryview(mapping) as view:
            got = view[offset : offset + self.block_size]
            if got != want:
                pages, changed = changed_bytes(got, want)
                self.counts.altered_pages += pages
                self.counts.altered_bytes += changed
                # Stamp it again, so one alteration is counted once.
                mapping[offset : offset + self.block_size] = want
            got.release()
        self.counts.pages_checked += self.block_size // PAGE_SIZE
        self.counts.bytes_checked += self.block_size

    def check_some(self, count: int) -> None:
        """Check the next `count` blocks in rotation that hold a stamp."""
        for _ in range(len(self.blocks)):
            if count <= 0:
                return
            gpa = self.blocks[self._cursor]
            self._cursor = (self._cursor + 1) % len(self.blocks)
            if self.state[gpa] in (BlockState.OWNED, BlockState.FREE):
                self.check_block(gpa)
                count -= 1

    def check_all(self) -> None:
        for gpa in self.blocks:
            if self.state[gpa] in (BlockState.OWNED, BlockState.FREE):
                self.check_block(gpa)

    def _check_discarded(self, gpas: list[int]) -> None:
        """Each block of a report whose used entry was just seen must read zero."""
        undiscarded = 0
        for gpa in gpas:
            self.ram.pread_into(gpa, self._buffer)
            if self._buffer != self._zero:
                undiscarded += self.block_size - self._buffer.count(0)
        self.counts.reported_bytes += self.block_size * len(gpas)
        if undiscarded:
            self.counts.undiscarded_bytes += undiscarded
            self.counts.early_reports += 1

    # -- one step ---------------------------------------------------------------

    async def report(self) -> None:
        """Report some FREE blocks; maybe hang up while the chain is in flight."""
        driver = self.driver
        if driver is None:
            raise GuestError("not connected")
        gpas = self._pick(BlockState.FREE, count=self.rng.randint(1, self.options.entries))
        if not gpas:
            return
        buffers = [Buffer(gpa, self.block_size, True) for gpa in gpas]
        for gpa in gpas:
            self.state[gpa] = BlockState.STRANDED  # until its used entry is seen
        task = asyncio.ensure_future(driver.submit(buffers))
        if self._disconnect_wanted:
            self._disconnect_wanted = False
            await asyncio.wait([task], timeout=self.rng.uniform(0.0, 0.02))
            if not task.done():
                self.counts.disconnects_injected += 1
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, GuestError):
                    await task
                self._strand(gpas)
                await self.disconnect()
                # The next connection puts its rings where these were: the old
                # session may still publish the chain in flight (its delays are
                # at most tens of ms) until it sees the hang-up.
                await asyncio.sleep(self.options.reconnect_after_s)
                return
        try:
            await task
        except GuestError:
            self._strand(gpas)
            raise
        self.counts.reports_published += 1
        self._check_discarded(gpas)
        for gpa in gpas:
            self.state[gpa] = BlockState.REPORTED

    def _strand(self, gpas: list[int]) -> None:
        self.counts.reports_abandoned += 1
        until = time.monotonic() + self.options.stranded_grace_s
        for gpa in gpas:
            self.stranded_until[gpa] = until

    async def step(self) -> None:
        """Allocate or free a few blocks, report, check some blocks."""
        self._release_stranded()
        owned = sum(1 for state in self.state.values() if state is BlockState.OWNED)
        for _ in range(self.rng.randint(1, 4)):
            # Keep about half the blocks owned, the rest moving through reporting.
            if self.rng.random() < (0.7 if owned < len(self.blocks) // 2 else 0.3):
                owned += self.allocate()
            else:
                owned -= self.free()
        await self.report()
        self.check_some(self.options.check_blocks_per_step)

    async def run_until(self, deadline: float) -> None:
        """Steps until `deadline` (monotonic s), reconnecting whenever the connection ends."""
        while time.monotonic() < deadline:
            try:
                if self.driver is None:
                    await self.connect()
                await self.step()
            except FrontendError as error:
                self.counts.connections_lost += 1
                self._note(error)
                await self.disconnect()
            except GuestError as error:
                # The device misbehaved (a corrupted used ring, a report not
                # returned): counted as a failure of the soak, and go on.
                self.counts.driver_errors += 1
                self._note(error)
                await self.disconnect()
        if self.driver is not None:
            with contextlib.suppress(GuestError):
                await self.driver.remove()
        self.check_all()

    def _note(self, error: Exception) -> None:
        if len(self.counts.errors) < 5:
            self.counts.errors.append(f"{type(error).__name__}: {error}")


def soak_options(base: SoakGuestOptions, index: int) -> SoakGuestOptions:
    """Guest `index` of a soak: its own seed."""
    return replace(base, seed=base.seed * 1000 + index)
