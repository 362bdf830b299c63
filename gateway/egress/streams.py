"""The byte streams the policy proxy reads HTTP from and writes it to: a socket's asyncio pair,
or TLS the proxy terminates (tls.ServerTLS); and `next_event`, which feeds one to h11."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import h11

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


async def next_event(stream: Stream, conn: h11.Connection) -> Any:
    """The next h11 event of `conn`, reading from `stream` as it needs.

    Raises:
        h11.RemoteProtocolError: the peer broke HTTP/1.1 (h11's bounds included).
    """
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.read())


def send(stream: Stream, conn: h11.Connection, *events: Any) -> None:
    for event in events:
        data = conn.send(event)
        if data:
            stream.write(data)
