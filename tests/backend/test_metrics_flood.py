"""A flood of connections to the metrics port (issue 10, item 9): the
backend, short of fds, must keep serving its vhost-user sessions, keep its
fds bounded, answer a scrape, and not fill its log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vhost_balloon.backend.observe.metrics_http import MAX_CONNECTIONS

CLI = [sys.executable, "-m", "vhost_balloon.backend"]
GUEST = [sys.executable, "-m", "vhost_balloon.guest"]
FD_LIMIT = 128  # the backend's: the flood alone would exhaust it
FLOOD = 400


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_for(what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} never appeared in the log:\n{log.read_text()}")


@contextmanager
def _flood(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections opened and left idle, as a local user would."""
    clients = []
    try:
        for _ in range(count):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))  # EINPROGRESS past the backlog
            clients.append(client)
        yield clients
    finally:
        for client in clients:
            client.close()


def _scrape(port: int, timeout: float) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        return str(reply.read().decode())


def test_a_connection_flood_on_metrics_spares_the_sessions_and_the_log(tmp_path: Path) -> None:
    sock = tmp_path / "b.sock"
    log = tmp_path / "serve.log"
    port = _free_port()
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [
                "bash",
                "-c",
                f'ulimit -n {FD_LIMIT} && exec "$@"',
                "serve",
                *CLI,
                "serve",
                "--socket-path",
                str(sock),
                "--metrics",
                f"127.0.0.1:{port}",
            ],
            stderr=log_file,
        )
    try:
        _wait_for("serving virtio-balloon", log)
        before = _fds(server.pid)
        with _flood(port, FLOOD):
            most = before
            deadline = time.monotonic() + 2.0  # the flood is accepted, or not, by then
            while time.monotonic() < deadline:
                most = max(most, _fds(server.pid))
                time.sleep(0.02)
            assert most <= before + MAX_CONNECTIONS + 2, (before, most)
            guest = subprocess.run(
                [
                    *GUEST,
                    "--socket-path",
                    str(sock),
                    "--memory",
                    "128M",
                    "--reports",
                    "5",
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert guest.returncode == 0, guest.stderr
            assert json.loads(guest.stdout)["reports"] == 5
            # Queued behind the flood's idle connections, a scrape still gets its answer.
            assert "vhost_balloon_reports_total 5" in _scrape(port, timeout=30)
        assert "vhost_balloon_reports_total 5" in _scrape(port, timeout=10)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    text = log.read_text()
    assert server.returncode == 0, text
    assert "Traceback" not in text
    about_metrics = [line for line in text.splitlines() if "metrics" in line]
    assert len(about_metrics) <= 4, text
