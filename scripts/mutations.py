#!/usr/bin/env python3
"""Known-dangerous one-line mutations of the invariant code, and whether the
tests written for each invariant catch them.

    .venv/bin/python scripts/mutations.py              # each mutation against its tests
    .venv/bin/python scripts/mutations.py --suite      # ... against the whole fast suite
    .venv/bin/python scripts/mutations.py -k seal      # only mutations whose name has "seal"

Each mutation is applied to a copy of the checkout (the checkout itself is
never touched), then pytest runs the tests that guard its invariant, with a
short per-test timeout so that a mutation which makes a loop spin fails
rather than hangs. A mutation is "caught" when pytest fails, "survived" when
it passes, "BROKEN" when pytest could not even run the tests (the mutation
broke an import: it says nothing about the tests). The unmutated copy must
pass first, or no verdict means anything.
Not part of CI's pass or fail; docs/testing.md quotes its last result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30  # per test, inside the mutated copy


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    invariant: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # the tests written to catch it (pytest node ids)


DEVICE = "backend/balloon/device.py"
DISCARD = "backend/balloon/discard.py"
PLAN = "backend/balloon/report_plan.py"
BALLOONED = "backend/balloon/ballooned.py"
MAPPING = "backend/vhost/mapping.py"
SESSION = "backend/vhost/session.py"
RINGS = "backend/vhost/rings.py"
INJECTION = "backend/latency/injection.py"
VIRTQUEUE = "protocol/virtqueue.py"

ORDER = "tests/backend/test_invariant_publish_order.py"
MEASURED = "tests/backend/test_invariant_measured.py"
PLAN_TESTS = "tests/backend/test_reporting_plan.py"

MUTATIONS = (
    Mutation(
        "publish-before-discard",
        "1: publish only after every discard",
        (
            Edit(
                DEVICE,
                "        result = self._discard(plan, injected)\n",
                "        handle.publish(chain.head)\n"
                "        result = self._discard(plan, injected)\n",
            ),
            Edit(DEVICE, "lambda: handle.publish(head)", "lambda: None"),
        ),
        (ORDER,),
    ),
    Mutation(
        "notify-before-publish",
        "1: signal only what is published",
        (
            Edit(
                DEVICE,
                "lambda: handle.publish(head)",
                "lambda: (self._notify(handle), handle.publish(head))[1]",
            ),
        ),
        (ORDER,),
    ),
    Mutation(
        "a-stopped-ring-does-not-wait-for-its-batch",
        "4: a ring stops (and its fds close) only after its batch has finished",
        (Edit(RINGS, "            await ending.wait_stopped()\n", "            pass\n"),),
        (
            "tests/integration/test_memory_and_blocking.py"
            "::test_a_new_kick_fd_during_a_discard_never_discards_a_report_twice",
            "tests/integration/test_queue_threads.py",
        ),
    ),
    Mutation(
        "a-full-ring-keeps-the-gil",
        "2: a guest flooding its ring cannot keep the event loop (or other sessions)",
        (
            Edit(
                DEVICE,
                "                turns.between_chains()  # a full ring must not keep the GIL\n",
                "                pass\n",
            ),
        ),
        (
            "tests/backend/test_balloon_device.py"
            "::test_a_ring_full_of_skipped_entries_lets_other_work_run",
        ),
    ),
    Mutation(
        "poison-ignored",
        "1: a poisoned page is acked, never discarded",
        (Edit(DEVICE, "poison = self.config.poison_val != 0 and", "poison = False and"),),
        ("tests/integration/test_reporting.py::test_poison_val_acks_without_discarding",),
    ),
    Mutation(
        "injected-delay-is-the-request",
        "5: injected_ns is measured",
        (
            Edit(
                INJECTION,
                "        return sleep_exact_ns(sampler())\n",
                "        requested = sampler()\n"
                "        sleep_exact_ns(requested)\n"
                "        return requested\n",
            ),
        ),
        (f"{MEASURED}::test_injected_delays_are_what_was_slept_not_what_was_asked",),
    ),
    Mutation(
        "entry-delay-is-the-request",
        "5: injected_ns is measured",
        (
            Edit(
                DISCARD,
                "            result.entry_delay_ns += sleep_exact_ns(entry_delays[index])\n",
                "            sleep_exact_ns(entry_delays[index])\n"
                "            result.entry_delay_ns += entry_delays[index]\n",
            ),
        ),
        (f"{MEASURED}::test_per_entry_delays_are_summed_as_slept_around_the_syscalls",),
    ),
    Mutation(
        "only-the-last-syscall-timed",
        "5: discard_syscall_ns sums every entry",
        (
            Edit(
                DISCARD,
                "result.syscall_ns += time.perf_counter_ns() - begin",
                "result.syscall_ns = time.perf_counter_ns() - begin",
            ),
        ),
        (f"{MEASURED}::test_discard_syscall_time_is_the_sum_over_every_entry",),
    ),
    Mutation(
        "one-seal-too-many",
        "2: memfds are sealed against shrinking (exactly that)",
        (
            Edit(
                MAPPING,
                "bool(seals & fcntl.F_SEAL_SHRINK)",
                "seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) == "
                "fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW",
            ),
        ),
        (f"{PLAN_TESTS}::test_a_memfd_is_accepted_exactly_when_sealed_against_shrinking",),
    ),
    Mutation(
        "no-seal-check",
        "2: memfds are sealed against shrinking",
        (
            Edit(
                MAPPING,
                "if self.sealable and not self.sealed_against_shrink and not allow_unsealed:",
                "if False:",
            ),
        ),
        (f"{PLAN_TESTS}::test_a_memfd_is_accepted_exactly_when_sealed_against_shrinking",),
    ),
    Mutation(
        "region-past-its-file",
        "2: no region reaches past the end of its file",
        (Edit(MAPPING, "if info.st_size < end:", "if False:"),),
        (f"{PLAN_TESTS}::test_region_past_the_end_of_its_file_is_refused_and_its_fd_closed",),
    ),
    Mutation(
        "cached-region-crossing-its-end",
        "1: an entry is discarded only if it lies in one region",
        (
            Edit(
                PLAN,
                "cached_start <= addr and addr + length <= cached_end",
                "cached_start <= addr < cached_end",
            ),
        ),
        (f"{PLAN_TESTS}::test_the_cached_region_never_takes_a_range_crossing_its_end",),
    ),
    Mutation(
        "unaligned-start-accepted",
        "1: an entry is discarded only if aligned to its region's granularity",
        (
            Edit(
                PLAN,
                "if file_offset % granularity or length % granularity:",
                "if length % granularity:",
            ),
        ),
        (
            f"{PLAN_TESTS}::test_only_entries_aligned_to_the_granularity_in_start_and_length_"
            "are_discarded",
        ),
    ),
    Mutation(
        "readable-descriptors-reported",
        "1: only device-writable entries are discarded",
        (Edit(PLAN, "        if not flags & DESC_F_WRITE:\n", "        if False:\n"),),
        (f"{PLAN_TESTS}::test_readable_descriptors_are_not_entries",),
    ),
    Mutation(
        "set-mem-table-closes-its-fd-twice",
        "4: every received fd has exactly one owner",
        (
            Edit(
                SESSION,
                "MappedRegion(desc, fds.pop(0), allow_unsealed=self.allow_unsealed_memory)",
                "MappedRegion(desc, fds[0], allow_unsealed=self.allow_unsealed_memory)",
            ),
        ),
        (
            "tests/integration/test_sessions.py"
            "::test_each_mapped_region_owns_exactly_the_fd_it_was_sent",
        ),
    ),
    Mutation(
        "old-table-kept-open",
        "4: every received fd has exactly one owner",
        (Edit(SESSION, "            old.close()\n", "            pass\n"),),
        (
            "tests/integration/test_sessions.py"
            "::test_each_mapped_region_owns_exactly_the_fd_it_was_sent",
        ),
    ),
    Mutation(
        "descriptor-loop-guard-removed",
        "2: a descriptor loop cannot make the backend spin",
        (Edit(VIRTQUEUE, "            if walked > table_size:\n", "            if False:\n"),),
        ("tests/unit/test_virtqueue_malformed.py",),
    ),
    Mutation(
        "head-index-off-by-one",
        "2: indices beyond the queue size are refused",
        (Edit(VIRTQUEUE, "        if head >= self.size:\n", "        if head > self.size:\n"),),
        ("tests/unit/test_virtqueue_malformed.py",),
    ),
    Mutation(
        "event-idx-off-by-one",
        "notification: the EVENT_IDX rule (virtio 2.7.7.2)",
        (
            Edit(
                VIRTQUEUE,
                "return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF",
                "return (new - event_idx) & 0xFFFF < (new - old) & 0xFFFF",
            ),
        ),
        ("tests/unit/test_virtqueue_notify.py",),
    ),
    Mutation(
        "inflate-without-discard",
        "1: an inflate chain's pages are discarded before it is published",
        (
            Edit(
                DEVICE,
                "            result = self._discard(plan, injected)\n",
                "            result = self._discard(BalloonPlan(), injected)\n",
            ),
        ),
        (
            "tests/backend/test_invariant_publish_order.py"
            "::test_nothing_is_published_or_signalled_while_a_discard_is_held",
        ),
    ),
    Mutation(
        "partial-huge-page-discarded",
        "1: a huge page is discarded only when every piece of it is ballooned",
        (
            Edit(
                BALLOONED,
                "                if self._all(gpa >> BALLOON_PFN_SHIFT, pages):\n",
                "                if True:\n",
            ),
        ),
        (
            "tests/backend/test_ballooned_pages.py"
            "::test_a_huge_page_is_discarded_only_once_every_piece_is_ballooned",
        ),
    ),
    Mutation(
        "no-pass-after-a-pause",
        "notification: a batch cut short by a memory change re-enables kicks",
        (Edit(RINGS, "                    thread.kick(now_ns)\n", "                    pass\n"),),
        (
            "tests/integration/test_queue_threads.py"
            "::test_a_memory_change_waits_for_the_report_in_flight",
        ),
    ),
    Mutation(
        "ring-index-stored-with-pack-into",
        "rings: the other side never sees an index field torn or zeroed",
        (
            Edit(
                "protocol/memory.py",
                "        word[0] = value & 0xFFFF\n",
                '        pass\n    struct.Struct("<H").pack_into(buffer, offset, value & 0xFFFF)\n',
            ),
        ),
        ("tests/unit/test_ring_index_atomicity.py",),
    ),
)


def copy_checkout(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files, symlinks kept as links."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        relative = raw.decode()
        source = ROOT / relative
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)


def apply(tree: Path, mutation: Mutation) -> None:
    for edit in mutation.edits:
        path = tree / edit.path
        text = path.read_text()
        if text.count(edit.old) != 1:
            raise SystemExit(
                f"mutation {mutation.name}: {edit.path} has {text.count(edit.old)} copies "
                f"of {edit.old!r} (expected 1): the code moved, update scripts/mutations.py"
            )
        path.write_text(text.replace(edit.old, edit.new))


PYTEST_TESTS_FAILED = 1  # any other non-zero exit: collection error, usage error, ...


def run_tests(tree: Path, tests: list[str]) -> tuple[int, float, str]:
    """(pytest's exit code, seconds, last lines of output) of pytest in the copy."""
    environment = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-o",
        f"timeout={TIMEOUT_S}",
        *tests,
    ]
    start = time.monotonic()
    run = subprocess.run(
        command, cwd=tree, env=environment, capture_output=True, text=True, check=False
    )
    tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-3:])
    return run.returncode, time.monotonic() - start, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="store_true", help="run the whole non-e2e suite")
    parser.add_argument("-k", dest="match", default="", help="only mutations whose name has this")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.match in m.name]
    with tempfile.TemporaryDirectory(prefix="vb-mutations-") as scratch:
        pristine = Path(scratch) / "pristine"
        copy_checkout(pristine)
        probe = subprocess.run(
            [sys.executable, "-c", "import vhost_balloon; print(vhost_balloon.__file__)"],
            cwd=pristine,
            env=dict(os.environ, PYTHONPATH=str(pristine)),
            capture_output=True,
            text=True,
            check=True,
        )
        if not probe.stdout.startswith(str(pristine)):
            raise SystemExit(f"the copy imports vhost_balloon from {probe.stdout.strip()}")
        every_test = sorted({t for m in chosen for t in m.tests})
        baseline = ["-m", "not e2e", "tests"] if args.suite else every_test
        code, seconds, tail = run_tests(pristine, baseline)
        if code != 0:
            print(f"the unmutated tests fail; no verdict is meaningful:\n{tail}")
            return 1
        print(f"unmutated: passed in {seconds:.0f} s\n")
        survived = 0
        for mutation in chosen:
            tree = Path(scratch) / mutation.name
            shutil.copytree(pristine, tree, symlinks=True)
            apply(tree, mutation)
            tests = ["-m", "not e2e", "tests"] if args.suite else list(mutation.tests)
            code, seconds, tail = run_tests(tree, tests)
            # Caught means a test failed; a mutation that breaks collection or
            # the import proves nothing about the tests, so it is not counted.
            verdict = {0: "SURVIVED", PYTEST_TESTS_FAILED: "caught"}.get(code, "BROKEN")
            survived += verdict != "caught"
            print(
                f"{verdict:8}  {mutation.name:36} invariant {mutation.invariant} ({seconds:.0f} s)"
            )
            if verdict != "caught":
                print(f"          {tail}")
            shutil.rmtree(tree)
        print(f"\n{len(chosen) - survived} of {len(chosen)} mutations caught by a failing test")
        return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
