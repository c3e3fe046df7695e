"""Small helpers for the asyncio stream servers (control socket, metrics)."""

from __future__ import annotations

import asyncio
import contextlib

LINGER_S = 1.0  # how long to drain a client's unread input after an error reply


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the client is still sending: closing with
    unread input sends a reset, which can destroy the reply still in flight."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(LINGER_S):
            while await reader.read(65536):
                pass
