"""The gateway's agent client against a hostile guest: a scripted peer on a real socketpair.

The guest is untrusted, so everything it can send wrong must end streams with `guest_protocol`
instead of reaching the layers above (or hanging them).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.runtime.agent_client import AgentClient, call_once
from gateway.runtime.base import StreamChannel
from guest_agent.wire import FrameDecoder, ProtocolError, encode_frame


class Guest:
    """The guest's end: reads the gateway's requests, writes whatever the test scripts."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.pending: list[dict[str, Any]] = []

    async def next_request(self) -> dict[str, Any]:
        while not self.pending:
            data = await self.reader.read(65536)
            assert data, "the gateway closed the channel"
            self.decoder.receive_data(data)
            self.pending.extend(self.decoder.messages_received())
        return self.pending.pop(0)

    async def send(self, message: dict[str, Any] | bytes) -> None:
        self.writer.write(message if isinstance(message, bytes) else encode_frame(message))
        await self.writer.drain()


@pytest.fixture
async def pair() -> AsyncIterator[tuple[AgentClient, Guest]]:
    ours, theirs = socket.socketpair()
    client = AgentClient(StreamChannel(*await asyncio.open_connection(sock=ours)), request_timeout=10)
    guest = Guest(*await asyncio.open_connection(sock=theirs))
    hello = asyncio.create_task(client.start())
    request = await guest.next_request()
    await guest.send({"id": request["id"], "result": {"version": 1, "capabilities": ["exec.python"]}})
    await hello
    yield client, guest
    await client.close()
    guest.writer.close()


async def _end_of(client: AgentClient, guest: Guest, *events: dict[str, Any] | bytes) -> dict[str, Any]:
    stream = await client.stream("exec.start", exec_id="e1", language="python", code="1")
    request = await guest.next_request()
    for event in events:
        await guest.send({**event, "id": request["id"]} if isinstance(event, dict) else event)
    async with asyncio.timeout(10):
        return [e async for e in stream][-1]


@pytest.mark.parametrize(
    ("events", "reason"),
    [
        ([{"ev": "start", "seq": 0}, {"ev": "data", "seq": 1, "fd": "stdin", "data": b"x"}], "unknown fd"),
        ([{"ev": "start", "seq": 0}, {"ev": "data", "seq": 1, "fd": "stdout", "data": "text"}], "binary"),
        ([{"ev": "start", "seq": 0}, {"ev": "data", "seq": 5, "fd": "stdout", "data": b"x"}], "seq 5"),
        ([{"ev": "start", "seq": 0}, b"\xff\xff\xff\xff"], "frame header announces"),
        ([{"ev": "start", "seq": 0}, {"op": "exec.start"}], "do not send requests"),
    ],
)
async def test_hostile_guest_ends_streams_with_guest_protocol(
    pair: tuple[AgentClient, Guest], events: list[dict[str, Any] | bytes], reason: str
) -> None:
    client, guest = pair
    end = await _end_of(client, guest, *events)
    assert end["error"]["code"] == "guest_protocol" and reason in end["error"]["message"], end
    assert client.closed.done(), "a guest that breaks the protocol is treated as dead"


async def test_guest_closing_the_channel_ends_streams_with_guest_died(pair: tuple[AgentClient, Guest]) -> None:
    client, guest = pair
    stream = await client.stream("exec.start", exec_id="e1", language="python", code="1")
    await guest.next_request()
    guest.writer.close()
    async with asyncio.timeout(10):
        events = [e async for e in stream]
    assert events[-1]["error"]["code"] == "guest_died"


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ({"error": {"code": "no_such_code", "message": "x"}}, "guest_protocol"),  # was a ValueError in microvm
        ({"error": "not a map"}, "guest_protocol"),
        ({"error": {"code": "busy", "message": "later", "retryable": True}}, "busy"),
        (b"\xff\xff\xff\xff", "guest_protocol"),
        (None, "guest_died"),
    ],
)
async def test_call_once_turns_whatever_a_hostile_guest_answers_into_a_wire_error(
    answer: dict[str, Any] | bytes | None, code: str
) -> None:
    """A runtime's first request to a fresh agent (ping, microVM guest.setup) goes through
    call_once, the one place that handshake lives."""
    ours, theirs = socket.socketpair()
    channel = StreamChannel(*await asyncio.open_connection(sock=ours))
    guest = Guest(*await asyncio.open_connection(sock=theirs))
    try:
        call = asyncio.create_task(call_once(channel, "ping", 10))
        request = await guest.next_request()
        if answer is None:
            guest.writer.close()
        else:
            await guest.send(answer if isinstance(answer, bytes) else {**answer, "id": request["id"]})
        with pytest.raises(ProtocolError) as info:
            await call
        assert info.value.code == code
    finally:
        await channel.close()
        guest.writer.close()
