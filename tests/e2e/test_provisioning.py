"""The provisioned cache is root's: nothing a local user can reach is theirs.

provision.sh once left the guest-package download folder mode 777 and then
unpacked, as root, every .deb found there: a local user could replace the
guest's busybox, which build-initramfs.sh runs on the host as root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _reachable_and_not_roots(cache: Path) -> list[str]:
    """Entries other users can reach (every folder above lets them in) that
    they could write, or that someone other than root owns."""
    bad: list[str] = []
    pending = [cache]
    while pending:
        folder = pending.pop()
        for entry in os.scandir(folder):
            info = entry.stat(follow_symlinks=False)
            if (
                stat.S_ISLNK(info.st_mode)
                or stat.S_ISCHR(info.st_mode)
                or stat.S_ISBLK(info.st_mode)
            ):
                continue
            if info.st_mode & stat.S_IWOTH or info.st_uid != 0:
                bad.append(f"{entry.path} ({stat.filemode(info.st_mode)}, uid {info.st_uid})")
            if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_IXOTH:
                pending.append(Path(entry.path))
    return bad


def test_nothing_others_can_reach_in_the_cache_is_theirs(provisioned: dict[str, str]) -> None:
    cache = Path(provisioned["VB_CACHE"])
    top = cache.stat()
    assert top.st_uid == 0 and not top.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert _reachable_and_not_roots(cache) == []
    if provisioned.get("QEMU_ROOT"):  # the chroot: closed to other users
        assert stat.S_IMODE(Path(provisioned["QEMU_ROOT"]).stat().st_mode) == 0o700


def test_no_download_folder_is_left_behind(provisioned: dict[str, str]) -> None:
    cache = Path(provisioned["VB_CACHE"])
    assert not (cache / "guest" / "debs").exists()
    assert not (cache / "trixie-root" / "var" / "cache" / "vb-guest-debs").exists()


def test_provision_unpacks_only_what_apt_verified() -> None:
    script = (Path(__file__).resolve().parents[2] / "qemu-configs" / "provision.sh").read_text()
    assert "chmod 777" not in script
    assert 'install -d -m 0700 -o root -g root "$DL"' in script
    assert 'for deb in "$DL"/*.deb' not in script  # only the two verified files
    assert "apt-cache show --no-all-versions" in script and "sha256sum" in script
