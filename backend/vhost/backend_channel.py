"""The back-end's own channel to the front-end (SET_BACKEND_REQ_FD).

Requests go from the back-end to the front-end on it; today the only one is
CONFIG_CHANGE_MSG, which a device raises through its FrontendLink.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from vhost_balloon.backend.vhost.transport import ConnectionClosed, MessageChannel, close_fds
from vhost_balloon.protocol.errors import MessageError
from vhost_balloon.protocol.vhost_user import (
    U64,
    BackendRequest,
    check_reply,
    encode_backend_request,
)

REPLY_TIMEOUT_S = 5.0


class BackendChannel:
    """Owns the socket the front-end gave (invariant 4); a new one replaces it."""

    def __init__(self) -> None:
        self._channel: MessageChannel | None = None
        # One request at a time: two waiting for replies on one socket would
        # take each other's (and the later ones would stay out of step).
        self._busy = asyncio.Lock()
        # The request waiting for its reply, and on which channel: closing that
        # channel under it must wait until it has stopped watching the fd (a
        # new session may get the same fd number at once).
        self._in_flight: tuple[asyncio.Task[Any], MessageChannel] | None = None

    @property
    def connected(self) -> bool:
        return self._channel is not None

    def replace(self, sock: socket.socket) -> None:
        self.close()
        self._channel = MessageChannel(sock)

    def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is None:
            return
        if self._in_flight is not None and self._in_flight[1] is channel:
            self._in_flight[0].cancel()  # it closes the channel once it has let go of it
        else:
            channel.close()

    async def config_changed(self, *, need_reply: bool) -> bool:
        """Send CONFIG_CHANGE_MSG; with REPLY_ACK, wait for the front-end's ack.

        False when there is no channel or the front-end refused. Raises
        ChannelFailed when the channel broke or no reply came (the channel is
        closed then: a late reply would be taken for the next request's).
        """
        async with self._busy:
            channel = self._channel
            if channel is None:
                return False
            task = asyncio.current_task()
            assert task is not None
            self._in_flight = (task, channel)
            try:
                await channel.send(
                    encode_backend_request(BackendRequest.CONFIG_CHANGE_MSG, need_reply=need_reply)
                )
                if not need_reply:
                    return True
                header, payload, fds = await asyncio.wait_for(channel.receive(), REPLY_TIMEOUT_S)
                close_fds(fds)
                check_reply(header, BackendRequest.CONFIG_CHANGE_MSG)
            except asyncio.CancelledError:
                if self._channel is channel:
                    self._channel = None  # cancelled from outside: out of step, unusable
                    raise
                task.uncancel()  # close() cancelled it: the session is going
                raise ChannelFailed("the backend channel was closed") from None
            except TimeoutError:
                self._forget(channel)
                raise ChannelFailed(
                    f"no reply to CONFIG_CHANGE_MSG within {REPLY_TIMEOUT_S:g} s"
                ) from None
            except (OSError, ConnectionClosed, MessageError) as error:
                self._forget(channel)
                raise ChannelFailed(f"the backend channel failed: {error}") from None
            finally:
                self._in_flight = None
                if self._channel is not channel:
                    channel.close()  # closed or replaced meanwhile: no longer watched
            return len(payload) == 8 and U64.decode(payload).value == 0

    def _forget(self, channel: MessageChannel) -> None:
        # Only the channel that failed: a new one may have replaced it meanwhile.
        if self._channel is channel:
            self._channel = None


class ChannelFailed(Exception):
    """The backend channel broke, or the front-end did not answer on it; it
    is closed (the session goes on without it)."""
