"""The review's "try to allocate a gigantic page -> fails. Try again -> works",
measured on a loop of attempts (backend/qemu/console.py GiganticAttempt).

- gigantic: a request is a run of failed attempts and the attempt that
  finally got the page. Its retries are the failed attempts, its time to
  success runs from the start of the first failure to the end of the
  success. A run the loop ended before any success is counted apart.
- offline: offline_pages() retries inside one write, until the range is
  isolated: each offline with at least one failed isolation test is a
  request, its retries those failed tests, its time to success the write's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vhost_balloon.backend.qemu.console import GiganticAttempt


def _percentile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def p50_p90_max(values: Sequence[float]) -> dict[str, float] | None:
    """{p50, p90, max} of `values` (None when there are none): the loops'
    per-request figures."""
    if not values:
        return None
    ordered = sorted(values)
    return {"p50": _percentile(ordered, 0.5), "p90": _percentile(ordered, 0.9), "max": ordered[-1]}


def _requests_gigantic(attempts: Sequence[GiganticAttempt]) -> tuple[list[tuple[int, float]], int]:
    """(retries, seconds to success) per request that failed first; and
    how many failed runs never saw a success."""
    requests: list[tuple[int, float]] = []
    first_failure: GiganticAttempt | None = None
    failed = 0
    for attempt in attempts:
        if not attempt.ok:
            if first_failure is None:
                first_failure = attempt
            failed += 1
            continue
        if first_failure is not None and attempt.t_end_mono is not None:
            requests.append((failed, attempt.t_end_mono - first_failure.t_mono))
        first_failure, failed = None, 0
    return requests, int(first_failure is not None)


def _requests_offline(attempts: Sequence[GiganticAttempt]) -> tuple[list[tuple[int, float]], int]:
    requests = [
        (a.retries, a.t_end_mono - a.t_mono)
        for a in attempts
        if a.ok and a.retries and a.t_end_mono is not None
    ]
    return requests, sum(1 for a in attempts if not a.ok)


def try_again(op: str, attempts: Sequence[GiganticAttempt]) -> dict[str, Any] | None:
    """The summary's "try_again" object (docs/qemu.md), or None without the
    guest's per-attempt trace."""
    if not attempts:
        return None
    measure = _requests_offline if op == "offline" else _requests_gigantic
    requests, never = measure(attempts)
    retries = sorted(r for r, _ in requests)
    times_ms = sorted(round(s * 1000, 3) for _, s in requests)

    return {
        "requests_retried": len(requests),
        "never_succeeded": never,
        "retries": p50_p90_max(retries),
        "time_to_success_ms": p50_p90_max(times_ms),
        "time_to_success_samples_ms": times_ms,  # sorted: the CDF
    }


def op_durations_ms(attempts: Sequence[GiganticAttempt]) -> dict[str, float] | None:
    """How long each successful attempt took (offline: the offline_pages()
    write, retries included), p50/p90/max in ms."""
    ordered = sorted(
        (a.t_end_mono - a.t_mono) * 1000 for a in attempts if a.ok and a.t_end_mono is not None
    )
    if not ordered:
        return None
    return {
        "p50": round(_percentile(ordered, 0.5), 3),
        "p90": round(_percentile(ordered, 0.9), 3),
        "max": round(ordered[-1], 3),
        "samples": len(ordered),
    }
