"""QEMU's shared RAM as launch samples it: periodically, and at each fill
round's console line, where a peak between two periodic samples would be
missed (a 2 MiB huge page faults in fast); what each round gave back is
the fall from the sample at its free."""

from __future__ import annotations

import os

from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.sampler import MemorySampler, memory_given_back


def test_a_fill_rounds_lines_are_sampled_and_other_lines_are_not() -> None:
    sampler = MemorySampler()
    sampler.on_console_line("VB round=1 filled_mib=200 t=3.0 memfree_kib=1", 1.0)
    assert sampler.samples == []  # no QEMU yet: nothing to read
    sampler.pid = os.getpid()  # any process has a status with RssShmem
    sampler.on_console_line("[    3.1] VB round=1 filled_mib=200 t=3.0 memfree_kib=1", 2.0)
    sampler.on_console_line("VB report_us=12.0 t_start_mono=1.0 cpu=0", 2.1)
    sampler.on_console_line("[    3.2] VB round=1 freed t=3.1 memfree_kib=1", 2.2)
    assert [t for t, _ in sampler.samples] == [2.0, 2.2]


def test_the_peak_at_the_filled_line_decides_what_was_given_back() -> None:
    guest = GuestConsole()
    for line, t in (
        ("VB round=1 fill_start t=1 memfree_kib=1", 1.0),
        ("VB round=1 filled_mib=200 t=2 memfree_kib=1", 2.0),
        ("VB round=1 freed t=2.1 memfree_kib=1", 2.1),
    ):
        guest.feed(line, t)
    sampler = MemorySampler()
    # Periodic samples: mid-fill (184 MiB), then after the reports (110 MiB);
    # the line-triggered one saw the peak.
    sampler.samples = [(1.9, 184 << 10), (2.0, 300 << 10), (2.1, 300 << 10), (6.0, 110 << 10)]
    (item,) = memory_given_back(guest, sampler)
    assert item["shared_kib_at_free"] == 300 << 10
    assert item["given_back_bytes"] == 190 << 20
