"""The classic balloon on a real Linux 6.12 guest: `launch --balloon SIZE`
reaches the target, QEMU's shared RAM falls by what was inflated, deflating
gives the memory back (the guest fills it again), stats arrive, deflate-on-
oom gives pages back unasked, a poisoning guest's reports are not discarded,
and QEMU's built-in device runs the same steps through QMP.

Each test says, above it, what wrong behaviour makes it fail.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.e2e.conftest import LaunchRun, MiB, run_launch

PAGE_POISON_BIT = 4
# The kernel's own complaint when a page it poisoned reads back otherwise
# (mm/page_poison.c) and other signs of a guest that lost memory it owned.
CORRUPTION = re.compile(r"pagealloc: memory corruption|BUG:|Oops|page allocation failure")


def _balloon(run: LaunchRun) -> dict[str, Any]:
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.summary
    balloon = summary["balloon"]
    print(json.dumps({k: v for k, v in balloon.items() if k != "guest_stats"}, indent=1))
    assert balloon["error"] is None
    assert summary["guest_done"] is True and summary["integrity_ok"] is True
    assert not CORRUPTION.search(run.console), CORRUPTION.search(run.console)
    result: dict[str, Any] = balloon
    return result


# Catches: a target that never reaches the guest's driver; inflated pages
# acked but not given back to the host (QEMU's RSS does not fall); a deflate
# that leaves the guest short of memory (its second fill fails); no stats
# from the stats queue; balloon chains missing from the trace.
@pytest.mark.usefixtures("provisioned")
def test_inflate_gives_memory_to_the_host_and_deflate_gives_it_back(tmp_path: Any) -> None:
    # No free page reporting: the freed fill stays populated, so what the
    # balloon takes is memory the host really held.
    run = run_launch(tmp_path, "--balloon", "384M", "--size", "400", "--features=-reporting")
    balloon = _balloon(run)
    assert balloon["balloon_bytes"] == 128 * MiB
    assert balloon["seconds_to_target"] > 0 and balloon["seconds_to_deflate"] > 0
    freed = balloon["backend"]["inflate_freed_bytes"]
    assert freed >= 0.5 * balloon["balloon_bytes"], "the balloon took mostly unpopulated pages"
    assert balloon["qemu_shared_drop_bytes"] >= 0.9 * freed
    assert balloon["refill_ok"] is True
    assert balloon["backend"]["tracked_bytes"] == 0  # all deflated
    stats = balloon["guest_stats"]
    assert stats["samples"] >= 1 and stats["bad_buffers"] == 0
    assert stats["last"]["stats"]["stat-total-memory"] > 400 * MiB
    kinds = [c["kind"] for c in run.chains]
    inflated = sum(c["pages"] for c in run.chains if c["kind"] == "inflate")
    deflated = sum(c["pages"] for c in run.chains if c["kind"] == "deflate")
    assert inflated == deflated == 128 * MiB // 4096
    # guest_stats is read when the balloon steps end; the guest may post
    # another stats buffer before it powers off, and the trace has it.
    assert stats["samples"] <= kinds.count("stats") <= stats["samples"] + 2
    assert all(c["bad_chain"] == "" for c in run.chains if c["kind"] != "stats")


# Catches: deflate chains the host did not ask for (Linux's OOM notifier)
# refused or miscounted, so the guest OOM-kills instead; a poisoning guest's
# reports discarded (its pages would read back as zeros, and the kernel's
# poison check says "pagealloc: memory corruption").
@pytest.mark.usefixtures("provisioned")
def test_deflate_on_oom_and_a_poisoning_guest(tmp_path: Any) -> None:
    run = run_launch(
        tmp_path,
        "--balloon",
        "256M",
        "--size",
        "300",
        "--balloon-oom",
        "64",
        "--append",
        "init_on_alloc=0 page_poison=1",
    )
    balloon = _balloon(run)
    summary = run.summary
    assert balloon["oom_fill_ok"] is True
    assert balloon["after_oom_ballooned_bytes"] < balloon["balloon_bytes"]
    assert "oom-kill" not in run.console.lower()
    assert PAGE_POISON_BIT in summary["features"]["bits"]
    assert run.trace, "no free page report reached the backend"
    assert all(record["poison_ack"] for record in run.trace)
    assert sum(record["freed_bytes"] for record in run.trace) == 0
    assert balloon["refill_ok"] is True


# Catches: the baseline's QMP path broken (no QMP socket, a wrong command,
# `actual` read the wrong way round), so the two devices cannot be compared.
@pytest.mark.usefixtures("provisioned")
def test_the_builtin_device_runs_the_same_steps_through_qmp(tmp_path: Any) -> None:
    run = run_launch(tmp_path, "--baseline", "--balloon", "384M", "--size", "400")
    balloon = _balloon(run)
    assert balloon["balloon_bytes"] == 128 * MiB
    assert balloon["seconds_to_target"] > 0 and balloon["refill_ok"] is True
    assert balloon["qemu_shared_drop_bytes"] > 0
    assert balloon["guest_stats"]["stats"]["stat-total-memory"] > 400 * MiB
