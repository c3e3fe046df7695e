"""vhost-user-balloon as QEMU's vhost-user.rst "Backend program conventions"
ask a backend program to behave, and the discovery descriptor that lets
libvirt find it: real processes, real sockets."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from vhost_balloon import __version__
from vhost_balloon.backend.cli import descriptor
from vhost_balloon.guest.driver import DriverConfig
from vhost_balloon.guest.runner import GuestOptions, MockGuest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "tests/data/vhost-user.schema.json").read_text())
SHIPPED = ROOT / "share/qemu/vhost-user" / descriptor.FILE_NAME
BIN = Path(sys.executable).parent
PROGRAM = BIN / "vhost-user-balloon"
VHOST_BALLOON = BIN / "vhost-balloon"


def validate(instance: Any, definition: str) -> None:
    schema = {**SCHEMA, "$ref": f"#/$defs/{definition}"}
    jsonschema.validate(instance, schema)


def test_the_installed_programs_exist() -> None:
    # The README's bootstrap installs both scripts; every test below runs them.
    assert PROGRAM.is_file() and os.access(PROGRAM, os.X_OK)
    assert VHOST_BALLOON.is_file() and os.access(VHOST_BALLOON, os.X_OK)


@pytest.mark.parametrize(
    "argv",
    [
        [str(PROGRAM), "--print-capabilities"],
        [str(PROGRAM), "--print-capabilities", "--no-such-option", "x"],
        [str(PROGRAM), "--socket-path=/nonexistent/x", "--fd=-5", "--print-capabilities", "word"],
        [str(PROGRAM), "--discard", "sometimes", "--print-capabilities"],
        [str(VHOST_BALLOON), "--print-capabilities"],
        [str(VHOST_BALLOON), "serve", "--print-capabilities"],
        [
            str(VHOST_BALLOON),
            "-v",
            "serve",
            "--discard",
            "nope",
            "--print-capabilities",
            "--fd",
            "x",
        ],
        [str(VHOST_BALLOON), "serve", "--config", "/nonexistent.toml", "--print-capabilities"],
    ],
)
def test_print_capabilities_ignores_every_other_option(argv: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert (result.returncode, result.stderr) == (0, "")
    capabilities = json.loads(result.stdout)
    assert capabilities == {"type": "balloon"}
    validate(capabilities, "VHostUserBackendCapabilities")
    assert list(tmp_path.iterdir()) == []  # it did not start serving anything


def test_print_capabilities_is_not_taken_for_another_command() -> None:
    result = subprocess.run(
        [str(VHOST_BALLOON), "guest", "--print-capabilities"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "vhost-balloon guest: error:" in result.stderr and result.stdout == ""


def test_version_comes_from_one_place() -> None:
    for program in (PROGRAM, VHOST_BALLOON):
        result = subprocess.run(
            [str(program), "--version"], check=False, capture_output=True, text=True
        )
        assert result.returncode == 0
        assert result.stdout.strip() == f"{program.name} {__version__}"
    assert importlib.metadata.version("vhost-balloon") == __version__


# --- serving ---------------------------------------------------------------------


def guest_reports(sock: Path, reports: int = 3) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        options = GuestOptions(
            socket_path=str(sock),
            memory_bytes=128 << 20,
            driver=DriverConfig(report_timeout=10.0, populate=True),
        )
        async with MockGuest(options) as guest:
            return guest.summary(await guest.run(reports))

    return asyncio.run(run())


@pytest.fixture
def stopped() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes the test starts; killed if the test leaves them running."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the backend did not start"
        time.sleep(0.02)


def test_socket_path_serves_and_sigterm_ends_it_cleanly(
    tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    sock = tmp_path / "b.sock"
    backend = subprocess.Popen(
        [str(PROGRAM), f"--socket-path={sock}"], stderr=subprocess.PIPE, text=True
    )
    stopped.append(backend)
    wait_for(sock, backend)
    summary = guest_reports(sock)
    assert summary["reports"] == 3 and summary["freed_bytes"] == summary["reported_bytes"]
    started = time.monotonic()
    backend.send_signal(signal.SIGTERM)
    _, err = backend.communicate(timeout=10)
    assert backend.returncode == 0, err
    assert time.monotonic() - started < 5
    assert not sock.exists()  # the socket it made is removed


def test_fd_that_is_connected_serves_that_front_end_and_exits(
    tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    # As libvirt starts vhost-user-gpu: one end of a connection, passed as --fd.
    path = tmp_path / "qemu.sock"

    async def run() -> tuple[dict[str, Any], int]:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        guest = asyncio.create_task(asyncio.to_thread(guest_reports, path))
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        listener.close()
        with conn:
            backend = subprocess.Popen(
                [str(PROGRAM), f"--fd={conn.fileno()}"],
                pass_fds=[conn.fileno()],
                stderr=subprocess.PIPE,
                text=True,
            )
        stopped.append(backend)
        summary = await guest
        returncode = await asyncio.to_thread(backend.wait, 10)
        return summary, returncode

    summary, returncode = asyncio.run(run())
    assert summary["reports"] == 3 and summary["freed_bytes"] == summary["reported_bytes"]
    assert returncode == 0  # its one front-end left: it ends by itself


def test_fd_that_is_listening_serves_one_front_end_after_another(
    tmp_path: Path, stopped: list[subprocess.Popen[str]]
) -> None:
    sock = tmp_path / "b.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(8)
    with listener:
        backend = subprocess.Popen(
            [str(PROGRAM), "--fd", str(listener.fileno())],
            pass_fds=[listener.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        )
    stopped.append(backend)
    for _ in range(2):
        assert guest_reports(sock, 2)["reports"] == 2
    backend.send_signal(signal.SIGTERM)
    _, err = backend.communicate(timeout=10)
    assert backend.returncode == 0, err
    assert "fd " in err and "serving virtio-balloon" in err


def _fds() -> Iterator[tuple[str, socket.socket | int]]:
    read_end, write_end = os.pipe()
    os.close(write_end)
    yield "a pipe", read_end
    yield "a TCP socket", socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    yield "a datagram unix socket", socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield "an unbound unix socket", socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    shut = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    shut.bind("\0" + f"vb-shut-{os.getpid()}")
    shut.listen(1)
    shut.shutdown(socket.SHUT_RDWR)  # readable for ever, accept() EAGAIN for ever
    yield "a listener that was shut down", shut


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("a pipe", "is not a socket"),
        ("a TCP socket", "is not a unix stream socket"),
        ("a datagram unix socket", "is not a unix stream socket"),
        ("an unbound unix socket", "is a unix socket neither listening nor connected"),
        ("a listener that was shut down", "is a listening socket that was shut down"),
    ],
)
def test_an_fd_that_is_no_vhost_user_socket_is_refused(kind: str, message: str) -> None:
    fds = dict(_fds())
    try:
        given = fds[kind]
        number = given.fileno() if isinstance(given, socket.socket) else given
        result = subprocess.run(
            [str(PROGRAM), f"--fd={number}"],
            pass_fds=[number],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        for fd in fds.values():
            fd.close() if isinstance(fd, socket.socket) else os.close(fd)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"vhost-user-balloon: fd {number} {message}" in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--socket-path=/tmp/a.sock", "--fd=3"], "not allowed with argument --socket-path"),
        ([], "needs --socket-path PATH"),
        (["--fd=x"], "--fd takes a file descriptor number"),
        (["--socket-path=/nonexistent/dir/b.sock"], "/nonexistent/dir/b.sock: No such file"),
    ],
)
def test_a_start_that_cannot_work_fails_early_with_one_line(argv: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [str(PROGRAM), *argv], check=False, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_a_metrics_port_in_use_is_one_sentence(tmp_path: Path) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    with taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(PROGRAM), f"--socket-path={tmp_path / 'b.sock'}", f"--metrics=127.0.0.1:{port}"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
    assert not (tmp_path / "b.sock").exists()


# --- the discovery descriptor ------------------------------------------------------


def test_the_shipped_descriptor_is_valid_and_names_the_distribution_path() -> None:
    shipped = json.loads(SHIPPED.read_text())
    validate(shipped, "VhostUserBackend")
    assert shipped == descriptor.descriptor(descriptor.DISTRIBUTION_BINARY)
    assert SHIPPED.read_text() == descriptor.render(descriptor.DISTRIBUTION_BINARY)


def test_the_package_installs_the_descriptor_and_units() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"share/qemu/vhost-user" = ["share/qemu/vhost-user/50-vhost-user-balloon.json"]' in text
    assert "share/systemd/vhost-user-balloon@.service" in text


def test_descriptor_of_this_installation_names_a_working_binary(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(VHOST_BALLOON), "descriptor"], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    validate(found, "VhostUserBackend")
    assert found["binary"] == str(PROGRAM)
    capabilities = subprocess.run(
        [found["binary"], "--print-capabilities"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(capabilities.stdout)["type"] == found["type"]

    folder = tmp_path / "qemu" / "vhost-user"
    written = subprocess.run(
        [str(VHOST_BALLOON), "descriptor", "--write", str(folder)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == str(folder / descriptor.FILE_NAME)
    assert json.loads((folder / descriptor.FILE_NAME).read_text()) == found
    assert [p.name for p in folder.iterdir()] == [descriptor.FILE_NAME]  # no temporary left


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--binary", "relative/vhost-user-balloon"], "needs an absolute path"),
        (["--binary", "/nonexistent/vhost-user-balloon"], "no such program here"),
    ],
)
def test_descriptor_refuses_a_binary_that_cannot_be_run(argv: list[str], message: str) -> None:
    result = subprocess.run(
        [str(VHOST_BALLOON), "descriptor", *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    "change",
    [
        {"binary": None},
        {"binary": "vhost-user-balloon"},
        {"type": "ballon"},
        {"tags": "CONFIG=y"},
        {"colour": "blue"},
        {"description": None},
    ],
)
def test_the_schema_refuses_what_qemu_would(change: dict[str, Any]) -> None:
    bad = {**descriptor.descriptor(descriptor.DISTRIBUTION_BINARY), **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, "VhostUserBackend")


def test_the_schema_takes_qemus_own_example() -> None:
    # The example in the VhostUserBackend documentation of vhost-user.json.
    example = {
        "description": "QEMU vhost-user-gpu",
        "type": "gpu",
        "binary": "/usr/libexec/qemu/vhost-user-gpu",
        "tags": ["CONFIG_OPENGL_DMABUF=y"],
    }
    validate(example, "VhostUserBackend")
    validate({"type": "gpu", "features": ["render-node", "virgl"]}, "VHostUserBackendCapabilities")
    with pytest.raises(jsonschema.ValidationError):
        validate({"type": "balloon", "features": []}, "VHostUserBackendCapabilities")
