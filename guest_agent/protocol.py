"""The agent leg as one sans-I/O object, in the style of python-websockets' `protocol.py`.

`AgentLeg` owns everything stateful about one byte channel between the gateway and a guest agent:
framing, request ids, which requests wait for a reply, which streams are open, their sequence
numbers, and keepalives. It never reads or writes: feed it bytes (`receive_data`, `receive_eof`),
take what it decoded (`events_received`), and send what it produced (`data_to_send`). The gateway's
`AgentClient`, each runtime's first ping, and the guest agent's `Channel` are thin I/O layers over it.

Both ends use the same class in different roles:

- GATEWAY sends requests (`send_request`) and receives `Reply` and `StreamEvent`s. It checks that
  every reply answers a pending request, that stream events arrive numbered 0, 1, 2, ... and that a
  keepalive carries the last seq sent; anything else from the (untrusted) guest is a protocol error,
  and the leg then fails: every pending request and open stream gets a `guest_protocol` end.
- AGENT receives `Request`s, each validated by the op schema where it enters (a bad one is answered
  with its error right here and never reaches a handler), and sends replies and stream events, which
  it numbers; `keepalives(now)` says a quiet stream is still alive, with the seq of its last event.

Not thread-safe: an agent whose threads share one leg holds a lock around each call and its write.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import schema
from .wire import (
    DEFAULT_MAX_FRAME,
    MAX_REQUEST_ID,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    error_reply,
    message_kind,
)

GATEWAY, AGENT = "gateway", "agent"
#: A stream with no event for this long gets a keepalive (docs/protocol.md §3).
KEEPALIVE_IDLE = 15.0
#: What one decoded event costs its holder's memory beyond its data bytes (the gateway queues and
#: buffers events for replay): the event dict, its keys' and values' objects and a deque slot.
#: Measured with tracemalloc (tests/gateway/test_bounds.py measures it again): a data event of a
#: short output line takes ~370 bytes, of which ~5 are the line.
EVENT_OVERHEAD = 368
_MAX_ERROR_MESSAGE = 2000


@dataclass(frozen=True)
class Reply:
    """The answer to a request: `result`, or `error` when it failed."""

    id: int
    result: dict[str, Any] | None
    error: ProtocolError | None


@dataclass(frozen=True)
class StreamEvent:
    """One event of a stream (`start`, `data`, `end`, `keepalive`); `fields` without id/ev/seq."""

    id: int
    ev: str
    seq: int
    fields: dict[str, Any]

    def to_message(self) -> dict[str, Any]:
        return {"id": self.id, "ev": self.ev, "seq": self.seq, **self.fields}


@dataclass
class _OutStream:
    """An open stream the agent is sending."""

    next_seq: int = 0
    last_sent: float = 0.0


@dataclass
class _InStream:
    """An open stream the gateway is receiving."""

    next_seq: int = 0
    started: bool = False
    discarded: bool = False
    #: What its display events carried so far (`schema.bundle_size`), bounded per exec.
    display_bytes: int = 0


@dataclass
class AgentLeg:
    """One end of one agent channel (module doc)."""

    role: str
    max_frame: int = DEFAULT_MAX_FRAME
    keepalive_idle: float = KEEPALIVE_IDLE
    _decoder: FrameDecoder = field(init=False)
    #: Frames to send, whole: a list, so a 64 KiB output chunk is not copied once more.
    _out: list[bytes] = field(default_factory=list)
    _events: list[Any] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, str] = field(default_factory=dict)
    _in_streams: dict[int, _InStream] = field(default_factory=dict)
    _out_streams: dict[int, _OutStream] = field(default_factory=dict)
    #: Set once the leg has failed (a protocol error, or end of input); nothing more is decoded.
    failure: ProtocolError | None = None

    def __post_init__(self) -> None:
        if self.role not in (GATEWAY, AGENT):
            raise ValueError(self.role)
        self._decoder = FrameDecoder(max_frame=self.max_frame)

    # -----------------------------------------------------------------------------------------
    # Bytes in, events out
    # -----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes, max_messages: int | None = None) -> bool:
        """Decode what arrived. A framing or protocol violation fails the leg (`failure`); the
        events decoded before it are still delivered.

        With `max_messages`, decode at most that many and keep the rest buffered; returns True
        when it stopped there (call again, with b"", to go on). The gateway decodes a turn's share
        at a time this way, so one guest's flood of tiny frames cannot hold the event loop."""
        if self.failure is not None:
            return False
        messages = None
        try:
            self._decoder.receive_data(data)
            messages = self._decoder.messages_received()
            for count, message in enumerate(messages, 1):
                self._receive_message(message)
                if self.failure is not None:
                    return False
                if count == max_messages:
                    return True
        except ProtocolError as exc:
            self.fail(exc if self.role == AGENT else _guest_protocol(exc))
        finally:
            if messages is not None:
                messages.close()  # keeps what it has not decoded yet
        return False

    def receive_eof(self, error: ProtocolError | None = None) -> None:
        """The channel closed (or broke, with `error`): every open request and stream ends."""
        self.fail(error or ProtocolError("guest_died", "the sandbox's agent closed its channel"))

    def events_received(self) -> list[Any]:
        """Everything decoded since the last call: `schema.Request`s (agent role) or `Reply` and
        `StreamEvent`s (gateway role), in order."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        out = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        return out

    def fail(self, error: ProtocolError) -> None:
        """Stop: every pending request gets `error`, every open stream an `end` carrying it."""
        if self.failure is not None:
            return
        self.failure = error
        if self.role == GATEWAY:
            for rid in list(self._pending):
                self._events.append(Reply(rid, None, error))
            for rid, stream in list(self._in_streams.items()):
                if not stream.discarded:
                    self._events.append(StreamEvent(rid, "end", stream.next_seq, _end_fields(error)))
            self._pending.clear()
            self._in_streams.clear()

    # -----------------------------------------------------------------------------------------
    # Gateway role
    # -----------------------------------------------------------------------------------------

    def send_request(self, op: str, fields: Mapping[str, Any]) -> int:
        """Queue a request; returns its id. A stream op's events arrive as `StreamEvent`s (its
        `end` always comes: from the agent, or from `fail`); any other op's answer as a `Reply`.

        Raises:
            ProtocolError: the leg has failed, or `frame_too_large` (nothing is queued then).
        """
        self._need(GATEWAY)
        if self.failure is not None:
            raise self.failure
        rid: int = next(self._ids) % MAX_REQUEST_ID
        self._out.append(encode_frame({"id": rid, "op": op, **fields}, max_frame=self.max_frame))
        if schema.OPS[op].stream:
            self._in_streams[rid] = _InStream()
        else:
            self._pending[rid] = op
        return rid

    def forget(self, request_id: int) -> None:
        """Nobody waits for this request any more (a timeout, a consumer gone): its reply or its
        stream's later events are dropped quietly, and it costs no memory."""
        self._pending.pop(request_id, None)
        stream = self._in_streams.get(request_id)
        if stream is not None:
            stream.discarded = True

    def _gateway_receive(self, message: dict[str, Any]) -> None:
        kind = message_kind(message)
        rid = message["id"]
        if kind == "request":
            raise ProtocolError("guest_protocol", "agents do not send requests")
        stream = self._in_streams.get(rid)
        if stream is not None:
            self._stream_message(rid, stream, kind, message)
        elif kind == "reply" and rid in self._pending:
            del self._pending[rid]
            self._events.append(_reply(rid, message))
        # Anything else answers a request that was forgotten, or an id never used (a confused
        # guest): dropped, never an unbounded record.

    def _stream_message(self, rid: int, stream: _InStream, kind: str, message: dict[str, Any]) -> None:
        if kind == "reply":  # the agent refused the stream: its reply stands for the stream's end
            del self._in_streams[rid]
            reply = _reply(rid, message)
            error = reply.error or ProtocolError("guest_protocol", "the agent answered a stream op with a result")
            if not stream.discarded:
                self._events.append(StreamEvent(rid, "end", stream.next_seq, _end_fields(error)))
            return
        ev, seq = message["ev"], message["seq"]
        if ev == "keepalive":
            if seq != stream.next_seq - 1:
                raise ProtocolError("guest_protocol", f"stream {rid}: keepalive with seq {seq}, last was "
                                                      f"{stream.next_seq - 1}")
        else:
            if seq != stream.next_seq:
                raise ProtocolError("guest_protocol", f"stream {rid}: seq {seq}, expected {stream.next_seq}")
            if (ev == "start") == stream.started:
                raise ProtocolError("guest_protocol", f"stream {rid}: {ev} out of order")
            stream.started = True
            stream.next_seq += 1
        # Every field is checked where it enters (a discarded stream's too: the guest broke the
        # protocol whoever listens), so nothing above this leg checks a guest's type again.
        fields = schema.check_event(ev, {k: v for k, v in message.items() if k not in ("id", "ev", "seq")})
        if ev == "display":
            stream.display_bytes += schema.bundle_size(fields["bundle"])
            if stream.display_bytes > schema.MAX_EXEC_DISPLAY_BYTES:
                raise ProtocolError("guest_protocol", f"stream {rid}: display events of more than "
                                                      f"{schema.MAX_EXEC_DISPLAY_BYTES} bytes in all")
        if ev == "end":
            del self._in_streams[rid]
        if not stream.discarded:
            self._events.append(StreamEvent(rid, ev, seq, fields))

    # -----------------------------------------------------------------------------------------
    # Agent role
    # -----------------------------------------------------------------------------------------

    def _agent_receive(self, message: dict[str, Any]) -> None:
        try:
            if message_kind(message) != "request":
                raise ProtocolError("bad_request", "the agent takes requests only")
            request = schema.parse(message, schema.AGENT)
        except ProtocolError as exc:
            self.send_error(schema.request_id_of(message), exc)
            return
        self._events.append(request)

    def send_reply(self, request_id: int, result: Mapping[str, Any]) -> None:
        """Queue a request's result; one too large to frame is answered with that error instead."""
        self._need(AGENT)
        try:
            self._out.append(encode_frame({"id": request_id, "result": dict(result)}, max_frame=self.max_frame))
        except ProtocolError as exc:
            self.send_error(request_id, exc)

    def send_error(self, request_id: int | None, error: ProtocolError) -> None:
        self._need(AGENT)
        if len(error.message) > _MAX_ERROR_MESSAGE:
            error = ProtocolError(error.code, error.message[:_MAX_ERROR_MESSAGE] + "...")
        self._out.append(encode_frame(error_reply(request_id, error), max_frame=self.max_frame))

    def send_event(self, request_id: int, ev: str, now: float, **fields: Any) -> bool:
        """Queue the next event of the stream answering `request_id` (opened by its first event).
        False, and nothing queued, once that stream has ended."""
        self._need(AGENT)
        stream = self._out_streams.get(request_id)
        if stream is None:
            if ev != "start":
                return False
            stream = self._out_streams[request_id] = _OutStream()
        self._out.append(encode_frame({"id": request_id, "ev": ev, "seq": stream.next_seq, **fields},
                                      max_frame=self.max_frame))
        stream.next_seq += 1
        stream.last_sent = now
        if ev == "end":
            del self._out_streams[request_id]
        return True

    def stream_open(self, request_id: int) -> bool:
        return request_id in self._out_streams

    def keepalives(self, now: float) -> None:
        """Queue a keepalive on each stream quiet for `keepalive_idle`, carrying its last seq."""
        self._need(AGENT)
        for rid, stream in self._out_streams.items():
            if now - stream.last_sent >= self.keepalive_idle:
                self._out.append(encode_frame({"id": rid, "ev": "keepalive", "seq": stream.next_seq - 1}))
                stream.last_sent = now

    # -----------------------------------------------------------------------------------------

    def _receive_message(self, message: dict[str, Any]) -> None:
        if self.role == GATEWAY:
            self._gateway_receive(message)
        else:
            self._agent_receive(message)

    def _need(self, role: str) -> None:
        if self.role != role:
            raise TypeError(f"only the {role} end does that")


def event_size(event: Mapping[str, Any]) -> int:
    """What a decoded event really costs while it is held (EVENT_OVERHEAD plus its data, or its
    display bundle's strings)."""
    data = event.get("data")
    if isinstance(data, bytes | bytearray):
        return EVENT_OVERHEAD + len(data)
    bundle = event.get("bundle")
    if isinstance(bundle, dict):
        return EVENT_OVERHEAD + bundle_cost(bundle)
    return EVENT_OVERHEAD


#: What a bundle costs beyond its strings' characters: the map, and per entry its slot and two
#: str objects' headers (measured with tracemalloc, as EVENT_OVERHEAD is; a non-ASCII string
#: takes up to 4 bytes a character, which `text_bytes` never undercounts by more than the header).
BUNDLE_OVERHEAD = 240
BUNDLE_ENTRY_OVERHEAD = 200


def bundle_cost(bundle: Mapping[str, Any]) -> int:
    """What a checked display bundle costs its holder's memory."""
    return BUNDLE_OVERHEAD + sum(BUNDLE_ENTRY_OVERHEAD + len(mime) + (
        len(value) if isinstance(value, str) and value.isascii() else 4 * len(value)) for mime, value in bundle.items())


def _reply(rid: int, message: Mapping[str, Any]) -> Reply:
    if "error" in message:
        return Reply(rid, None, ProtocolError.from_wire(message["error"]))
    return Reply(rid, message["result"], None)


def _end_fields(error: ProtocolError) -> dict[str, Any]:
    return {"exit_code": None, "signal": None, "error": error.to_wire()}


def _guest_protocol(exc: ProtocolError) -> ProtocolError:
    """What the guest broke, as the gateway reports it (the guest's framing errors included)."""
    if exc.code == "guest_protocol":
        return exc
    return ProtocolError("guest_protocol", f"the agent broke the protocol: {exc.message}")
