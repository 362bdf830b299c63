"""The byte streams the policy proxy reads HTTP from and writes it to: a socket's asyncio pair,
or TLS the proxy terminates (tls.ServerTLS); h11 reads them with `gateway.http1.next_event`."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import h11

#: How much the proxy reads from a socket (or TLS) at once, and a stream reader's buffer: one
#: size for every connection of the egress path.
READ_CHUNK = 64 << 10


class Stream(Protocol):
    async def read(self) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...


class PlainStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        return await self.reader.read(READ_CHUNK)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()


def send(stream: Stream, conn: h11.Connection, *events: Any) -> None:
    for event in events:
        data = conn.send(event)
        if data:
            stream.write(data)
