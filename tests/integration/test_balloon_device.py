"""The classic balloon end to end, mocked guest against the real backend:
`ctl balloon` sets a target, the guest's driver inflates to it and the host
frees what it inflated, deflates when the target rises, stats arrive on the
stats queue, deflate-on-oom gives pages back unasked, and bad input from the
control socket or the guest's chains changes nothing it should not.

Each test says, above it, what wrong behaviour makes it fail.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import MiB, RunningBackend, StartBackend
from vhost_balloon.backend.balloon import device as device_module
from vhost_balloon.backend.balloon.features import OFFERED_FEATURES
from vhost_balloon.backend.balloon.guest_stats import parse_stats
from vhost_balloon.backend.latency.delays import parse_delay
from vhost_balloon.backend.latency.injection import LatencySettings, Point
from vhost_balloon.backend.observe.control import control_request
from vhost_balloon.backend.vhost.backend_channel import ChannelFailed
from vhost_balloon.guest.runner import MockGuest
from vhost_balloon.protocol.vhost_user import FrontendRequest, VringState
from vhost_balloon.protocol.virtio import BALLOON_F_STATS_VQ
from vhost_balloon.protocol.virtqueue import Buffer

MEMORY = 256 * MiB
PAGE = 4096
WAIT_S = 10.0
STATS_FEATURES = OFFERED_FEATURES | 1 << BALLOON_F_STATS_VQ


async def _until(what: str, condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _target(backend: RunningBackend, size: int, **extra: Any) -> dict[str, Any]:
    """`ctl balloon SIZE`, through the control socket as ctl sends it."""
    path = backend.server.settings.control_socket
    assert path is not None
    request = {"cmd": "balloon", "size": size, **extra}
    reply: dict[str, Any] = await asyncio.to_thread(control_request, path, request, 5.0)
    return reply


async def _session_stats(backend: RunningBackend) -> dict[str, Any]:
    """`ctl stats` for the one session, once no batch runs: a chain is
    counted just after its used entry is published."""
    sessions = backend.server.sessions.values()
    await _until("the queue threads to be idle", lambda: not any(s.rings.busy for s in sessions))
    stats = await backend.server.handle_control({"cmd": "stats"})
    (session,) = stats["sessions"].values()
    assert isinstance(session, dict)
    return session


def _ram_held(guest: MockGuest) -> int:
    return guest.ram.allocated_bytes()


# 1. Catches: a target that never reaches the driver (no CONFIG_CHANGE_MSG);
# num_pages computed from the wrong size; inflated pages acked but not
# freed on the host (or freed after the ack); a deflate that leaves the
# device's count of ballooned pages wrong; `actual` and the time to target
# not shown; inflate/deflate chains missing from the trace; free page
# reports broken by the balloon beside them.
async def test_a_target_inflates_frees_on_the_host_and_deflates_back(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(control=True)
    async with MockGuest(backend.guest_options(memory=MEMORY, balloon=True)) as guest:
        balloon = guest.balloon
        assert balloon is not None
        await guest.run(2)  # reports first, as a guest that booted
        held_before = _ram_held(guest)
        reply = await _target(backend, MEMORY - 64 * MiB)
        assert reply["ok"] and reply["balloon"]["target_pages"] == 64 * MiB // PAGE
        await _until("the guest to reach the target", lambda: balloon.num_pages == 16384)
        session = await _session_stats(backend)
        await _until(
            "actual to reach the device",
            lambda: backend.server.vhost.devices[reply["session"]].target.reached_ns != 0,
        )
        status = (await _session_stats(backend))["balloon"]
        assert status["target_bytes"] == MEMORY - 64 * MiB
        assert status["ballooned_bytes"] == status["tracked_bytes"] == 64 * MiB
        assert status["seconds_to_target"] is not None and status["pending_seconds"] is None
        # The guest wrote every page before inflating it: all of it came back.
        assert status["inflate_freed_bytes"] == 64 * MiB
        # ... and the host holds none of the 64 MiB the guest wrote before inflating.
        assert _ram_held(guest) - held_before < MiB
        session = await _session_stats(backend)
        assert session["inflated_pages"] == 16384 and session["inflate_chains"] == 64

        await _target(backend, MEMORY)  # the whole RAM again: deflate
        await _until("the guest to deflate", lambda: balloon.num_pages == 0)
        await _until(
            "actual 0 at the device",
            lambda: backend.server.vhost.devices[reply["session"]].config.actual == 0,
        )
        session = await _session_stats(backend)
        assert session["deflated_pages"] == 16384 and session["deflate_unknown_pfns"] == 0
        assert session["balloon"]["tracked_bytes"] == 0
        summary = guest.summary(await guest.run(4))  # reporting works on, over all RAM
    assert summary["integrity_ok"] and summary["freed_bytes"] == summary["reported_bytes"]
    chains = backend.trace(("inflate", "deflate"))
    assert [c["kind"] for c in chains] == ["inflate"] * 64 + ["deflate"] * 64
    assert [c["seq"] for c in chains[:64]] == list(range(1, 65))
    assert sum(c["pages"] for c in chains if c["kind"] == "inflate") == 16384
    assert sum(c["freed_bytes"] for c in chains) == 64 * MiB
    for chain in chains:
        assert chain["t_discard_done_ns"] <= chain["t_published_ns"] <= chain["t_notified_ns"]
        assert chain["bad_chain"] == "" and chain["errors"] == []
    assert len(backend.trace()) == 6  # the reports, and only they, by default


# 2. Catches: the injected latency not applied to balloon chains (so the time
# to reach a target cannot be studied against it), or applied but not
# measured into the record.
async def test_injected_delays_stretch_each_inflate_chain_and_are_measured(
    start_backend: StartBackend,
) -> None:
    latency = LatencySettings(delays={Point.PUBLISH: parse_delay("const:20ms")})
    backend = await start_backend(control=True, latency=latency)
    async with MockGuest(backend.guest_options(memory=MEMORY, balloon=True)) as guest:
        assert guest.balloon is not None
        await _target(backend, MEMORY - 2 * MiB)  # two chains of 256 pages
        await _until(
            "two chains", lambda: guest.balloon is not None and guest.balloon.num_pages == 512
        )
    chains = backend.trace(("inflate",))
    assert len(chains) == 2
    for chain in chains:
        assert chain["injected_ns"]["publish"] >= 20_000_000
        assert chain["t_notified_ns"] - chain["t_kick_ns"] >= 20_000_000


# 3. Catches: a stats buffer given back at once (the guest spins refilling),
# never given back (one sample for ever, though an interval is set), tags
# named wrongly or dropped, samples absent from ctl stats, Prometheus or
# the trace.
async def test_stats_arrive_every_interval_named_as_qemu_names_them(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(control=True, features=STATS_FEATURES, stats_interval_s=0.05)
    async with MockGuest(backend.guest_options(memory=MEMORY, stats=True)) as guest:
        balloon = guest.balloon
        assert balloon is not None and balloon.stats_enabled
        await _until("three samples", lambda: balloon.stats_returned >= 3)
        session = await _session_stats(backend)
        stats = session["guest_stats"]
        assert stats["samples"] >= 3 and stats["bad_buffers"] == 0
        assert stats["interval_s"] == 0.05
        last = stats["last"]["stats"]
        assert last["stat-total-memory"] == MEMORY
        assert len(last) == 16 and "stat-direct-reclaims" in last
        metrics = backend.server.render_metrics()
        assert 'vhost_balloon_guest_stat{session="s1",stat="stat-total-memory"}' in metrics
    samples = backend.trace(("stats",))
    assert len(samples) >= 3
    assert samples[0]["stats"]["stat-total-memory"] == MEMORY
    assert [s["seq"] for s in samples] == list(range(1, len(samples) + 1))


# 4. Catches: with no interval, a buffer returned anyway (QEMU holds it: the
# probe's sample is the one there is), or the probe's sample lost.
async def test_without_an_interval_the_probes_sample_is_kept_and_the_buffer_held(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(features=STATS_FEATURES)
    async with MockGuest(backend.guest_options(memory=MEMORY, stats=True)) as guest:
        balloon = guest.balloon
        assert balloon is not None
        await _until("the probe's sample", lambda: bool(backend.trace(("stats",))))
        await asyncio.sleep(0.2)
        assert balloon.stats_returned == 0
        session = await _session_stats(backend)
        assert session["guest_stats"]["samples"] == 1


# 5. Catches: a deflate the host did not ask for (deflate-on-oom) refused,
# or counted as never inflated; the target shown as reached when the guest
# has dropped below it.
async def test_deflate_on_oom_gives_pages_back_unasked(start_backend: StartBackend) -> None:
    backend = await start_backend(control=True)
    options = backend.guest_options(memory=MEMORY, balloon=True, deflate_on_oom=True)
    async with MockGuest(options) as guest:
        balloon = guest.balloon
        assert balloon is not None and balloon.deflate_on_oom
        await _target(backend, MEMORY - 8 * MiB)
        await _until("the target", lambda: balloon.num_pages == 2048)
        await _until(
            "actual at the device",
            lambda: next(iter(backend.server.vhost.devices.values())).config.actual == 2048,
        )
        assert await balloon.oom() == 256  # what Linux's OOM notifier gives back
        await _until(
            "actual after the OOM deflate",
            lambda: next(iter(backend.server.vhost.devices.values())).config.actual == 1792,
        )
        session = await _session_stats(backend)
    assert session["deflated_pages"] == 256 and session["deflate_unknown_pfns"] == 0
    assert session["balloon"]["ballooned_bytes"] == 1792 * PAGE
    assert session["balloon"]["tracked_bytes"] == 1792 * PAGE
    assert session["balloon"]["target_pages"] == 2048


# 6. Catches: a bad `balloon` request that changes the target anyway, or
# that takes the control socket or the session down.
@pytest.mark.parametrize(
    ("request_extra", "message"),
    [
        ({"size": 0}, "not between 1 byte"),
        ({"size": MEMORY + PAGE}, "not between 1 byte"),
        ({"size": "1G"}, "whole number of bytes"),
        ({"size": True}, "whole number of bytes"),
        ({"size": MEMORY // 2, "session": "s99"}, "no session 's99'"),
    ],
    ids=["zero", "above-ram", "string", "bool", "unknown-session"],
)
async def test_a_bad_target_is_refused_and_changes_nothing(
    start_backend: StartBackend, request_extra: dict[str, Any], message: str
) -> None:
    backend = await start_backend(control=True)
    async with MockGuest(backend.guest_options(memory=MEMORY, balloon=True)) as guest:
        path = backend.server.settings.control_socket
        assert path is not None
        reply = await asyncio.to_thread(
            control_request, path, {"cmd": "balloon", **request_extra}, 5.0
        )
        assert reply["ok"] is False and message in reply["error"]
        session = await _session_stats(backend)
        assert session["balloon"]["target_set"] is False
        assert session["balloon"]["target_pages"] == 0
        assert guest.frontend.config_change_msgs == 0
        assert (await _target(backend, MEMORY - 4 * MiB))["ok"]  # the socket works on


async def test_a_target_is_refused_when_the_front_end_cannot_be_told(
    start_backend: StartBackend,
) -> None:
    # Catches: num_pages changed for a guest that will never hear of it.
    backend = await start_backend(control=True)
    options = backend.guest_options(memory=MEMORY, balloon=True, backend_req=False)
    async with MockGuest(options):
        reply = await _target(backend, MEMORY // 2)
        assert reply["ok"] is False and "cannot be told" in reply["error"]
        session = await _session_stats(backend)
        assert session["balloon"]["target_pages"] == 0


async def test_with_two_guests_the_target_names_its_session(start_backend: StartBackend) -> None:
    # Catches: a target applied to whichever session comes first.
    backend = await start_backend(control=True)
    async with (
        MockGuest(backend.guest_options(memory=MEMORY, balloon=True)) as first,
        MockGuest(backend.guest_options(memory=MEMORY, balloon=True)) as second,
    ):
        reply = await _target(backend, MEMORY // 2)
        assert reply["ok"] is False and "name one with --session" in reply["error"]
        reply = await _target(backend, MEMORY - 4 * MiB, session="s2")
        assert reply["ok"] and reply["session"] == "s2"
        assert second.balloon is not None and first.balloon is not None
        await _until(
            "s2's target", lambda: second.balloon is not None and second.balloon.num_pages == 1024
        )
        assert first.balloon.num_pages == 0 and first.frontend.config_change_msgs == 0


def _post(guest: MockGuest, queue: int, buffers: list[Buffer]) -> int:
    vq = guest.driver.queue(queue)
    head = vq.add(buffers)
    guest.frontend.kick(queue)
    return head


async def _used(guest: MockGuest, queue: int, head: int) -> None:
    vq = guest.driver.queue(queue)
    seen: list[int] = []

    def done() -> bool:
        seen.extend(h for h, _ in vq.get_used())
        return head in seen

    await _until(f"head {head} used", done)


# 7. Catches: a hostile or buggy driver's inflate/deflate chain that
# discards pages it does not describe (a writable buffer, a length that is
# not whole PFNs), pages outside guest RAM, pages inflated twice or
# deflated without being inflated miscounted, a chain left unacked, or the
# session ended. The guest's own data (integrity region, other blocks)
# must be intact afterwards, and reports must go on.
async def test_bad_balloon_chains_are_acked_counted_and_discard_nothing_else(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    options = backend.guest_options(memory=MEMORY, balloon=True, balloon_follow=False)
    async with MockGuest(options) as guest:
        balloon = guest.balloon
        assert balloon is not None
        queues = guest.driver.queues
        assert queues is not None
        scratch = balloon.pfns_gpa
        memory = guest.ram.memory
        victim = guest.driver.layout.blocks[0].gpa  # a reportable block the guest owns
        memory.write(victim, b"\x5a" * PAGE)
        held = _ram_held(guest)

        def pfns(*numbers: int) -> int:
            data = struct.pack(f"<{len(numbers)}I", *numbers)
            memory.write(scratch, data)
            return len(data)

        page = victim // PAGE
        # Each chain's array is written only when it is posted: they share the page.
        cases: list[tuple[int, Callable[[], list[Buffer]]]] = [
            (queues.inflate, lambda: [Buffer(scratch, pfns(page), True)]),  # writable
            (queues.inflate, lambda: [Buffer(scratch, 6, False)]),  # not whole PFNs
            (queues.inflate, lambda: [Buffer(1 << 40, 4, False)]),  # the array outside RAM
            (
                queues.inflate,
                lambda: [Buffer(scratch, pfns(MEMORY // PAGE + 10, 0xFFFFFFFF), False)],
            ),
            (queues.deflate, lambda: [Buffer(scratch, pfns(page, page + 1), False)]),  # never in
        ]
        for queue, buffers in cases:
            await _used(guest, queue, _post(guest, queue, buffers()))
        # Two good inflates of the same page: the second is a duplicate.
        for _ in range(2):
            await _used(
                guest,
                queues.inflate,
                _post(guest, queues.inflate, [Buffer(scratch, pfns(page + 7), False)]),
            )
        session = await _session_stats(backend)
        assert session["bad_balloon_chains"] == 3
        assert session["balloon_pfns_outside"] == 2
        assert session["deflate_unknown_pfns"] == 2
        assert session["balloon_duplicate_pfns"] == 1
        assert session["inflated_pages"] == 1
        assert session["state"] == "running" and session["queue_errors"] == 0
        # Only the one page really inflated was given back.
        assert memory.read(victim, PAGE) == b"\x5a" * PAGE
        assert held - _ram_held(guest) <= PAGE
        summary = guest.summary(await guest.run(2))
    assert summary["integrity_ok"] and summary["reports"] == 2
    chains = backend.trace(("inflate", "deflate"))
    reasons = [c["bad_chain"] for c in chains]
    assert "device-writable" in reasons[0] and "whole number of PFNs" in reasons[1]
    assert "outside guest RAM" in reasons[2] and reasons[3:] == ["", "", "", ""]


# 8. Catches: a stats buffer that is not whole 10-byte records taken as a
# sample (garbage stats) or ending the session; the buffer held before it
# not given back (a second buffer while one is held: QEMU returns the first).
async def test_a_bad_stats_buffer_is_held_counted_and_not_a_sample(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(features=STATS_FEATURES)
    options = backend.guest_options(memory=MEMORY, stats=True, balloon_follow=False)
    async with MockGuest(options) as guest:
        balloon = guest.balloon
        queues = guest.driver.queues
        assert balloon is not None and queues is not None and queues.stats is not None
        await _until("the probe's sample", lambda: bool(backend.trace(("stats",))))
        first_head = 0  # the probe's buffer is the first chain of the queue
        head = _post(guest, queues.stats, [Buffer(balloon.stats_gpa, 15, False)])
        await _used(guest, queues.stats, first_head)  # the held one came back
        session = await _session_stats(backend)
        stats = session["guest_stats"]
        assert stats["bad_buffers"] == 1 and "whole number" in stats["last_error"]
        assert stats["samples"] == 1 and session["state"] == "running"
        assert head != first_head
        summary = guest.summary(await guest.run(2))
    assert summary["integrity_ok"] and summary["reports"] == 2


# 9. Catches: the held stats buffer lost when its ring stops (GET_VRING_BASE):
# the driver, which waits for it, would never send stats again.
async def test_the_held_stats_buffer_goes_back_when_its_ring_stops(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend(features=STATS_FEATURES)
    options = backend.guest_options(memory=MEMORY, stats=True, balloon_follow=False)
    async with MockGuest(options) as guest:
        queues = guest.driver.queues
        assert queues is not None and queues.stats is not None
        await _until("the probe's sample", lambda: bool(backend.trace(("stats",))))
        vq = guest.driver.queue(queues.stats)
        assert vq.get_used() == []  # held
        reply = await guest.frontend.request(
            FrontendRequest.GET_VRING_BASE,
            VringState(queues.stats, 0),
            need_reply=False,
            expect_reply=True,
        )
        assert reply is not None and VringState.decode(reply).num == 1
        assert [head for head, _ in vq.get_used()] == [0]


# 10. Catches: a target left set when the front-end refused it, did not
# answer, or broke the channel (the driver would act on it at its next config
# interrupt or reboot), or such a failure ending in a traceback.
@pytest.mark.parametrize("failure", ["refused", "channel-failed"])
async def test_a_target_the_front_end_was_not_told_of_is_undone(
    start_backend: StartBackend, failure: str
) -> None:
    backend = await start_backend(control=True)
    async with MockGuest(backend.guest_options(memory=MEMORY, balloon=True)):
        (session,) = backend.server.sessions.values()

        async def config_changed(*, need_reply: bool) -> bool:
            if failure == "refused":
                return False
            raise ChannelFailed("no reply to CONFIG_CHANGE_MSG within 5 s")

        session.backend_channel.config_changed = config_changed  # type: ignore[method-assign]
        reply = await _target(backend, MEMORY // 2)
        assert reply["ok"] is False and "the target is unchanged" in reply["error"]
        status = (await _session_stats(backend))["balloon"]
        assert status["target_set"] is False and status["target_pages"] == 0
        device = next(iter(backend.server.vhost.devices.values()))
        assert device.config.num_pages == 0


# 11. Catches: two targets set at once (two ctl clients, or launch beside a
# user) taking each other's reply on the backend channel: one waits out the
# reply timeout and fails, and later replies stay out of step.
async def test_two_targets_at_once_are_both_answered(start_backend: StartBackend) -> None:
    backend = await start_backend(control=True)
    async with MockGuest(backend.guest_options(memory=MEMORY, balloon=True)) as guest:
        replies = await asyncio.wait_for(
            asyncio.gather(
                backend.server.set_balloon_target(MEMORY - 4 * MiB),
                backend.server.set_balloon_target(MEMORY - 8 * MiB),
                backend.server.set_balloon_target(MEMORY - 12 * MiB),
            ),
            2.0,
        )
        assert all(reply["ok"] for reply in replies)
        assert guest.frontend.config_change_msgs == 3
        assert (await _target(backend, MEMORY - 16 * MiB))["ok"]  # still in step
        assert guest.balloon is not None
        await _until(
            "the last target", lambda: guest.balloon is not None and guest.balloon.num_pages == 4096
        )


# 12. Catches: the event loop (every session, every vhost-user message, the
# control socket) waiting for a stats batch to finish because the stats
# timer takes a lock the queue thread holds for the batch.
async def test_the_stats_timer_never_waits_for_a_stats_batch(
    start_backend: StartBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = threading.Event()
    release = threading.Event()
    real_parse = parse_stats
    calls = 0

    def slow_parse(chain: Any, memory: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first refill: hold the stats thread in its batch
            held.set()
            release.wait(5.0)
        return real_parse(chain, memory)

    monkeypatch.setattr(device_module, "parse_stats", slow_parse)
    backend = await start_backend(features=STATS_FEATURES, stats_interval_s=0.02)
    async with MockGuest(backend.guest_options(memory=MEMORY, stats=True)):
        assert await asyncio.to_thread(held.wait, 5.0)
        loop = asyncio.get_running_loop()
        worst = 0.0
        end = loop.time() + 0.5
        while loop.time() < end:  # the timer fires ~25 times meanwhile
            before = loop.time()
            await asyncio.sleep(0.01)
            worst = max(worst, loop.time() - before - 0.01)
        release.set()
    assert worst < 0.2, f"the event loop stalled {worst:.3f} s behind a stats batch"
