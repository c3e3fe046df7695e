"""`vhost-balloon qemu-config`: what QEMU (or libvirt) needs to use this
backend, made from the features it offers, so the queue count and the
device's properties always match what `serve` negotiates:

- `--format qemu`: the command-line arguments (shared memfd RAM, the
  chardev, `vhost-user-test-device-pci` with virtio-id 5 and num_vqs);
- `--format libvirt`: a whole domain whose RAM is a shared memfd
  (`<memoryBacking>`), with libvirt's own balloon turned off and the device
  given to QEMU through `<qemu:commandline>` (libvirt has no element for a
  generic vhost-user device). Valid for `virt-xml-validate`.
"""

from __future__ import annotations

import argparse
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from vhost_balloon.backend.balloon.features import qemu_device_properties
from vhost_balloon.backend.cli.options import add_features_option
from vhost_balloon.protocol.units import argument_type, parse_size

QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
CHARDEV_ID = "vhost-balloon"
VQ_SIZE = 64  # QEMU's default; Linux enables reporting only from 32 up
DEFAULT_SOCKET = Path("/run/vhost-user-balloon/vm1.sock")  # the systemd unit's, for vm1


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "qemu-config",
        help="print the QEMU arguments (or a libvirt domain) that use this backend",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--format", choices=("qemu", "libvirt"), default="qemu")
    parser.add_argument(
        "--socket-path",
        type=Path,
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"the backend's socket (default {DEFAULT_SOCKET}, the systemd unit's for vm1)",
    )
    parser.add_argument(
        "--memory",
        type=argument_type(parse_size),
        default=1 << 30,
        metavar="SIZE",
        help="guest RAM (default 1G); shared memfd, which the backend needs",
    )
    parser.add_argument("--name", default="vm1", help="libvirt: the domain's name (vm1)")
    parser.add_argument(
        "--domain-type",
        choices=("kvm", "qemu"),
        default="kvm",
        help="libvirt: kvm, or qemu (TCG) on a host that cannot run KVM",
    )
    add_features_option(parser)  # as serve's: the device then matches what serve offers


def ram_arguments(memory_bytes: int) -> list[str]:
    """Guest RAM the backend can map: a shared memfd (libvirt makes its own)."""
    return [
        "-machine",
        "q35,memory-backend=mem",
        "-object",
        f"memory-backend-memfd,id=mem,size={memory_bytes},share=on",
    ]


def device_arguments(socket_path: Path, features: int) -> list[str]:
    """The chardev to the backend and the device on it."""
    device = (
        f"vhost-user-test-device-pci,chardev={CHARDEV_ID},"
        f"{qemu_device_properties(features)},vq_size={VQ_SIZE}"
    )
    return [
        "-chardev",
        f"socket,id={CHARDEV_ID},path={_qemu_option(str(socket_path))}",
        "-device",
        device,
    ]


def qemu_arguments(socket_path: Path, memory_bytes: int, features: int) -> list[str]:
    """The arguments that add guest RAM the backend can map and the device."""
    return ram_arguments(memory_bytes) + device_arguments(socket_path, features)


def libvirt_domain(
    name: str, socket_path: Path, memory_bytes: int, features: int, domain_type: str = "kvm"
) -> str:
    ET.register_namespace("qemu", QEMU_NAMESPACE)
    domain = ET.Element("domain", {"type": domain_type})
    ET.SubElement(domain, "name").text = name
    memory = ET.SubElement(domain, "memory", {"unit": "KiB"})
    memory.text = str(memory_bytes // 1024)
    backing = ET.SubElement(domain, "memoryBacking")
    ET.SubElement(backing, "source", {"type": "memfd"})
    ET.SubElement(backing, "access", {"mode": "shared"})
    ET.SubElement(domain, "vcpu").text = "2"
    os_element = ET.SubElement(domain, "os")
    ET.SubElement(os_element, "type", {"arch": "x86_64", "machine": "q35"}).text = "hvm"
    devices = ET.SubElement(domain, "devices")
    # libvirt adds QEMU's own virtio-balloon unless told not to.
    ET.SubElement(devices, "memballoon", {"model": "none"})
    commandline = ET.SubElement(domain, f"{{{QEMU_NAMESPACE}}}commandline")
    # libvirt makes the RAM backend itself: only the chardev and the device.
    for argument in device_arguments(socket_path, features):
        ET.SubElement(commandline, f"{{{QEMU_NAMESPACE}}}arg", {"value": argument})
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def run(args: argparse.Namespace) -> int:
    if args.format == "libvirt":
        domain = libvirt_domain(
            args.name, args.socket_path, args.memory, args.features, args.domain_type
        )
        print(domain, end="")
    else:
        arguments = qemu_arguments(args.socket_path, args.memory, args.features)
        print(" ".join(shlex.quote(a) for a in arguments))
    return 0


def _qemu_option(value: str) -> str:
    """A value inside a QEMU option list: a comma is written twice."""
    return value.replace(",", ",,")
