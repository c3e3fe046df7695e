"""launch --qmp PATH: refused unless QEMU can make it there and the user can
reach it, and never over someone's file or socket (launch removes its QMP
sockets when the run ends)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vhost_balloon.backend.qemu.command import LaunchOptions
from vhost_balloon.backend.qemu.console import GuestConsole
from vhost_balloon.backend.qemu.launch import check_qmp_path
from vhost_balloon.backend.qemu.notes import RunGuestNotes
from vhost_balloon.backend.qemu.provisioning import LaunchError
from vhost_balloon.backend.qemu.summary import launch_failure


def chroot_env(shared: Path) -> dict[str, str]:
    return {"QEMU_MODE": "chroot", "QEMU_SHARED_DIRS": str(shared)}


def test_a_free_path_in_a_shared_folder_is_taken(tmp_path: Path) -> None:
    check_qmp_path(tmp_path / "mine.qmp", chroot_env(tmp_path))


def test_what_exists_is_never_taken(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "other.sock"))
    with listener:
        for path in (precious, tmp_path / "other.sock"):
            with pytest.raises(LaunchError, match="exists: remove it first"):
                check_qmp_path(path, chroot_env(tmp_path))
    assert precious.read_text() == "keep me"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (Path("relative.qmp"), "give an absolute path"),
        (Path("/root/x.qmp"), "QEMU runs in a chroot and sees only"),
        (Path("/tmp/" + "q" * 120), "over the 107 bytes"),
    ],
)
def test_a_path_qemu_or_the_user_cannot_use_is_refused(path: Path, message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        check_qmp_path(path, chroot_env(Path("/tmp")))


def test_a_run_ended_from_outside_before_the_guest_was_done_fails() -> None:
    guest = GuestConsole()
    guest.feed("VB params workload=fill rounds=3", 1.0)

    def failure(interrupted: bool) -> str | None:
        return launch_failure(
            LaunchOptions(baseline=True),
            interrupted=interrupted,
            returncode=0,
            notes=RunGuestNotes(),
            guest=guest,
            server=None,
            records=[],
        )

    assert failure(False) == "QEMU exited before the guest finished its workload"
    assert failure(True) is None  # Ctrl-C: the user stopped it
    guest.feed("VB done t=9", 9.0)
    assert failure(False) is None
