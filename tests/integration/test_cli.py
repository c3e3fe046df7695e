"""The command line as a user runs it: real processes, real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vhost_balloon.backend.qemu.command import (
    LaunchOptions,
    check_qemu_option_values,
    run_guest_command,
)

CLI = [sys.executable, "-m", "vhost_balloon.backend"]
GUEST = [sys.executable, "-m", "vhost_balloon.guest"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_demo_json_has_the_promised_keys() -> None:
    result = _run("demo", "--guest", "mock", "--json", "--reports", "20", "--memory", "256M")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("reports", "entries", "reported_bytes", "freed_bytes", "hold_us", "discard"):
        assert key in summary
    assert set(summary["hold_us"]) >= {"p50", "p90", "p99", "max"}
    assert summary["reports"] == 20
    assert summary["discard"] == "punch-hole"
    assert summary["freed_bytes"] == summary["reported_bytes"] == 20 * 32 * (2 << 20)
    assert summary["backend"]["freed_bytes"] == summary["freed_bytes"]
    assert 0 < summary["hold_us"]["p50"] <= summary["hold_us"]["max"]


def test_demo_table_is_readable() -> None:
    result = _run(
        "demo",
        "--guest",
        "mock",
        "--reports",
        "5",
        "--memory",
        "128M",
        "--discard",
        "madv-dontneed",
    )
    assert result.returncode == 0, result.stderr
    assert "hold window p50" in result.stdout
    assert "madv-dontneed" in result.stdout
    assert "freed on the host      0 MiB" in result.stdout


def test_print_capabilities() -> None:
    result = _run("serve", "--print-capabilities")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"type": "balloon"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["serve", "--socket-path", "/nonexistent/dir/sock"],
            "/nonexistent/dir/sock: No such file or directory",
        ),
        (["serve", "--fd", "97"], "fd 97 is not open"),
        (["serve", "--fd", "-1"], "--fd takes a file descriptor number (0 or more), not '-1'"),
        (["serve", "--fd", "x"], "not 'x'"),
        (["serve", "--socket-path", "/tmp/" + "s" * 110], "/tmp/sss"),
        (["serve", "--socket-path", "/tmp/" + "s" * 110], "over the 107"),
        (
            ["serve", "--socket-path", "/tmp/never.sock", "--metrics", "nosuchhost.invalid:9464"],
            "metrics address nosuchhost.invalid:9464:",
        ),
        (["serve", "--fd", "0", "--socket-mode", "0600"], "--socket-mode"),
        (
            ["serve", "--socket-path", "/tmp/never.sock", "--control-socket", "/tmp/" + "c" * 110],
            "/tmp/ccc",
        ),
        (["serve"], "needs --socket-path"),
        (["demo", "--memory", "lots"], "memory"),
        (["demo", "--reports", "-3"], "reports"),
        (["demo", "--reports", "99999999999"], "larger than 10000000"),
        (["launch", "--mem", "2T"], "--mem: guest memory '2T' is not between 1 byte and 1T"),
        (
            ["serve", "--socket-path", "/tmp/never.sock", "--control-socket", "/nonexistent/c"],
            "cannot listen on control socket /nonexistent/c: No such file or directory",
        ),
    ],
)
def test_user_errors_are_one_sentence_not_a_traceback(args: list[str], message: str) -> None:
    result = _run(*args, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "internal error" not in result.stderr
    assert "[Errno" not in result.stderr
    assert message in result.stderr


def test_guest_against_a_missing_socket_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [*GUEST, "--socket-path", str(tmp_path / "none.sock"), "--connect-timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "none.sock" in result.stderr


def _wait_for_socket(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


def test_serve_then_guest_then_ctrl_c(tmp_path: Path) -> None:
    sock = tmp_path / "b.sock"
    trace = tmp_path / "trace.jsonl"
    server = subprocess.Popen(
        [*CLI, "serve", "--socket-path", str(sock), "--trace", str(trace)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_socket(sock)
        for _ in range(2):  # one front-end after another
            guest = subprocess.run(
                [
                    *GUEST,
                    "--socket-path",
                    str(sock),
                    "--memory",
                    "128M",
                    "--reports",
                    "3",
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert guest.returncode == 0, guest.stderr
            assert json.loads(guest.stdout)["reports"] == 3
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert not sock.exists()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) == 6
    assert len({r["session"] for r in records}) == 2


def test_serve_on_an_inherited_listening_fd(tmp_path: Path) -> None:
    sock_path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen()
    fd = listener.fileno()
    server = subprocess.Popen(
        [*CLI, "serve", "--fd", str(fd)], pass_fds=[fd], stderr=subprocess.PIPE, text=True
    )
    listener.close()
    try:
        guest = subprocess.run(
            [
                *GUEST,
                "--socket-path",
                str(sock_path),
                "--memory",
                "128M",
                "--reports",
                "2",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert guest.returncode == 0, guest.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0


def test_demo_shows_an_injected_delay_at_once() -> None:
    result = _run(
        "demo",
        "--guest",
        "mock",
        "--json",
        "--reports",
        "10",
        "--memory",
        "128M",
        "--delay",
        "publish=const:5ms",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["hold_us"]["p50"] >= 5000
    assert summary["injected"]["delay"] == {"publish": "const:5ms"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--delay", "publish=bogus:1ms"], "bogus"),
        (["--delay", "sideways=const:1ms"], "sideways"),
        (["--delay", "publish=uniform:3ms..1ms"], "above high"),
        (["--bql", "const:1ms"], "--bql"),
        (["--mmap-contention", "0"], "--mmap-contention"),
        (["--metrics", "localhost:http"], "localhost:http"),
    ],
)
def test_bad_latency_specs_are_rejected_at_start(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = _run("serve", "--socket-path", str(tmp_path / "s.sock"), *args, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "s.sock").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ctl_and_metrics_against_a_running_backend(tmp_path: Path) -> None:
    sock = tmp_path / "b.sock"
    control = tmp_path / "control.sock"
    port = _free_port()
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--socket-path",
            str(sock),
            "--control-socket",
            str(control),
            "--metrics",
            f"127.0.0.1:{port}",
            "--delay",
            "notify=const:1ms",
            "--seed",
            "3",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_socket(control)

        def ctl(*args: str) -> dict[str, object]:
            done = _run("ctl", "--control-socket", str(control), *args, timeout=60)
            assert done.returncode == 0, done.stderr
            reply: dict[str, object] = json.loads(done.stdout)
            return reply

        settings = ctl("get")["settings"]
        assert settings == {**settings, "delay": {"notify": "const:1ms"}, "seed": 3}  # type: ignore[dict-item]
        changed = ctl("set", "--delay", "publish=exp:2ms", "--delay", "notify=none")
        assert changed["settings"]["delay"] == {"publish": "exp:2ms"}  # type: ignore[index]
        guest = subprocess.run(
            [
                *GUEST,
                "--socket-path",
                str(sock),
                "--memory",
                "128M",
                "--reports",
                "4",
                "--json",
                "--control-socket",
                str(control),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert guest.returncode == 0, guest.stderr
        summary = json.loads(guest.stdout)
        assert summary["injected"]["delay"] == {"publish": "exp:2ms"}
        stats = ctl("stats")
        assert stats["totals"]["reports"] == 4  # type: ignore[index]
        refused = _run(
            "ctl",
            "--control-socket",
            str(control),
            "set",
            "--delay",
            "publish=nonsense",
            timeout=60,
        )
        assert refused.returncode == 1 and "nonsense" in refused.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        samples = {
            (sample.name, sample.labels.get("le")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        assert samples[("vhost_balloon_reports_total", None)] == 4
        assert samples[("vhost_balloon_report_hold_seconds_count", None)] == 4
        # exp:2ms at publish: every hold is over 10 us, most over 1 ms
        assert samples[("vhost_balloon_report_hold_seconds_bucket", "1e-05")] == 0
        assert samples[("vhost_balloon_injected_delay_seconds_count", None)] == 4
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    assert server.returncode == 0
    assert not control.exists()
    missing = _run("ctl", "--control-socket", str(control), "stats", timeout=60)
    assert missing.returncode == 2 and str(control) in missing.stderr


def test_running_out_of_fds_does_not_stop_accepting(tmp_path: Path) -> None:
    sock = tmp_path / "b.sock"

    server = subprocess.Popen(
        [
            "bash",
            "-c",
            # Just enough for serve and one guest's session (two memfds, a
            # kick, call and err eventfd per queue and each queue thread's
            # wake eventfd, two sockets); far too few for the 60 clients below.
            'ulimit -n 25 && exec "$@"',
            "serve",
            *CLI,
            "serve",
            "--socket-path",
            str(sock),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_socket(sock)
        clients = []
        refused = 0
        for _ in range(60):  # more than the backend can hold open
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(1.0)  # a full backlog blocks connect
            clients.append(client)
            try:
                client.connect(str(sock))
            except OSError:
                # A full backlog refuses at once (EAGAIN), also while the
                # backend is merely slow to accept: give it three chances.
                refused += 1
                if refused == 3:
                    break
                time.sleep(0.2)
        time.sleep(0.5)
        for client in clients:
            client.close()
        time.sleep(0.5)
        guest = subprocess.run(
            [*GUEST, "--socket-path", str(sock), "--memory", "128M", "--reports", "2", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert guest.returncode == 0, guest.stderr
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert "accepting a front-end failed" in stderr


def test_demo_falls_back_to_the_mocked_guest_without_qemu(tmp_path: Path) -> None:
    env = {**os.environ, "VHOST_BALLOON_CACHE": str(tmp_path / "no-cache")}
    result = subprocess.run(
        [*CLI, "demo", "--json", "--reports", "3", "--memory", "128M"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "no QEMU at hand" in result.stderr and "using the mocked guest" in result.stderr
    assert json.loads(result.stdout)["reports"] == 3
    forced = subprocess.run(
        [*CLI, "demo", "--guest", "qemu"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert forced.returncode == 2 and "no real guest" in forced.stderr


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(argv)
    return found


def test_sigterm_stops_the_mock_demo_and_its_guest_and_cleans_up(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "VHOST_BALLOON_CACHE": str(tmp_path / "no-cache"),  # no QEMU: the mocked guest
        "TMPDIR": str(tmp_path),
    }
    demo = subprocess.Popen(
        [*CLI, "demo", "--json", "--reports", "100000", "--memory", "128M"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("vhost-balloon-*/balloon.sock")):
        assert time.monotonic() < deadline, "the demo never listened"
        time.sleep(0.05)
    time.sleep(1.0)  # the guest is reporting
    demo.send_signal(signal.SIGTERM)
    demo.communicate(timeout=30)
    assert demo.returncode != 0
    assert not list(tmp_path.glob("vhost-balloon-*")), "the temporary directory was left"
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(tmp_path)):
        assert time.monotonic() < deadline, "the guest outlived the demo"
        time.sleep(0.1)


def test_a_second_ctrl_c_does_not_wait_out_an_injected_delay(tmp_path: Path) -> None:
    sock = tmp_path / "b.sock"
    server = subprocess.Popen(
        [*CLI, "serve", "--socket-path", str(sock), "--delay", "report=const:50s"],
        stderr=subprocess.PIPE,
        text=True,
    )
    guest = None
    try:
        _wait_for_socket(sock)
        guest = subprocess.Popen(
            [*GUEST, "--socket-path", str(sock), "--memory", "128M", "--reports", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)  # the report is in its 50 s delay
        server.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert server.poll() is None, "the first Ctrl-C is a clean stop: it waits"
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        if guest is not None:
            guest.kill()
            guest.wait()
    assert server.returncode == 130
    assert "second signal" in stderr
    assert not sock.exists()


def _serve_with_fd(fd: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "serve", "--fd", str(fd)],
        pass_fds=[fd],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_inherited_fd_that_cannot_be_served_is_refused(tmp_path: Path) -> None:
    with (tmp_path / "file").open("w") as regular:
        done = _serve_with_fd(regular.fileno())
        assert done.returncode == 2
        assert f"fd {regular.fileno()} is not a socket" in done.stderr
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram:
        done = _serve_with_fd(datagram.fileno())
        assert done.returncode == 2
        assert f"fd {datagram.fileno()} is not a unix stream socket" in done.stderr
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:  # not listening, not connected
        done = _serve_with_fd(idle.fileno())
        assert done.returncode == 2
        assert f"fd {idle.fileno()} is a unix socket neither listening nor connected" in done.stderr


def test_a_connected_inherited_fd_is_served_until_its_front_end_leaves() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        server = subprocess.Popen(
            [*CLI, "serve", "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        )
        theirs.close()
        ours.close()  # the front-end leaves at once: the backend stops
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert "stopped after 1 sessions" in stderr


def test_bind_errors_name_the_path_and_the_address(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with taken:
        port = taken.getsockname()[1]
        done = _run(
            "serve",
            "--socket-path",
            str(tmp_path / "s.sock"),
            "--metrics",
            f"127.0.0.1:{port}",
            timeout=60,
        )
    assert done.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert not (tmp_path / "s.sock").exists()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    # Root passes any permission check: drop the capabilities that let it.
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    try:
        done = subprocess.run(
            [*drop, *CLI, "serve", "--socket-path", str(locked / "s.sock")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("no setpriv")
    if os.geteuid() == 0 and "setpriv:" in done.stderr:
        pytest.skip(f"cannot drop capabilities here: {done.stderr.strip()}")
    assert done.returncode == 2
    assert f"cannot listen on {locked / 's.sock'}: Permission denied" in done.stderr


def _serve_metrics_log(tmp_path: Path, address: str) -> tuple[subprocess.Popen[str], str]:
    """A backend serving metrics at `address`, and its log once it serves."""
    sock = tmp_path / "b.sock"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [*CLI, "serve", "--socket-path", str(sock), "--metrics", address],
            stderr=out,
            text=True,
        )
    deadline = time.monotonic() + 30
    while "serving virtio-balloon" not in log.read_text():
        assert server.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return server, log.read_text()


def test_metrics_log_their_address_with_the_port_chosen(tmp_path: Path) -> None:
    server, log = _serve_metrics_log(tmp_path, "127.0.0.1:0")
    try:
        match = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", log)
        assert match is not None, log
        port = int(match[1])
        assert port != 0
        assert "reachable from other hosts" not in log
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert b"vhost_balloon_reports_total 0" in reply.read()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    assert server.returncode == 0


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0"])
def test_metrics_on_every_interface_are_warned_about(tmp_path: Path, address: str) -> None:
    if address.startswith("[") and not socket.has_ipv6:
        pytest.skip("no IPv6")
    server, log = _serve_metrics_log(tmp_path, address)
    server.send_signal(signal.SIGINT)
    server.wait(timeout=30)
    host = address.rpartition(":")[0]
    assert re.search(
        rf"WARNING metrics on {re.escape(host)}:\d+ are reachable from other hosts", log
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mem", "512M,maxmem=64G"], "--mem '512M,maxmem=64G' is not a size"),
        (["--mem", "size=1G"], "--mem 'size=1G' is not a size"),
    ],
)
def test_launch_refuses_values_that_would_split_a_qemu_option(
    tmp_path: Path, args: list[str], message: str
) -> None:
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    env = {**os.environ, "VHOST_BALLOON_CACHE": str(tmp_path / "no-cache")}
    done = subprocess.run(
        [*CLI, "launch", *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert done.returncode == 2, done.stderr
    assert message.replace("{tmp}", str(tmp_path)) in done.stderr
    assert "Traceback" not in done.stderr


def test_launch_values_stay_single_arguments() -> None:
    hostile = LaunchOptions(
        mem="1G",
        append="$(touch /tmp/pwned); `id`",
        kernel=Path("/k; rm -rf ~"),
        socket_path=Path("/tmp/b $(id).sock"),
    )
    check_qemu_option_values(hostile)
    command = run_guest_command(hostile, hostile.socket_path)
    assert command[0] == "bash" and command[1].endswith("run-guest.sh")
    assert "$(touch /tmp/pwned); `id`" in command  # one argv element, never a shell line
    assert "/k; rm -rf ~" in command
    assert command[-1] == "/tmp/b $(id).sock"
