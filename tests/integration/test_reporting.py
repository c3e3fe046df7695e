"""Mocked guest <-> backend over a real socket and memfd: free page reporting."""

from __future__ import annotations

import pytest

from tests.conftest import MiB, StartBackend
from vhost_balloon.guest.runner import MockGuest

REPORTS = 6


@pytest.mark.parametrize("discard", ["punch-hole", "madv-remove"])
async def test_freeing_strategies_give_every_reported_byte_back(
    start_backend: StartBackend, discard: str
) -> None:
    backend = await start_backend(discard=discard)
    async with MockGuest(backend.guest_options()) as guest:
        result = await guest.run(REPORTS)
        summary = guest.summary(result)
    reported = summary["reported_bytes"]
    assert summary["reports"] == REPORTS
    assert reported == REPORTS * 32 * 2 * MiB
    # The guest populated every reported page: the memfd must drop by all of it.
    assert summary["freed_bytes"] == reported
    assert summary["zeroed_bytes"] == reported  # the guest reads zeros back
    assert summary["integrity_ok"]
    totals = backend.server.totals()
    assert totals.freed_bytes == reported  # the backend's own accounting agrees
    assert totals.discarded_entries == summary["entries"]


async def test_madv_dontneed_frees_nothing_and_says_so(start_backend: StartBackend) -> None:
    backend = await start_backend(discard="madv-dontneed")
    async with MockGuest(backend.guest_options()) as guest:
        summary = guest.summary(await guest.run(REPORTS))
    assert summary["reports"] == REPORTS
    assert summary["freed_bytes"] == 0  # the pages stay in the memfd
    assert summary["zeroed_bytes"] == 0  # and the guest still sees its data
    assert summary["integrity_ok"]
    totals = backend.server.totals()
    assert totals.freed_bytes == 0
    assert totals.discarded_entries == summary["entries"]  # the syscalls did run
    assert totals.discard_errors == 0


async def test_none_acks_without_discarding(start_backend: StartBackend) -> None:
    backend = await start_backend(discard="none")
    async with MockGuest(backend.guest_options()) as guest:
        summary = guest.summary(await guest.run(3))
    assert summary["reports"] == 3
    assert summary["freed_bytes"] == 0
    assert summary["zeroed_bytes"] == 0
    assert backend.server.totals().discarded_entries == 0
    assert all(record["discard"] == "none" for record in backend.trace())


async def test_a_guest_that_does_not_populate_reports_pages_the_host_no_longer_holds(
    start_backend: StartBackend,
) -> None:
    """--no-populate: the guest reports without writing first (the many-VM
    benchmark); the backend still discards every entry, and frees nothing."""
    backend = await start_backend()
    async with MockGuest(backend.guest_options(populate=False)) as guest:
        before = guest.ram.allocated_bytes()
        summary = guest.summary(await guest.run(REPORTS))
        # Only the guard pages around reported blocks were written, never a block.
        assert guest.ram.allocated_bytes() - before < 2 * MiB
    assert summary["reports"] == REPORTS
    # What is freed is only earlier reports' guard pages that fell in a block.
    assert summary["freed_bytes"] < 2 * MiB < summary["reported_bytes"]
    assert summary["zeroed_bytes"] == 0  # unwritten pages are not read back
    assert summary["integrity_ok"]
    assert backend.server.totals().discarded_entries == summary["entries"]


@pytest.mark.parametrize("capacity", [16, 32])
@pytest.mark.parametrize("order", [9, 10])
async def test_report_sizes_of_2019_and_current_linux(
    start_backend: StartBackend, capacity: int, order: int
) -> None:
    backend = await start_backend()
    async with MockGuest(backend.guest_options(capacity=capacity, order=order)) as guest:
        summary = guest.summary(await guest.run(3))
    trace = backend.trace()
    assert [record["entries"] for record in trace] == [capacity] * 3
    entry = 4096 << order
    for record in trace:
        assert all(length == entry and gpa % entry == 0 for gpa, length in record["ranges"])
    assert summary["freed_bytes"] == 3 * capacity * entry


@pytest.mark.parametrize("indirect", [True, False])
@pytest.mark.parametrize("event_idx", [True, False])
async def test_direct_and_indirect_chains_with_and_without_event_idx(
    start_backend: StartBackend, indirect: bool, event_idx: bool
) -> None:
    backend = await start_backend(notify="event-idx")
    options = backend.guest_options(indirect=indirect, event_idx=event_idx)
    async with MockGuest(options) as guest:
        summary = guest.summary(await guest.run(REPORTS))
    assert summary["indirect"] is indirect
    assert summary["event_idx"] is event_idx
    assert summary["reports"] == REPORTS
    assert summary["freed_bytes"] == summary["reported_bytes"]
    # One report in flight: the driver must be kicked and called once per report.
    assert summary["kicks"] == REPORTS
    assert summary["calls"] >= REPORTS


async def test_two_regions_of_one_memfd_discard_at_their_own_offsets(
    start_backend: StartBackend,
) -> None:
    backend = await start_backend()
    options = backend.guest_options(memory=512 * MiB, regions=2)
    async with MockGuest(options) as guest:
        region_gpas = [region.guest_phys_addr for region in guest.ram.regions]
        # Enough reports to cover both regions.
        summary = guest.summary(await guest.run(8))
    assert len(region_gpas) == 2
    second = region_gpas[1]
    touched_second = any(gpa >= second for record in backend.trace() for gpa, _ in record["ranges"])
    assert touched_second, "no report reached the second region"
    assert summary["freed_bytes"] == summary["reported_bytes"]
    assert summary["integrity_ok"], "a discard hit memory the guest did not report"


async def test_trace_records_every_phase_in_order(start_backend: StartBackend) -> None:
    backend = await start_backend()
    async with MockGuest(backend.guest_options()) as guest:
        result = await guest.run(4)
    trace = backend.trace()
    assert len(trace) == 4
    for record, seen in zip(trace, result.reports, strict=True):
        assert record["entries"] == seen.entries
        assert record["bytes"] == seen.reported_bytes
        assert [gpa for gpa, _ in record["ranges"]] == list(seen.gpas)
        assert (
            record["t_kick_ns"]
            <= record["t_popped_ns"]
            <= record["t_discard_start_ns"]
            <= record["t_discard_done_ns"]
            <= record["t_published_ns"]
            <= record["t_notified_ns"]
        )
        assert (
            0
            < record["discard_syscall_ns"]
            <= (record["t_discard_done_ns"] - record["t_discard_start_ns"])
        )
        assert record["freed_bytes"] == seen.reported_bytes
        # The guest's hold window contains the backend's kick-to-publish time:
        # the guest sees nothing before the publish. Not kick-to-notify:
        # t_notified_ns is read after the eventfd write returns, and in one
        # process the guest's thread may hold the GIL before ours takes it
        # back (a CI run saw the guest's window 0.6 ms shorter).
        assert seen.hold_ns >= record["t_published_ns"] - record["t_kick_ns"]
        assert seen.available_ns <= record["t_kick_ns"]


async def test_poison_val_acks_without_discarding(start_backend: StartBackend) -> None:
    backend = await start_backend()
    options = backend.guest_options(page_poison=True, poison_val=0xAA)
    async with MockGuest(options) as guest:
        summary = guest.summary(await guest.run(3))
    assert summary["reports"] == 3
    assert summary["freed_bytes"] == 0
    assert all(record["poison_ack"] for record in backend.trace())
    assert backend.server.totals().poison_acks == 3


async def test_page_poison_zero_still_discards(start_backend: StartBackend) -> None:
    backend = await start_backend()
    options = backend.guest_options(page_poison=True, poison_val=0)
    async with MockGuest(options) as guest:
        summary = guest.summary(await guest.run(2))
    assert summary["freed_bytes"] == summary["reported_bytes"] > 0


async def test_stop_returns_next_avail_index(start_backend: StartBackend) -> None:
    backend = await start_backend()
    guest = MockGuest(backend.guest_options())
    try:
        await guest.start()
        await guest.run(5)
        bases = await guest.stop()
    finally:
        await guest.close()
    reporting = guest.driver.reporting_queue
    assert bases[reporting] == 5
