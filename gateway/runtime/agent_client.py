"""The gateway's end of the agent leg: requests, replies and streams over one ByteChannel.

The guest is untrusted. Everything it sends is decoded by the sans-I/O `FrameDecoder` (which never
buffers more than one maximum frame), checked for shape and sequence, and a guest that breaks the
protocol is treated as dead. Nothing here waits without a deadline except a stream's consumer, and a
stream always ends: with the agent's `end`, or with a `guest_died` end when the channel closes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gateway.runtime.base import ByteChannel
from guest_agent.wire import (
    DEFAULT_MAX_FRAME,
    OUTPUT_FDS,
    PROTOCOL_VERSION,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    message_kind,
)

log = logging.getLogger(__name__)

#: Events a stream may hold before the reader stops reading the channel (backpressure).
STREAM_QUEUE = 64


class AgentStream:
    """The events of one stream op, in order, ending with `end` (always, even if the guest dies)."""

    def __init__(self, client: AgentClient, request_id: int) -> None:
        self._client = client
        self.request_id = request_id
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(STREAM_QUEUE)
        self._next_seq = 0
        self.finished = False

    async def _put(self, message: dict[str, Any]) -> None:
        if "ev" not in message:  # a reply: the agent refused the stream; consumers see it as its end
            self._client._streams.pop(self.request_id, None)
            await self._queue.put(self._end(message.get("error")))
            return
        if message["ev"] != "keepalive":
            if message["seq"] != self._next_seq:
                raise ProtocolError(
                    "guest_protocol", f"stream {self.request_id}: seq {message['seq']}, expected {self._next_seq}"
                )
            self._next_seq += 1
        if message["ev"] == "data":
            _check_data(message)
        if message["ev"] == "end":
            self._client._streams.pop(self.request_id, None)
        await self._queue.put(message)

    def _fail(self, error: ProtocolError) -> None:
        """End the stream with `error` without waiting: the channel is gone."""
        self._client._streams.pop(self.request_id, None)
        end = self._end(error.to_wire())
        while True:
            try:
                self._queue.put_nowait(end)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()  # the consumer is behind; the end matters more

    def _end(self, error: Any) -> dict[str, Any]:
        if error is None:
            error = ProtocolError("guest_protocol", "the agent answered a stream op with a result").to_wire()
        return {"id": self.request_id, "ev": "end", "seq": self._next_seq, "exit_code": None, "signal": None,
                "error": error}

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        while not self.finished:
            message = await self._queue.get()
            if message["ev"] == "end":
                self.finished = True
            yield message

    def discard(self) -> None:
        """Stop delivering this stream's events (its consumer is gone) so the channel never stalls."""
        self.finished = True
        self._client._streams.pop(self.request_id, None)
        self._client._discarded.add(self.request_id)


def _check_data(message: dict[str, Any]) -> None:
    """A guest's data event must carry bytes, and an output stream's fd must be one of ours: the
    layers above index by them, so anything else stops here as a protocol violation."""
    if not isinstance(message.get("data"), bytes):
        raise ProtocolError("guest_protocol", "a data event without binary 'data'")
    if "fd" in message and message["fd"] not in OUTPUT_FDS:
        raise ProtocolError("guest_protocol", f"a data event for unknown fd {message['fd']!r:.40}")


class AgentClient:
    """Multiplexes requests and streams to one guest agent."""

    def __init__(
        self,
        channel: ByteChannel,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        request_timeout: float = 30.0,
        death_reason: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self._channel = channel
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._max_frame = max_frame
        self.request_timeout = request_timeout
        self._death_reason = death_reason
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._streams: dict[int, AgentStream] = {}
        self._discarded: set[int] = set()
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
        caps = hello.get("capabilities")
        if hello.get("version") != PROTOCOL_VERSION or not isinstance(caps, list):
            raise ProtocolError("guest_protocol", f"agent hello not understood: {hello!r:.200}")
        self.hello = hello
        return hello

    async def request(self, op: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply; raises the agent's error as ProtocolError."""
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._send({"id": request_id, "op": op, **fields})
            async with asyncio.timeout(timeout if timeout is not None else self.request_timeout):
                message = await future
        except TimeoutError:
            raise ProtocolError("timeout", f"the agent did not answer {op} in time") from None
        finally:
            self._pending.pop(request_id, None)
        if "error" in message:
            raise ProtocolError.from_wire(message["error"])
        result = message.get("result")
        if not isinstance(result, dict):
            raise ProtocolError("guest_protocol", f"{op}: reply without a result map")
        return result

    async def stream(self, op: str, **fields: Any) -> AgentStream:
        """Send a stream request; iterate the returned stream for its events."""
        request_id = next(self._ids)
        stream = AgentStream(self, request_id)
        self._streams[request_id] = stream
        await self._send({"id": request_id, "op": op, **fields})
        return stream

    async def _send(self, message: dict[str, Any]) -> None:
        if self.closed.done():
            raise self.closed.result()
        frame = encode_frame(message, max_frame=self._max_frame)
        async with self._write_lock:
            try:
                await self._channel.write(frame)
            except (ConnectionError, OSError) as exc:
                raise ProtocolError("guest_died", f"channel to the agent failed: {exc}") from None

    async def _read_loop(self) -> None:
        error: ProtocolError
        try:
            while True:
                data = await self._channel.read()
                if not data:
                    error = ProtocolError("guest_died", "the sandbox's agent closed its channel")
                    break
                self._decoder.receive_data(data)
                for message in self._decoder.messages_received():
                    await self._dispatch(message)
        except ProtocolError as exc:
            code = "guest_protocol" if exc.code != "guest_died" else exc.code
            error = ProtocolError(code, f"the agent broke the protocol: {exc.message}")
        except (ConnectionError, OSError) as exc:
            error = ProtocolError("guest_died", f"channel to the agent failed: {exc}")
        except Exception as exc:  # a bug here must still end every stream, never hang them
            log.exception("agent reader failed")
            error = ProtocolError("internal", f"agent reader failed: {type(exc).__name__}")
        except asyncio.CancelledError:
            error = ProtocolError("guest_died", "the sandbox was closed")
            self._fail_all(error)
            raise
        if self._death_reason is not None:
            try:
                async with asyncio.timeout(5):
                    reason = await self._death_reason()
                error = ProtocolError(error.code, f"{error.message} ({reason})")
            except TimeoutError:
                pass
        self._fail_all(error)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        try:
            kind = message_kind(message)
        except ProtocolError as exc:
            raise ProtocolError("guest_protocol", exc.message) from None
        request_id = message["id"]
        if kind == "request":
            raise ProtocolError("guest_protocol", "agents do not send requests")
        stream = self._streams.get(request_id)
        if stream is not None:
            await stream._put(message)
            return
        future = self._pending.get(request_id)
        if future is not None and kind == "reply":
            if not future.done():
                future.set_result(message)
            return
        if request_id in self._discarded:
            if kind == "reply" or message["ev"] == "end":  # the stream's last message
                self._discarded.discard(request_id)
            return
        # A late reply to a request that timed out, or noise from a confused guest: drop it.
        log.debug("agent message for unknown id %s dropped", request_id)

    def _fail_all(self, error: ProtocolError) -> None:
        if not self.closed.done():
            self.closed.set_result(error)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for stream in list(self._streams.values()):
            stream._fail(error)

    async def close(self) -> None:
        """Stop reading and close the channel; every open stream ends with guest_died."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._fail_all(ProtocolError("guest_died", "the sandbox was closed"))
        await self._channel.close()
