"""Hypothesis fuzzing of the agent leg's gateway role with hostile guest frames (issue 9).

The guest is untrusted: whatever bytes it writes (random msgpack values, event-shaped maps with
wrong types in every field, random frame lengths, truncated frames) must end in exactly one of two
ways: decoded events whose every field has the type the gateway relies on, or the leg failing with
`guest_protocol` (and every open request and stream ended). Never another exception, never a hang,
never a buffer beyond one frame. First the sans-I/O `AgentLeg`, then a real `AgentClient` over a
real socketpair. Example counts stay modest: the suite must stay fast.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.runtime.agent_client import AgentClient
from gateway.runtime.base import StreamChannel
from guest_agent.protocol import GATEWAY, AgentLeg, Reply, StreamEvent
from guest_agent.schema import EVENT_FIELDS, MAX_EVENT_DATA
from guest_agent.wire import DEFAULT_MAX_FRAME, STREAM_EVENTS, FrameDecoder, encode_frame

MAX_FRAME = 128 * 1024  # above a full data event; random lengths reach past it often

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
           | st.text(max_size=20) | st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
#: Data right at the protocol's chunk bound (a drawn 64 KiB binary would be slow to generate).
chunk_sized = st.builds(bytes, st.sampled_from([MAX_EVENT_DATA - 1, MAX_EVENT_DATA, MAX_EVENT_DATA + 1]))
field_names = st.sampled_from(sorted({name for table in EVENT_FIELDS.values() for name in table}
                                     | {"id", "ev", "seq", "result", "error", "op"}))


@st.composite
def event_like(draw: st.DrawFn, rids: tuple[int, ...]) -> dict[str, Any]:
    """A map shaped like an event or reply (plausible id, ev and seq), with hostile field values."""
    message: dict[str, Any] = {"id": draw(st.sampled_from(rids) | st.integers(-5, 2**31 + 5))}
    if draw(st.booleans()):
        message["ev"] = draw(st.sampled_from(STREAM_EVENTS) | st.text(max_size=5))
        message["seq"] = draw(st.integers(-1, 4) | values)
    else:
        message[draw(st.sampled_from(["result", "error"]))] = draw(values)
    message.update(draw(st.dictionaries(field_names, values | chunk_sized, max_size=4)))
    return message


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@st.composite
def hostile_bytes(draw: st.DrawFn, rids: tuple[int, ...]) -> list[bytes]:
    """What a guest writes, already cut into the reads the gateway gets."""
    frames: list[bytes] = []
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["event", "value", "raw", "truncated"]))
        if kind == "event":
            frames.append(_frame(msgpack.packb(draw(event_like(rids)), use_bin_type=True)))
        elif kind == "value":
            frames.append(_frame(msgpack.packb(draw(values), use_bin_type=True)))
        elif kind == "raw":
            length = draw(st.integers(0, 64) | st.sampled_from([MAX_FRAME, MAX_FRAME + 1]) | st.integers(0, 2**32 - 1))
            frames.append(struct.pack(">I", length) + draw(st.binary(max_size=32)))
        else:
            whole = _frame(msgpack.packb(draw(event_like(rids)), use_bin_type=True))
            frames.append(whole[: draw(st.integers(0, len(whole) - 1))])
    data = b"".join(frames)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]


def _check_event(event: Any) -> None:
    """What the layers above the leg rely on, for every event the leg lets through."""
    assert isinstance(event, Reply | StreamEvent), event
    if isinstance(event, Reply):
        assert (event.result is None) != (event.error is None)
        assert event.result is None or isinstance(event.result, dict)
        return
    assert event.ev in STREAM_EVENTS and isinstance(event.seq, int)
    for name, value in event.fields.items():
        assert type(value) in EVENT_FIELDS[event.ev][name], (event.ev, name, value)
    if event.ev == "data":
        assert isinstance(event.fields["data"], bytes) and len(event.fields["data"]) <= MAX_EVENT_DATA
    error = event.fields.get("error")
    if error is not None:
        assert isinstance(error["code"], str) and isinstance(error["message"], str)


def _gateway_leg() -> tuple[AgentLeg, int, int]:
    leg = AgentLeg(GATEWAY, max_frame=MAX_FRAME)
    stream = leg.send_request("exec.start", {"exec_id": "e1", "code": "1"})
    pending = leg.send_request("ping", {})
    leg.data_to_send()
    return leg, stream, pending


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_gateway_leg_survives_hostile_frames(data: st.DataObject) -> None:
    leg, stream, pending = _gateway_leg()
    reads = data.draw(hostile_bytes((stream, pending)))
    events: list[Any] = []
    for chunk in reads:
        leg.receive_data(chunk)  # never raises: a violation fails the leg instead
        events += leg.events_received()
        assert leg._decoder.buffered <= MAX_FRAME + 4 + max(len(c) for c in reads), "at most a frame is buffered"
    for event in events:
        _check_event(event)
    if leg.failure is not None:
        assert leg.failure.code == "guest_protocol", leg.failure
    leg.receive_eof()
    events += leg.events_received()
    ended = {e.id for e in events if isinstance(e, StreamEvent) and e.ev == "end"}
    replied = {e.id for e in events if isinstance(e, Reply)}
    assert stream in ended and pending in replied, "every stream and request ends, whatever the guest sent"


async def _client_against(reads: list[bytes]) -> None:
    ours, theirs = socket.socketpair()
    client = AgentClient(StreamChannel(*await asyncio.open_connection(sock=ours)), request_timeout=5,
                         max_frame=MAX_FRAME, stream_queue_bytes=1024, turn_events=3)
    guest_reader, guest_writer = await asyncio.open_connection(sock=theirs)
    decoder = FrameDecoder(max_frame=DEFAULT_MAX_FRAME)

    async def next_request() -> dict[str, Any]:
        while True:
            for message in decoder.messages_received():
                return message
            data = await guest_reader.read(65536)
            assert data, "the gateway closed the channel"
            decoder.receive_data(data)

    try:
        async with asyncio.timeout(10):  # a hang fails here
            hello = asyncio.create_task(client.start())
            request = await next_request()
            guest_writer.write(encode_frame({"id": request["id"], "result": {"version": 1, "capabilities": []}}))
            await hello
            stream = await client.stream("exec.start", exec_id="e1", code="1")
            await next_request()
            for chunk in reads:
                guest_writer.write(chunk)
            guest_writer.write_eof()
            events = []
            async for event in stream:
                events.append(event)
                assert stream.queued_bytes <= max(stream.max_bytes, 0) + MAX_FRAME * 2
            assert events[-1]["ev"] == "end"
            error = await client.closed
            assert error.code in ("guest_protocol", "guest_died"), error
    finally:
        await client.close()
        guest_writer.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_agent_client_over_a_socketpair_survives_hostile_frames(data: st.DataObject) -> None:
    # The first stream op the client sends gets id 2 (hello is 1).
    reads = data.draw(hostile_bytes((2, 3)))
    asyncio.run(_client_against(reads))
