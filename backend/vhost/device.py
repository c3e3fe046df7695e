"""The interface between a vhost-user session and the device it serves.

The session knows vhost-user and nothing about reports; the device knows
its queues, features and config and nothing about vhost-user messages
(the split of rust-vmm's VhostUserBackend, which hands the device its vrings).

A device's life, as the session drives it:
- `attach(frontend)` once, before any message: the device may keep the link
  and raise a config change through it at any time;
- features, config reads and writes, `reset()`;
- `queue_started(handle)` when a ring starts; from then on the device may push
  and notify on that queue through the handle, inside a kick or not (a stats
  buffer held and returned later);
- `process_queue(handle, kick_ns)` for each batch of kicks, on the queue's
  own thread (vhost/worker.py): it may block (discards, injected delays),
  and it must not touch the event loop;
- `queue_failed(index, reason)` when the session found the ring malformed;
- `queue_stopped(index)` when the ring stops (GET_VRING_BASE, a new kick fd,
  reset, the end of the session): the handle must not be used afterwards.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol

from vhost_balloon.backend.vhost.mapping import MemoryMap
from vhost_balloon.protocol.virtqueue import DeviceQueue


class FrontendLink(Protocol):
    """What a device may ask of the front-end outside a kick."""

    @property
    def can_change_config(self) -> bool:
        """Whether config_changed can reach the driver (a backend channel and
        the CONFIG protocol feature)."""
        ...

    def lost_memory(self, reason: str) -> None:
        """The guest's memory faulted (MemoryFault): the session must end."""
        ...

    async def config_changed(self) -> bool:
        """Tell the driver the config space changed; False if the front-end
        gave no way to (no backend channel, CONFIG not negotiated) or refused;
        ChannelFailed if the channel broke or no reply came."""
        ...


class QueueHandle:
    """A device's hold on one started queue: its ring, the guest memory the
    ring points into, and the call eventfd.

    The ring is parsed when first asked for, and again after the memory table
    changes, so `queue` and `memory_map` are read afresh at each batch.
    """

    __slots__ = ("_memory_map", "_notify", "_queue", "_running", "index")

    def __init__(
        self,
        index: int,
        *,
        queue: Callable[[], DeviceQueue],
        memory_map: Callable[[], MemoryMap],
        notify: Callable[[], bool],
        running: Callable[[], bool],
    ) -> None:
        self.index = index
        self._queue = queue
        self._memory_map = memory_map
        self._notify = notify
        self._running = running

    @classmethod
    def fixed(
        cls,
        index: int,
        queue: DeviceQueue,
        memory_map: MemoryMap,
        notify: Callable[[], bool] = lambda: True,
        running: Callable[[], bool] = lambda: True,
    ) -> QueueHandle:
        """A handle over one parsed queue (tests, benchmarks)."""
        return cls(
            index,
            queue=lambda: queue,
            memory_map=lambda: memory_map,
            notify=notify,
            running=running,
        )

    @property
    def queue(self) -> DeviceQueue:
        """The parsed ring; raises QueueError if it cannot be parsed."""
        return self._queue()

    @property
    def memory_map(self) -> MemoryMap:
        return self._memory_map()

    def notify(self) -> bool:
        """Signal the call eventfd; False if there is none."""
        return self._notify()

    def running(self) -> bool:
        """False once the ring is stopped, paused or re-parsed: pop no more."""
        return self._running()

    def publish(self, head: int, written: int = 0) -> None:
        """Put one chain on the used ring (the caller decides when to notify)."""
        self._queue().push(head, written)


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
    def process_queue(self, handle: QueueHandle, kick_ns: int) -> None:
        """Handle a kick, on the queue's thread: drain the queue. QueueError
        propagates to the caller."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget negotiated state (RESET_OWNER / RESET_DEVICE)."""

    # The lifecycle hooks below are optional: a device that needs none of them
    # (a sink that only drains its queues on kicks) inherits these no-ops.

    def attach(self, frontend: FrontendLink) -> None:  # noqa: B027
        """The session's link to its front-end, given once before any message."""

    def queue_started(self, handle: QueueHandle) -> None:  # noqa: B027
        """A ring started: the device may keep the handle until queue_stopped."""

    def queue_stopped(self, index: int) -> None:  # noqa: B027
        """The ring stopped: forget its handle."""

    def queue_failed(self, index: int, reason: str) -> None:  # noqa: B027
        """The session found the ring malformed and stopped it (count it)."""
