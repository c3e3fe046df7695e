"""The vhost-user socket file belongs to the backend that bound it (issue
10, item 5): an exiting backend removes its own socket, never a newer
backend's at the same path; and the file is 0600 whatever the umask."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_balloon.backend.vhost.server import bind_unix, socket_identity, unlink_if_ours

CLI = [sys.executable, "-m", "vhost_balloon.backend"]


def _serve(sock: Path, *args: str, umask: str = "022") -> subprocess.Popen[str]:
    command = [*CLI, "serve", "--socket-path", str(sock), *args]
    return subprocess.Popen(
        ["bash", "-c", f'umask {umask} && exec "$@"', "serve", *command],
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_listening(sock: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(sock))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing ever listened on {sock}") from None
        time.sleep(0.05)


def _stop(server: subprocess.Popen[str]) -> str:
    server.send_signal(signal.SIGINT)
    _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    return stderr


def test_an_exiting_backend_leaves_a_newer_backends_socket(tmp_path: Path) -> None:
    sock = tmp_path / "x.sock"
    first = _serve(sock)
    second = None
    try:
        _wait_listening(sock)
        sock.unlink()  # 2. rm x.sock
        second = _serve(sock)  # 3. B on x.sock
        _wait_listening(sock)
        _stop(first)  # 4. SIGINT A
        assert sock.is_socket(), "A removed B's socket"
        _wait_listening(sock, timeout=1.0)  # and B still answers there
        _stop(second)
        assert not sock.exists(), "B did not remove its own socket"
    finally:
        for server in (first, second):
            if server is not None and server.poll() is None:
                server.kill()
                server.communicate()


def test_unlink_if_ours_keeps_a_file_bound_since(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    old = bind_unix(path)
    path.unlink()
    new = bind_unix(path)
    try:
        assert old.identity != new.identity
        old.close()  # the sock closes, the file is not its own any more
        assert socket_identity(path) == new.identity
        assert not unlink_if_ours(path, old.identity)
    finally:
        new.close()
    assert not path.exists()
    assert not unlink_if_ours(path, new.identity)  # gone already: no error


@pytest.fixture
def no_umask() -> Iterator[None]:
    previous = os.umask(0)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.usefixtures("no_umask")
def test_the_socket_is_0600_under_umask_000_from_its_first_instant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.sock"
    at_chmod = []
    chmod = os.chmod

    def spy(target: Path, mode: int) -> None:  # the mode before the final chmod
        at_chmod.append(_mode(Path(target)))
        chmod(target, mode)

    monkeypatch.setattr(os, "chmod", spy)
    listener = bind_unix(path)
    try:
        assert at_chmod == [0o600]
        assert _mode(path) == 0o600
    finally:
        listener.close()
    assert os.umask(0) == 0  # put back as it was


@pytest.mark.usefixtures("no_umask")
def test_socket_mode_is_what_was_asked(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    listener = bind_unix(path, 0o660)
    try:
        assert _mode(path) == 0o660
    finally:
        listener.close()


@pytest.mark.parametrize(("args", "mode"), [((), 0o600), (("--socket-mode", "0660"), 0o660)])
def test_serve_socket_mode_under_umask_000(
    tmp_path: Path, args: tuple[str, ...], mode: int
) -> None:
    sock = tmp_path / "x.sock"
    server = _serve(sock, *args, umask="000")
    try:
        _wait_listening(sock)
        assert _mode(sock) == mode
    finally:
        _stop(server)


@pytest.mark.parametrize("text", ["999", "0o1777", "rw", "", "-1", "0x1ff"])
def test_a_bad_socket_mode_is_refused(tmp_path: Path, text: str) -> None:
    sock = tmp_path / "x.sock"
    result = subprocess.run(
        [*CLI, "serve", "--socket-path", str(sock), f"--socket-mode={text}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--socket-mode" in result.stderr and "Traceback" not in result.stderr
    assert not sock.exists()
