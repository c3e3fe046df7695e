"""The backend request channel (SET_BACKEND_REQ_FD): one request at a time,
and closing it while a request waits for its reply.

Each test names the wrong behaviour it catches.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from vhost_balloon.backend.vhost.backend_channel import BackendChannel, ChannelFailed


def _watched(fd: int) -> bool:
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    return fd in selector.get_map()


async def test_closing_while_a_request_waits_ends_it_and_unwatches_the_fd() -> None:
    # Catches: the socket closed while the waiting request still watches its
    # fd number: a new session that gets the same number is never woken, and
    # the old request's cleanup later removes the new session's reader.
    ours, frontend = socket.socketpair()
    channel = BackendChannel()
    fd = ours.fileno()
    channel.replace(ours)
    waiting = asyncio.ensure_future(channel.config_changed(need_reply=True))
    await asyncio.sleep(0.05)
    assert _watched(fd)
    channel.close()
    with pytest.raises(ChannelFailed, match="closed"):
        await asyncio.wait_for(waiting, 1.0)
    assert not _watched(fd) and not channel.connected
    assert frontend.recv(64)  # the request was sent before the close
    assert frontend.recv(64) == b""  # and then the socket was closed
    frontend.close()


async def test_a_replaced_channel_survives_the_old_ones_failure() -> None:
    # Catches: the old channel's timeout path closing the new channel.
    old, old_peer = socket.socketpair()
    new, new_peer = socket.socketpair()
    channel = BackendChannel()
    channel.replace(old)
    waiting = asyncio.ensure_future(channel.config_changed(need_reply=True))
    await asyncio.sleep(0.05)
    channel.replace(new)  # a new SET_BACKEND_REQ_FD while the old request waits
    with pytest.raises(ChannelFailed):
        await asyncio.wait_for(waiting, 1.0)
    assert channel.connected
    assert await channel.config_changed(need_reply=False) is True
    assert new_peer.recv(64)
    for sock in (old_peer, new_peer):
        sock.close()
    channel.close()
