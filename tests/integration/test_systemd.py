"""Socket activation, readiness and reloads, with systemd's own activator
(`systemd-socket-activate`, Debian's systemd package) starting the command
line of the shipped unit files: LISTEN_FDS, sd_notify, SIGHUP, SIGTERM."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_conventions import PROGRAM, guest_reports, wait_for
from vhost_balloon.backend.cli.systemd import Notifier
from vhost_balloon.backend.observe.control import control_request

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "share/systemd"
ACTIVATE = shutil.which("systemd-socket-activate")
NOTIFY_TIMEOUT_S = 20.0

if ACTIVATE is None:  # .ci/run installs the systemd package: this fails there
    pytest.fail("systemd-socket-activate is missing: apt-get install systemd", pytrace=False)


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_the_units_are_a_socket_activated_template_pair() -> None:
    socket_unit = unit("vhost-user-balloon@.socket")
    service = unit("vhost-user-balloon@.service")
    assert socket_unit["Socket"]["ListenStream"] == "/run/vhost-user-balloon/%i.sock"
    assert socket_unit["Socket"]["Accept"] == "no"  # one listener, many front-ends
    assert service["Service"]["Type"] == "notify"
    assert service["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Unit"]["Requires"] == "vhost-user-balloon@%i.socket"
    assert shlex.split(service["Service"]["ExecStart"])[0] == "/usr/bin/vhost-user-balloon"


def test_systemd_analyze_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing: apt-get install systemd"
    # An instance of the template, with the program where this checkout has it.
    for name in ("vhost-user-balloon@.socket", "vhost-user-balloon@.service"):
        text = (UNITS / name).read_text().replace("/usr/bin/vhost-user-balloon", str(PROGRAM))
        (tmp_path / name.replace("@.", "@vm1.")).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, sorted(tmp_path.iterdir()))],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [line for line in result.stderr.splitlines() if "vhost-user-balloon" in line]
    assert result.returncode == 0 and problems == [], result.stderr


class NotifySocket:
    """The $NOTIFY_SOCKET systemd would give the service, read by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self) -> dict[str, str]:
        self.sock.settimeout(NOTIFY_TIMEOUT_S)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def activated(
    tmp_path: Path, notify: NotifySocket, sockets: list[Path], config: Path
) -> subprocess.Popen[str]:
    """The service's ExecStart under systemd-socket-activate: it listens on
    `sockets`, and execs the program (same pid) at the first connection."""
    exec_start = shlex.split(unit("vhost-user-balloon@.service")["Service"]["ExecStart"])
    command = [
        str(PROGRAM) if word == "/usr/bin/vhost-user-balloon" else word for word in exec_start
    ]
    command = [str(config) if word == "/etc/vhost-balloon/%i.toml" else word for word in command]
    assert ACTIVATE is not None
    listen = [arg for path in sockets for arg in ("--listen", str(path))]
    process = subprocess.Popen(
        [ACTIVATE, *listen, f"--setenv=NOTIFY_SOCKET={notify.path}", *command],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 20
    while not all(path.exists() for path in sockets):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return process


def test_socket_activation_readiness_reload_and_stop(tmp_path: Path, notify: NotifySocket) -> None:
    sock, control = tmp_path / "vm1.sock", tmp_path / "vm1.ctl"
    config = tmp_path / "vm1.toml"
    elsewhere = tmp_path / "manual.sock"  # the same file may serve a manual start
    config.write_text(
        f'control-socket = "{control}"\ndelay = ["publish=const:1ms"]\n'
        f'socket-path = "{elsewhere}"\nsocket-mode = "0660"\n'
    )
    backend = activated(tmp_path, notify, [sock], config)
    try:
        # The first connection starts it; it serves that guest on systemd's socket.
        summary = guest_reports(sock)
        assert summary["reports"] == 3 and summary["freed_bytes"] == summary["reported_bytes"]
        assert summary["hold_us"]["p50"] >= 1000  # publish=const:1ms is injected
        ready = notify.next()
        assert ready["READY"] == "1"
        assert "fd 3 (from systemd)" in ready["STATUS"]  # systemd's socket wins over the file's
        assert not elsewhere.exists()
        delays = control_request(control, {"cmd": "get"})["settings"]["delay"]
        assert delays == {"publish": "const:1ms"}

        # systemctl reload: SIGHUP reads the file again; delays change at once.
        config.write_text(
            f'control-socket = "{control}"\ndelay = ["publish=const:3ms", "kick=const:1ms"]\n'
            f'socket-path = "{elsewhere}"\n'
        )
        backend.send_signal(signal.SIGHUP)
        reloading = notify.next()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert notify.next()["READY"] == "1"
        delays = control_request(control, {"cmd": "get"})["settings"]["delay"]
        assert delays == {"publish": "const:3ms", "kick": "const:1ms"}
        after = guest_reports(sock, 2)
        assert after["reports"] == 2
        assert after["hold_us"]["p50"] >= 4000  # both delays are injected now

        # A bad file changes nothing, and the service keeps serving.
        config.write_text(
            f'control-socket = "{control}"\ndelay = ["publish=const:-3ms"]\n'
            f'socket-path = "{elsewhere}"\n'
        )
        backend.send_signal(signal.SIGHUP)
        assert notify.next()["RELOADING"] == "1"
        assert notify.next()["READY"] == "1"
        delays = control_request(control, {"cmd": "get"})["settings"]["delay"]
        assert delays == {"publish": "const:3ms", "kick": "const:1ms"}
        assert guest_reports(sock, 1)["reports"] == 1

        # systemctl stop: SIGTERM, STOPPING=1, exit 0.
        backend.send_signal(signal.SIGTERM)
        assert notify.next()["STOPPING"] == "1"
        _, err = backend.communicate(timeout=10)
    finally:
        if backend.poll() is None:
            backend.kill()
            backend.wait()
    assert backend.returncode == 0, err
    assert f"{config}:2: delay = 'publish=const:-3ms'" in err and "nothing changed" in err
    assert "socket-path changed" not in err  # not where it serves: nothing to restart for
    assert sock.exists()  # systemd's socket, not ours to remove


def test_two_sockets_from_systemd_are_refused(tmp_path: Path, notify: NotifySocket) -> None:
    config = tmp_path / "vm1.toml"
    config.write_text("")
    first, second = tmp_path / "a.sock", tmp_path / "b.sock"
    backend = activated(tmp_path, notify, [first, second], config)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(first))  # starts it
        _, err = backend.communicate(timeout=30)
    assert backend.returncode == 2
    assert "vhost-user-balloon: LISTEN_FDS=2: one socket per instance is served" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ("LISTEN_PID=$$ LISTEN_FDS=abc", "LISTEN_FDS='abc' is not a number of file descriptors"),
        ("LISTEN_PID=$$ LISTEN_FDS=0", "LISTEN_FDS=0: one socket per instance"),
        ("LISTEN_PID=x LISTEN_FDS=1", "LISTEN_PID='x' is not a process id"),
        # Another process's variables (a parent's) are not ours: no socket.
        ("LISTEN_PID=1 LISTEN_FDS=1", "needs --socket-path PATH"),
    ],
)
def test_listen_variables_that_do_not_match_are_one_sentence(variables: str, message: str) -> None:
    # exec keeps the shell's pid, so $$ is the backend's own.
    result = subprocess.run(
        ["sh", "-c", f"{variables} exec {shlex.quote(str(PROGRAM))}"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_readiness_is_not_sent_without_notify_socket(tmp_path: Path) -> None:
    # The same program by hand (no systemd): no NOTIFY_SOCKET, nothing sent, no error.
    sock = tmp_path / "b.sock"
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    backend = subprocess.Popen(
        [str(PROGRAM), f"--socket-path={sock}"], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        wait_for(sock, backend)
        backend.send_signal(signal.SIGHUP)  # nothing to read again: logged, still serving
        assert guest_reports(sock, 1)["reports"] == 1
        backend.send_signal(signal.SIGTERM)
        _, err = backend.communicate(timeout=10)
    finally:
        if backend.poll() is None:
            backend.kill()
            backend.wait()
    assert backend.returncode == 0
    assert "started without --config" in err
    assert "cannot notify systemd" not in err


def test_notifier_speaks_the_protocol_and_never_fails_the_service(
    notify: NotifySocket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sender = Notifier({"NOTIFY_SOCKET": str(notify.path)})
    sender.ready("serving on /run/x.sock")
    assert notify.next() == {"READY": "1", "STATUS": "serving on /run/x.sock"}
    sender.stopping()
    assert notify.next() == {"STOPPING": "1"}

    # "@name" is the abstract namespace, as systemd passes it.
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"vb-notify-{os.getpid()}"
    abstract.bind("\0" + name)
    with abstract:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("x")
        abstract.settimeout(5)
        assert abstract.recv(100) == b"READY=1\nSTATUS=x"

    # A socket that is gone: one warning, then silence, and no exception.
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    gone.ready("x")
    gone.stopping()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1
    assert not Notifier({}).enabled


def served_with_config(
    tmp_path: Path, config_text: str, *extra: str
) -> tuple[subprocess.Popen[str], Path, Path, Path]:
    sock, control, config = tmp_path / "b.sock", tmp_path / "c.sock", tmp_path / "b.toml"
    config.write_text(f'control-socket = "{control}"\n' + config_text)
    backend = subprocess.Popen(
        [str(PROGRAM), f"--socket-path={sock}", f"--config={config}", *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(control, backend)
    return backend, sock, control, config


def delay_in_force(control: Path) -> dict[str, str]:
    found: dict[str, str] = control_request(control, {"cmd": "get"})["settings"]["delay"]
    return found


def stop(backend: subprocess.Popen[str]) -> str:
    backend.send_signal(signal.SIGTERM)
    _, err = backend.communicate(timeout=20)
    assert backend.returncode == 0, err
    return err


def test_a_command_line_that_no_longer_parses_changes_nothing(tmp_path: Path) -> None:
    replay = tmp_path / "replay.txt"
    replay.write_text("1ms\n2ms\n")
    backend, sock, control, _ = served_with_config(tmp_path, "", f"--delay=publish=replay:{replay}")
    try:
        replay.unlink()  # the command line's file is gone: argparse would exit
        backend.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while backend.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            if guest_reports(sock, 1)["reports"] == 1:
                break
        assert backend.poll() is None, backend.communicate()[1]
        assert delay_in_force(control) == {"publish": f"replay:{replay}"}
    finally:
        err = stop(backend) if backend.poll() is None else backend.communicate()[1]
    assert "the command line no longer parses" in err
