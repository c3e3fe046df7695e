"""A front-end that takes guest RAM away under our mapping ends only its own
session: the process (this test process, here) gets no SIGBUS, and every
other session goes on being served."""

from __future__ import annotations

import asyncio
import os

from tests.conftest import StartBackend
from vhost_balloon.backend.vhost.session import Session
from vhost_balloon.guest.runner import MockGuest
from vhost_balloon.protocol.virtqueue import Buffer


async def _wait_for_end(session: Session, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while session.state.value != "closed":
        if loop.time() > deadline:
            raise AssertionError(f"session still {session.state.value}")
        await asyncio.sleep(0.01)


def _the_new_session(sessions: dict[str, Session], known: set[str]) -> Session:
    (name,) = set(sessions) - known
    return sessions[name]


async def test_truncated_guest_ram_ends_only_its_own_session(start_backend: StartBackend) -> None:
    backend = await start_backend(allow_unsealed_memory=True)
    sessions = backend.server.sessions
    async with MockGuest(backend.guest_options()) as bystander:
        known = set(sessions)
        victim = MockGuest(backend.guest_options(seal=False))
        await victim.start()
        try:
            session = _the_new_session(sessions, known)
            # Unsealed RAM is reached through copies that fail, not loads that fault.
            assert all(region.guarded is not None for region in session.memory_map.regions)
            assert (await victim.run(2)).reports  # served while the RAM is whole
            driver = victim.driver
            index = driver.reporting_queue
            blocks = driver.layout.blocks[:4]
            driver.queue(index).add([Buffer(b.gpa, driver.layout.block_size, True) for b in blocks])
            os.ftruncate(victim.ram.fd, 0)  # the front-end takes its RAM away ...
            victim.frontend.kick(index)  # ... and asks for the report
            await _wait_for_end(session)
            assert "guest memory is gone" in session.end_reason
            assert session.name not in sessions
        finally:
            await victim.close()  # never touches its (now missing) RAM
        # The other VM is served as before, in full.
        summary = bystander.summary(await bystander.run(3))
        assert summary["reports"] == 3
        assert summary["integrity_ok"]
    # And the listener takes new sessions.
    async with MockGuest(backend.guest_options()) as next_guest:
        assert (await next_guest.run(1)).reports


async def test_sealed_guest_ram_is_read_directly(start_backend: StartBackend) -> None:
    """The guard costs a syscall per ring access: sealed RAM does not pay it."""
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        (session,) = backend.server.sessions.values()
        assert all(region.guarded is None for region in session.memory_map.regions)
        assert (await guest.run(1)).reports
