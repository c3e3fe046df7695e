"""Where a sweep's points run.

- Here, one after another (the default).
- On a Dask distributed cluster: `--jobs N` starts a local one of N
  single-threaded worker processes, `--executor dask://HOST:PORT` joins a
  running scheduler. Each point runs in a scratch directory of its worker
  and is shipped back whole (backend/experiment/remote.py), so the workers
  need the same vhost-balloon, not the client's filesystem.

Why Dask rather than Ray: a point is one opaque, minutes-long function call
that starts its own processes; Dask runs that with a scheduler and workers
started by two commands (`dask scheduler`, `dask worker ADDRESS`), needs
no object store or cluster runtime, and reschedules the task of a worker
that dies, which is exactly the recovery a sweep wants.

A worker that dies loses only its point: the scheduler gives that task to
another worker. At most as many points as the cluster has threads are
handed out at a time, so a death makes only the points really running on
that worker suspect (Dask gives up on a task after its workers died under
it `distributed.scheduler.allowed-failures` times, 3 by default: the point
is then a failed row, and the rest of the sweep goes on).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vhost_balloon import __version__
from vhost_balloon.backend.experiment.points import point_dir, point_row, write_result
from vhost_balloon.backend.experiment.spec import Point, SpecError

if TYPE_CHECKING:
    from distributed import Client

CONNECT_TIMEOUT_S = 20.0
WORKERS_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Job:
    """A point to run, by its place in the sweep."""

    index: int
    point: Point

    @property
    def label(self) -> str:
        return f"{self.point.kind} {self.point.label} r{self.point.repeat}"


@dataclass(frozen=True)
class Done:
    index: int
    row: dict[str, Any]
    seconds: float


Started = Callable[[Job], None]
RunPoint = Callable[[Point, Path], dict[str, Any]]


class Serial:
    """Every point here, in order: the default."""

    description = "here, one point at a time"

    def __init__(self, run: RunPoint) -> None:
        self._run = run

    def run(self, jobs: Sequence[Job], out: Path, started: Started) -> Iterator[Done]:
        for job in jobs:
            started(job)
            began = time.monotonic()
            row = self._run(job.point, point_dir(out, job.point))
            yield Done(job.index, row, time.monotonic() - began)


def parse_executor(text: str) -> str:
    """`dask://HOST:PORT` as the scheduler's address (tcp://HOST:PORT), or
    SpecError saying what is wrong with it."""
    parts = urlsplit(text)
    if parts.scheme != "dask":
        raise SpecError(f"--executor {text!r}: expected dask://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise SpecError(f"--executor {text!r}: expected dask://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"tcp://{host}:{port}"


def _dask() -> Any:
    try:
        import distributed  # noqa: PLC0415  (an optional dependency)
    except ImportError:
        raise SpecError(
            "running points on Dask needs the distributed package: "
            "pip install 'vhost-balloon[dask]'"
        ) from None
    return distributed


class DaskCluster:
    """Points on a Dask cluster: a local one (`jobs`) or the scheduler at
    `address`. A context manager: the client (and a local cluster) close
    on exit, Ctrl-C included, cancelling what still runs."""

    def __init__(self, *, address: str | None = None, jobs: int | None = None) -> None:
        if (address is None) == (jobs is None):
            raise ValueError("one of address or jobs")
        self._address = address
        self._jobs = jobs
        self._stack = contextlib.ExitStack()
        self.client: Client | None = None
        self.description = ""

    def __enter__(self) -> DaskCluster:
        distributed = _dask()
        try:
            self._open(distributed)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open(self, distributed: Any) -> None:
        # The client's own complaints (a closing comm, a worker lost) are
        # the sweep's business only through the rows it returns.
        for name in ("distributed", "distributed.client", "distributed.scheduler"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        if self._jobs is not None:
            if self._jobs < 1:
                raise SpecError(f"--jobs {self._jobs}: at least 1")
            cluster = self._stack.enter_context(
                distributed.LocalCluster(
                    n_workers=self._jobs,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    memory_limit=0,  # a point's memory is its child processes'
                    silence_logs=logging.CRITICAL,
                )
            )
            address = cluster.scheduler_address
            self.description = f"a local Dask cluster of {self._jobs} workers ({address})"
        else:
            address = self._address
            self.description = f"the Dask scheduler at {address}"
        try:
            client = distributed.Client(address, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            raise SpecError(f"cannot reach the Dask scheduler at {address}: {error}") from None
        self.client = self._stack.enter_context(client)
        try:
            client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
        except (TimeoutError, OSError):
            raise SpecError(
                f"the Dask scheduler at {address} has had no worker for "
                f"{WORKERS_TIMEOUT_S:g} s (start one: dask worker {address})"
            ) from None
        self._check_workers(client)

    def _check_workers(self, client: Client) -> None:
        from vhost_balloon.backend.experiment.remote import worker_facts  # noqa: PLC0415

        try:
            facts: dict[str, dict[str, str]] = client.run(worker_facts)
        except Exception as error:  # a worker that cannot import us at all
            raise SpecError(f"a Dask worker cannot run vhost-balloon: {error}") from None
        wrong = {w: f["version"] for w, f in facts.items() if f["version"] != __version__}
        if wrong:
            listed = ", ".join(f"{w} has {v}" for w, v in sorted(wrong.items()))
            raise SpecError(f"Dask workers run another vhost-balloon than {__version__}: {listed}")

    def check_each_worker(self, check: Callable[[], None]) -> None:
        """Run `check` (raising SpecError) on every worker; the first refusal."""
        assert self.client is not None
        try:
            self.client.run(check)
        except SpecError as error:
            raise SpecError(f"a Dask worker: {error}") from None

    def threads(self) -> int:
        assert self.client is not None
        nthreads: dict[str, int] = self.client.nthreads()  # type: ignore[no-untyped-call]
        return max(1, sum(nthreads.values()))

    def run(self, jobs: Sequence[Job], out: Path, started: Started) -> Iterator[Done]:
        """Hand out at most threads() points at a time; yield each as it
        finishes (in any order), written under `out` by then."""
        from vhost_balloon.backend.experiment.remote import land, run_shipped  # noqa: PLC0415

        distributed = _dask()
        client = self.client
        assert client is not None
        pending = list(reversed(jobs))
        running: dict[Any, tuple[Job, float]] = {}
        finished = distributed.as_completed()

        def submit() -> None:
            job = pending.pop()
            name = point_dir(out, job.point).name
            future = client.submit(
                _run_on_worker, run_shipped, job.point, name, key=f"point-{job.index}-{name}"
            )
            running[future] = (job, time.monotonic())
            finished.add(future)
            started(job)

        try:
            while pending and len(running) < self.threads():
                submit()
            for future in finished:
                job, began = running.pop(future)
                row = self._row(future, job, out, land, distributed)
                yield Done(job.index, row, time.monotonic() - began)
                while pending and len(running) < self.threads():
                    submit()
        finally:
            for future in running:
                future.cancel()

    @staticmethod
    def _row(future: Any, job: Job, out: Path, land: Any, distributed: Any) -> dict[str, Any]:
        directory = point_dir(out, job.point)
        try:
            shipped = future.result()
        except distributed.KilledWorker as error:
            return _failed(job, directory, f"its Dask workers died under it ({error})")
        except Exception as error:  # raised on the worker, outside run_point
            return _failed(job, directory, f"on its Dask worker: {type(error).__name__}: {error}")
        return dict(land(shipped, directory))


def _run_on_worker(run: Callable[[Point, str, str], Any], point: Point, name: str) -> Any:
    """The task: the worker's own address goes into the row."""
    from distributed import get_worker  # noqa: PLC0415

    return run(point, name, get_worker().address)


def _failed(job: Job, directory: Path, error: str) -> dict[str, Any]:
    """The row of a point that never came back, as run_point writes a failure."""
    row = point_row(job.point, directory) | {"status": "failed", "error": error}
    directory.mkdir(parents=True, exist_ok=True)
    write_result(directory, row)
    return row


Executor = Serial | DaskCluster
