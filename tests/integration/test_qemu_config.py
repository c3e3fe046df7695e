"""`vhost-balloon qemu-config`: QEMU arguments and a libvirt domain made from
the offered features; the domain validated by libvirt's own virt-xml-validate."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vhost_balloon.backend.balloon.features import OFFERED_FEATURES, parse_features
from vhost_balloon.backend.cli.qemu_config import QEMU_NAMESPACE, libvirt_domain, qemu_arguments

CLI = [sys.executable, "-m", "vhost_balloon.backend"]
VALIDATE = shutil.which("virt-xml-validate")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "qemu-config", *args], check=False, capture_output=True, text=True, timeout=60
    )


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    assert VALIDATE is not None, "virt-xml-validate is missing: apt-get install libvirt-clients"
    assert shutil.which("xmllint"), "xmllint is missing: apt-get install libxml2-utils"
    return subprocess.run(
        [VALIDATE, str(path), "domain"], check=False, capture_output=True, text=True, timeout=60
    )


def test_qemu_arguments_follow_the_offered_features(tmp_path: Path) -> None:
    result = cli("--socket-path", "/run/vb/a,b.sock", "--memory", "2G")
    assert result.returncode == 0, result.stderr
    arguments = shlex.split(result.stdout)
    assert arguments == qemu_arguments(Path("/run/vb/a,b.sock"), 2 << 30, OFFERED_FEATURES)
    assert "memory-backend-memfd,id=mem,size=2147483648,share=on" in arguments
    assert "socket,id=vhost-balloon,path=/run/vb/a,,b.sock" in arguments  # QEMU's comma escape
    device = arguments[arguments.index("-device") + 1]
    assert "virtio-id=5" in device and "num_vqs=3" in device and "vq_size=64" in device
    with_stats = shlex.split(cli("--features", "+stats-vq").stdout)
    assert "num_vqs=4" in with_stats[with_stats.index("-device") + 1]


def test_the_libvirt_domain_validates_and_carries_the_same_device(tmp_path: Path) -> None:
    result = cli("--format", "libvirt", "--name", "guest-7", "--domain-type", "qemu")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "domain.xml"
    path.write_text(result.stdout)
    checked = validate(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    domain = ET.fromstring(result.stdout)
    assert domain.get("type") == "qemu" and domain.findtext("name") == "guest-7"
    assert domain.find("memoryBacking/source").get("type") == "memfd"  # type: ignore[union-attr]
    assert domain.find("memoryBacking/access").get("mode") == "shared"  # type: ignore[union-attr]
    assert domain.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    given = [a.get("value") for a in domain.iter(f"{{{QEMU_NAMESPACE}}}arg")]
    default = Path("/run/vhost-user-balloon/vm1.sock")
    assert given == qemu_arguments(default, 1 << 30, OFFERED_FEATURES)[4:]


@pytest.mark.parametrize(
    "break_it",
    [
        lambda xml: xml.replace("<os>", "<oss>").replace("</os>", "</oss>"),
        lambda xml: xml.replace('type="memfd"', 'type="paper"'),
        lambda xml: xml.replace("<qemu:arg value=", "<qemu:arg val="),
    ],
)
def test_the_validator_refuses_a_broken_domain(tmp_path: Path, break_it: object) -> None:
    text = libvirt_domain("vm1", Path("/run/x.sock"), 1 << 30, parse_features("+stats-vq"))
    path = tmp_path / "broken.xml"
    path.write_text(break_it(text))  # type: ignore[operator]
    assert validate(path).returncode != 0


def test_bad_input_is_one_sentence() -> None:
    for args, message in (
        (["--memory", "lots"], "'lots' is not a size"),
        (["--features", "+nonsense"], "nonsense"),
        (["--format", "xml"], "invalid choice"),
    ):
        result = cli(*args)
        assert result.returncode == 2 and message in result.stderr
        assert "Traceback" not in result.stderr
