"""The interface between a vhost-user session and the device it serves.

The session knows vhost-user and nothing about reports; the device knows
its queues, features and config and nothing about vhost-user messages
(the split of rust-vmm's VhostUserBackend).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from vhost_balloon.backend.vhost.mapping import MemoryMap
from vhost_balloon.protocol.virtqueue import DeviceQueue


@dataclass(slots=True)
class QueueContext:
    """What a device needs to process one started queue."""

    index: int
    queue: DeviceQueue
    memory_map: MemoryMap
    notify: Callable[[], bool]  # signal the call eventfd; False if there is none
    running: Callable[[], bool]  # False once the ring is being stopped: pop no more


class VirtioDevice(abc.ABC):
    @property
    @abc.abstractmethod
    def max_queues(self) -> int:
        """Queues the device has with every offered feature acked."""

    @abc.abstractmethod
    def offered_features(self) -> int: ...

    @abc.abstractmethod
    def set_features(self, features: int) -> None: ...

    @abc.abstractmethod
    def read_config(self, offset: int, size: int) -> bytes:
        """Raises ValueError for a range outside the config space."""

    @abc.abstractmethod
    def write_config(self, offset: int, data: bytes) -> None:
        """Raises ValueError for a range outside the config space."""

    @abc.abstractmethod
    async def process_queue(self, context: QueueContext, kick_ns: int) -> None:
        """Handle a kick: drain the queue. QueueError propagates to the caller."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget negotiated state (RESET_OWNER / RESET_DEVICE)."""
