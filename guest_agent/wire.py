"""The sans-I/O core of the sandgate protocol: frames, message shapes and the error table.

Shared by the guest agent and the gateway, so it imports only the stdlib and msgpack (whose
pure-Python fallback must work under CPython-on-WASI). Nothing here reads or writes a socket: feed
bytes in with `FrameDecoder.receive_data`, take messages out with `messages_received`, and send the
bytes `encode_frame` returns. See docs/protocol.md.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 1 << 20
#: Output and file chunks stay far below any sane max_frame.
CHUNK_SIZE = 64 * 1024
#: fs.write accepts this much data per request.
MAX_WRITE_CHUNK = 512 * 1024
MAX_REQUEST_ID = 2**31

_LENGTH = struct.Struct(">I")

STREAM_EVENTS = ("start", "data", "display", "change", "end", "keepalive")
OUTPUT_FDS = ("stdout", "stderr", "pty")


@dataclass(frozen=True)
class ErrorKind:
    code: str
    retryable: bool
    http_status: int
    meaning: str


def _table(*rows: tuple[str, bool, int, str]) -> dict[str, ErrorKind]:
    return {code: ErrorKind(code, retryable, status, meaning) for code, retryable, status, meaning in rows}


#: The one table of wire error codes (docs/protocol.md §4 is checked against it by a test).
ERRORS: dict[str, ErrorKind] = _table(
    ("bad_request", False, 400, "a malformed message or body: missing or mistyped field"),
    ("bad_frame", False, 400, "bytes that are not a protocol frame"),
    ("frame_too_large", False, 413, "a frame or message above the maximum size"),
    ("unknown_op", False, 400, "an op this protocol version does not have"),
    ("unsupported", False, 501, "an op or option this sandbox's runtime or agent does not offer"),
    ("unauthorized", False, 401, "no or unknown API key"),
    ("forbidden_origin", False, 403, "a WebSocket upgrade from an Origin not on the allowlist"),
    ("forbidden", False, 403, "the tenant is not permitted this (e.g. a sandbox with a network)"),
    ("not_found", False, 404, "no such sandbox (for this tenant), exec or file"),
    ("path_escape", False, 400, "a path that leaves the sandbox's root"),
    ("exists", False, 409, "the target already exists"),
    ("not_a_directory", False, 400, "a directory op on a file"),
    ("is_a_directory", False, 400, "a file op on a directory"),
    ("busy", True, 409, "the exec or sandbox is busy with something that excludes this request"),
    ("quota_exceeded", True, 429, "a tenant quota (concurrent sandboxes, creation rate) is used up"),
    ("disk_quota", False, 507, "the sandbox's disk quota is used up"),
    ("timeout", False, 504, "the exec or request ran past its deadline and was stopped"),
    ("guest_died", True, 502, "the sandbox's guest stopped (crash, kill, CPU or memory limit)"),
    ("guest_protocol", False, 502, "the guest sent something that is not protocol"),
    ("io_error", False, 500, "the guest's file system refused the operation"),
    ("unavailable", True, 503, "the gateway is draining or the runtime cannot create sandboxes now"),
    ("internal", True, 500, "a bug in sandgate"),
)


class ProtocolError(Exception):
    """An error with a stable wire code; every failure that crosses a leg is one of these."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def kind(self) -> ErrorKind:
        return ERRORS[self.code]

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.kind.retryable}

    @classmethod
    def from_wire(cls, error: Any) -> ProtocolError:
        """Rebuild an error a peer sent; an unknown or malformed one becomes `guest_protocol`."""
        if isinstance(error, Mapping):
            code, message = error.get("code"), error.get("message")
            if isinstance(code, str) and code in ERRORS and isinstance(message, str):
                return cls(code, message)
        return cls("guest_protocol", f"malformed error from peer: {error!r:.200}")


# ---------------------------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------------------------


def pack(message: Mapping[str, Any]) -> bytes:
    """One message as msgpack, without the length prefix (the WebSocket msgpack leg uses this)."""
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def unpack_message(body: bytes, *, max_size: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """Decode one msgpack map with string keys, or raise `ProtocolError("bad_frame")`.

    msgpack raises several exception types (including plain ValueError) for bad input, so all of
    them are folded into the project's own error here, in one place.
    """
    if len(body) > max_size:
        raise ProtocolError("frame_too_large", f"message of {len(body)} bytes exceeds {max_size}")
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack's error zoo: ExtraData, FormatError, ValueError, ...
        raise ProtocolError("bad_frame", f"undecodable msgpack: {type(exc).__name__}") from None
    if not isinstance(message, dict) or not all(isinstance(k, str) for k in message):
        raise ProtocolError("bad_frame", "a message must be a map with string keys")
    return message


def encode_frame(message: Mapping[str, Any], *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Length-prefix one message. Refuses to build a frame the peer would reject."""
    body = pack(message)
    if len(body) > max_frame:
        raise ProtocolError("frame_too_large", f"frame of {len(body)} bytes exceeds {max_frame}")
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream into messages, buffering at most one frame.

    After an error the decoder stays failed: a length-prefixed stream cannot be resynchronised, so
    the caller must close the channel.
    """

    def __init__(self, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._buffer += data

    def messages_received(self) -> Generator[dict[str, Any], None, None]:
        """Yield every complete message buffered so far.

        Not re-entrant: finish (or drop) one iteration before starting another. Feeding more data
        with `receive_data` while iterating is fine."""
        if self._error is not None:
            raise self._error
        buf = self._buffer
        pos = 0
        try:
            while len(buf) - pos >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buf, pos)
                if length > self.max_frame:
                    raise ProtocolError(
                        "frame_too_large",
                        f"frame header announces {length} bytes, maximum is {self.max_frame}",
                    )
                end = pos + _LENGTH.size + length
                if len(buf) < end:
                    break
                body = bytes(buf[pos + _LENGTH.size : end])
                pos = end
                yield unpack_message(body, max_size=self.max_frame)
        except ProtocolError as exc:
            self._error = exc
            raise
        finally:
            if self._error is None:
                del buf[:pos]


# ---------------------------------------------------------------------------------------------
# Message shapes (docs/protocol.md §1)
# ---------------------------------------------------------------------------------------------


def request(request_id: int, op: str, **fields: Any) -> dict[str, Any]:
    return {"id": request_id, "op": op, **fields}


def reply(request_id: int, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "result": dict(result)}


def error_reply(request_id: int | None, error: ProtocolError) -> dict[str, Any]:
    return {"id": request_id, "error": error.to_wire()}


def event(request_id: int, ev: str, seq: int, **fields: Any) -> dict[str, Any]:
    return {"id": request_id, "ev": ev, "seq": seq, **fields}


def message_kind(message: Mapping[str, Any]) -> str:
    """Which of the three shapes a message is: 'request', 'reply' or 'event'.

    Raises `ProtocolError('bad_request')` for anything else, so callers never guess.
    """
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError("bad_request", "'id' must be an integer")
    if not 0 <= request_id < MAX_REQUEST_ID:
        raise ProtocolError("bad_request", "'id' out of range")
    if "op" in message:
        if not isinstance(message["op"], str):
            raise ProtocolError("bad_request", "'op' must be a string")
        return "request"
    if "ev" in message:
        if message["ev"] not in STREAM_EVENTS:
            raise ProtocolError("bad_request", f"unknown stream event {message['ev']!r:.40}")
        seq = message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ProtocolError("bad_request", "'seq' must be a non-negative integer")
        return "event"
    if ("result" in message) != ("error" in message):
        if "result" in message and not isinstance(message["result"], dict):
            raise ProtocolError("bad_request", "'result' must be a map")
        return "reply"
    raise ProtocolError("bad_request", "a message needs 'op', 'ev', or one of 'result'/'error'")


_MISSING = object()


def field(message: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """A typed field of a request; a missing required or mistyped field is `bad_request`.

    bool is refused where int is asked for (msgpack and JSON both keep them apart).
    """
    value = message.get(name, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise ProtocolError("bad_request", f"missing field {name!r}")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError("bad_request", f"field {name!r} must be {_names(kinds)}")
    if not isinstance(value, kinds):
        raise ProtocolError("bad_request", f"field {name!r} must be {_names(kinds)}")
    return value


def _names(kinds: tuple[type, ...]) -> str:
    names = {bytes: "binary", str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "a map"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
