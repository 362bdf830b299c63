"""The gateway's end of the agent leg: an asyncio I/O layer over the sans-I/O `AgentLeg`.

The leg (guest_agent/protocol.py) decides everything: request ids, which replies and stream events
are valid, sequence numbers, what a failure ends. This module only moves bytes between it and a
runtime's `ByteChannel` and hands its events to whoever waits for them: a future per request, a
bounded queue per stream. The guest is untrusted; nothing here waits without a deadline except a
stream's consumer, and a stream always ends (with the agent's `end`, or with the leg's failure end).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from gateway.runtime.base import ByteChannel
from guest_agent.protocol import GATEWAY, AgentLeg, Reply, StreamEvent, event_size
from guest_agent.wire import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, ProtocolError

log = logging.getLogger(__name__)

#: Bytes of events a stream may hold before the reader stops reading the channel (backpressure).
STREAM_QUEUE_BYTES = 256 * 1024
#: Frames of one sandbox's channel decoded per turn of the event loop before its reader lets the
#: other tasks run; a stream's queue holds as many events (so its consumer's turn is as short).
TURN_EVENTS = 8
S = TypeVar("S", bound="AgentStream")

class AgentStream:
    """The events of one stream op, in order, ending with `end` (always, even if the guest dies).

    Its queue is bounded in bytes (and events): the reader waits while the next event would take
    it past `max_bytes` or `max_events` (an empty queue takes any one event), and so stops
    reading the channel: a guest that writes faster than the consumer takes is held back in its
    pipe, not in the gateway's memory."""

    def __init__(self, client: AgentClient, request_id: int, max_bytes: int = STREAM_QUEUE_BYTES,
                 max_events: int = TURN_EVENTS) -> None:
        self._client = client
        self.request_id = request_id
        self.max_bytes = max_bytes
        self.max_events = max_events
        self._queue: deque[tuple[dict[str, Any], int]] = deque()
        self.queued_bytes = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.finished = False

    def _full(self, cost: int) -> bool:
        return bool(self._queue) and (self.queued_bytes + cost > self.max_bytes
                                      or len(self._queue) >= self.max_events)

    async def _put(self, message: dict[str, Any]) -> None:
        cost = event_size(message)
        while self._full(cost) and not self.finished:
            self._room.clear()
            await self._room.wait()
        if not self.finished:
            self._append(message, cost)

    def _put_now(self, message: dict[str, Any]) -> None:
        """Deliver without waiting (the channel is gone): the end matters more than what the
        consumer has not taken yet, so queued data makes room for it."""
        cost = event_size(message)
        while self._full(cost):
            self.queued_bytes -= self._queue.popleft()[1]
        self._append(message, cost)

    def _append(self, message: dict[str, Any], cost: int) -> None:
        self._queue.append((message, cost))
        self.queued_bytes += cost
        self._readable.set()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        while not self.finished:
            while not self._queue:
                self._readable.clear()
                await self._readable.wait()
            message, cost = self._queue.popleft()
            self.queued_bytes -= cost
            self._room.set()
            if message["ev"] == "end":
                self.finished = True
            yield message

    def discard(self) -> None:
        """Stop delivering this stream's events (its consumer is gone) so the channel never stalls."""
        self.finished = True
        self._queue.clear()
        self.queued_bytes = 0
        self._room.set()
        self._client._forget(self.request_id)


class AgentClient:
    """Multiplexes requests and streams to one guest agent."""

    def __init__(
        self,
        channel: ByteChannel,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        request_timeout: float = 30.0,
        death_reason: Callable[[], Awaitable[str]] | None = None,
        stream_queue_bytes: int = STREAM_QUEUE_BYTES,
        turn_events: int = TURN_EVENTS,
    ) -> None:
        self._channel = channel
        self.stream_queue_bytes = stream_queue_bytes
        self.turn_events = turn_events
        self._leg = AgentLeg(GATEWAY, max_frame=max_frame)
        self.request_timeout = request_timeout
        self._death_reason = death_reason
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._streams: dict[int, AgentStream] = {}
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self.closed: asyncio.Future[ProtocolError] = asyncio.get_running_loop().create_future()
        self.hello: dict[str, Any] = {}

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(self.hello.get("capabilities", ()))

    async def start(self, timeout: float = 30.0) -> dict[str, Any]:
        """Start reading and shake hands; returns the agent's hello result."""
        self._reader = asyncio.create_task(self._read_loop(), name="agent-reader")
        hello = await self.request("hello", timeout=timeout, version=PROTOCOL_VERSION)
        self.hello = check_hello(hello)
        return hello

    async def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply; raises the agent's error as ProtocolError."""
        self._check_open()
        request_id = self._leg.send_request(op, fields)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            # The write is under the deadline too: an agent that takes no input (busy, wedged)
            # must not hold its caller (a session's queue of keystrokes) forever.
            async with asyncio.timeout(timeout if timeout is not None else self.request_timeout):
                await self._flush()
                reply = await future
        except TimeoutError:
            raise ProtocolError("timeout", f"the agent did not answer {op} in time") from None
        finally:
            if self._pending.pop(request_id, None) is not None:
                self._leg.forget(request_id)
        if reply.error is not None:
            raise reply.error
        assert reply.result is not None
        return reply.result

    async def stream(self, op: str, **fields: Any) -> AgentStream:
        """Send a stream request; iterate the returned stream for its events."""
        return await self.open_stream(op, lambda client, rid: AgentStream(client, rid, self.stream_queue_bytes,
                                                                          self.turn_events), **fields)

    async def open_stream(self, op: str, make: Callable[[AgentClient, int], S], **fields: Any) -> S:
        """Send a stream request whose events go to the stream `make(self, request_id)` returns: an
        `AgentStream` or a subclass that takes its events its own way (a published port's
        connection, gateway/ports/tunnel.py, which bounds them by credit instead of waiting)."""
        self._check_open()
        request_id = self._leg.send_request(op, fields)
        stream = self._streams[request_id] = make(self, request_id)
        await self._flush()
        return stream

    async def notify(self, op: str, **fields: Any) -> None:
        """Send a request whose answer nobody waits for (its reply is dropped when it comes): a
        connection's credit, which must not cost a round trip per grant. Raises what sending raises."""
        self._check_open()
        self._leg.forget(self._leg.send_request(op, fields))
        await self._flush()

    def _check_open(self) -> None:
        if self.closed.done():
            raise self.closed.result()

    def _forget(self, request_id: int) -> None:
        self._streams.pop(request_id, None)
        self._leg.forget(request_id)

    async def _flush(self) -> None:
        async with self._write_lock:
            data = self._leg.data_to_send()
            if not data:
                return
            try:
                await self._channel.write(data)
            except (ConnectionError, OSError) as exc:
                raise ProtocolError("guest_died", f"channel to the agent failed: {exc}") from None

    async def _read_loop(self) -> None:
        error: ProtocolError | None = None
        try:
            while True:
                data = await self._channel.read()
                if not data:
                    error = ProtocolError("guest_died", "the sandbox's agent closed its channel")
                    break
                # A turn's share at a time, then the other tasks run: a guest writing tiny frames
                # as fast as it can must not hold the event loop that serves every tenant. What
                # is not read yet waits in the pipe, so the guest feels it as backpressure.
                # (A batch that did not use its whole share needs no extra yield: the next read
                # waits for the pipe, which lets the others run, or returns the little that came.)
                more = self._leg.receive_data(data, self.turn_events)
                while self._leg.failure is None:  # else the guest broke the protocol
                    for event in self._leg.events_received():
                        await self._dispatch(event)
                    if not more:
                        break
                    await asyncio.sleep(0)
                    more = self._leg.receive_data(b"", self.turn_events)
                if self._leg.failure is not None:
                    break
        except (ConnectionError, OSError) as exc:
            error = ProtocolError("guest_died", f"channel to the agent failed: {exc}")
        except Exception as exc:  # a bug here must still end every stream, never hang them
            log.exception("agent reader failed")
            error = ProtocolError("internal", f"agent reader failed: {type(exc).__name__}")
        except asyncio.CancelledError:
            self._leg.fail(ProtocolError("guest_died", "the sandbox was closed"))
            self._fail_all()
            raise
        if error is not None and error.code == "guest_died" and self._death_reason is not None:
            try:  # the runtime knows why (a CPU or memory limit, a crash): say it in every end
                async with asyncio.timeout(5):
                    error = ProtocolError(error.code, f"{error.message} ({await self._death_reason()})")
            except TimeoutError:
                pass
        if error is not None:
            self._leg.receive_eof(error)
        self._fail_all()

    async def _dispatch(self, event: Reply | StreamEvent) -> None:
        """Hand one event of a healthy leg to whoever waits for it (a full stream queue waits:
        that is the backpressure on the guest)."""
        if isinstance(event, Reply):
            future = self._pending.get(event.id)
            if future is not None and not future.done():
                future.set_result(event)
            return
        stream = self._streams.get(event.id)
        if stream is not None:
            if event.ev == "end":
                self._streams.pop(event.id, None)
            await stream._put(event.to_message())

    def _fail_all(self) -> None:
        """The leg failed: deliver what it decoded up to the failure and its synthetic ends at once
        (never waiting on a consumer), then fail whatever is still waiting."""
        error = self._leg.failure
        assert error is not None
        for event in self._leg.events_received():
            if isinstance(event, Reply):
                future = self._pending.get(event.id)
                if future is not None and not future.done():
                    future.set_exception(event.error or error)
            elif (stream := self._streams.get(event.id)) is not None:
                stream._put_now(event.to_message())
                if event.ev == "end":
                    self._streams.pop(event.id, None)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for stream in list(self._streams.values()):  # defensive: the leg ended every stream it knew
            stream._put_now({"id": stream.request_id, "ev": "end", "seq": 0, "exit_code": None, "signal": None,
                             "error": error.to_wire()})
        self._streams.clear()
        if not self.closed.done():
            self.closed.set_result(error)

    async def close(self) -> None:
        """Stop reading and close the channel; every open stream ends with guest_died."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        if self._leg.failure is None:
            self._leg.fail(ProtocolError("guest_died", "the sandbox was closed"))
            self._fail_all()
        await self._channel.close()


def check_hello(hello: dict[str, Any]) -> dict[str, Any]:
    """The agent's hello result, if it is one this gateway understands."""
    caps = hello.get("capabilities")
    if hello.get("version") != PROTOCOL_VERSION or not isinstance(caps, list):
        raise ProtocolError("guest_protocol", f"agent hello not understood: {hello!r:.200}")
    return hello


async def call_once(channel: ByteChannel, op: str, timeout: float, *,
                    death_reason: Callable[[], Awaitable[str]] | None = None, **fields: Any) -> dict[str, Any]:
    """One request on an agent's fresh channel, before an AgentClient owns it: a runtime's ping
    that proves a pooled or booted guest answers, or the microVM's `guest.setup`. The agent says
    nothing unasked, so anything but the reply fails the leg (a broken guest).

    Raises:
        ProtocolError: the agent's error, `guest_died` at end of input (with what `death_reason`
            says, when given), `guest_protocol`, or TimeoutError past `timeout`.
    """
    leg = AgentLeg(GATEWAY)
    request_id = leg.send_request(op, fields)
    async with asyncio.timeout(timeout):
        await channel.write(leg.data_to_send())
        while True:
            data = await channel.read()
            if data:
                leg.receive_data(data)
            else:
                why = await death_reason() if death_reason is not None else f"the agent closed its channel during {op}"
                leg.receive_eof(ProtocolError("guest_died", why))
            for event in leg.events_received():
                if isinstance(event, Reply) and event.id == request_id:
                    if event.error is not None:
                        raise event.error
                    assert event.result is not None
                    return event.result
            if leg.failure is not None:
                raise leg.failure
