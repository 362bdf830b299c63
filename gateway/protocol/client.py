"""The client leg: WebSocket subprotocols and message codecs (docs/protocol.md §5).

Two subprotocols carry the same messages: `sandgate.v1.json` (text frames, binary fields base64) and
`sandgate.v1.msgpack` (binary frames). A browser authenticates by offering one more subprotocol,
`sandgate.bearer.<base64url(key)>`, because it cannot set headers on a WebSocket.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

from guest_agent import schema
from guest_agent.wire import ProtocolError, pack, unpack_message

JSON = "sandgate.v1.json"
MSGPACK = "sandgate.v1.msgpack"
SUBPROTOCOLS = (JSON, MSGPACK)
BEARER_PREFIX = "sandgate.bearer."
MAX_CLIENT_MESSAGE = 1 << 20

#: WebSocket close codes (docs/protocol.md §5), application codes in 4000-4999.
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 4400
CLOSE_DESTROYED = 4404
CLOSE_TOO_SLOW = 4408

#: Fields that carry bytes; JSON base64-encodes exactly these (from the op schema).
BINARY_FIELDS = schema.BINARY_FIELDS


def describe() -> dict[str, Any]:
    """The client leg as JSON: the op schema plus what only this leg has (subprotocols, close codes,
    message size). Served at `GET /v1/protocol`; the JavaScript client's `protocol.js` is generated
    from it (`python -m gateway.protocol`), and a test fails when either drifts."""
    return {
        **schema.describe(),
        "subprotocols": list(SUBPROTOCOLS),
        "bearer_prefix": BEARER_PREFIX,
        "max_message": MAX_CLIENT_MESSAGE,
        "close_codes": {"going_away": CLOSE_GOING_AWAY, "protocol_error": CLOSE_PROTOCOL_ERROR,
                        "destroyed": CLOSE_DESTROYED, "too_slow": CLOSE_TOO_SLOW},
    }


def protocol_js() -> str:
    """gateway/web/js/protocol.js: `describe()` as an ES module the JavaScript client imports."""
    body = json.dumps(describe(), indent=1, sort_keys=True)
    return ("// Generated from guest_agent/schema.py by `python -m gateway.protocol`: do not edit.\n"
            "// tests/protocol/test_schema.py fails when this file and the schema drift.\n"
            f"export const PROTOCOL = {body};\n")


def choose_subprotocol(offered: Iterable[str]) -> str:
    """The first data subprotocol the client offered; JSON when it offered none (curl, websocat)."""
    offered = list(offered)
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    if any(not name.startswith(BEARER_PREFIX) for name in offered):
        raise ProtocolError("unsupported", f"offer one of {', '.join(SUBPROTOCOLS)}")
    return JSON


def bearer_from_subprotocols(offered: Iterable[str]) -> str | None:
    """The API key a browser put in `sandgate.bearer.<base64url>`, or None."""
    for name in offered:
        if name.startswith(BEARER_PREFIX):
            encoded = name[len(BEARER_PREFIX) :]
            try:
                raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
                return raw.decode("utf-8") or None
            except (binascii.Error, UnicodeDecodeError):
                return None
    return None


def bearer_subprotocol(key: str) -> str:
    """The subprotocol entry carrying `key` (what a browser client offers)."""
    return BEARER_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


class InvalidMessage(ProtocolError):
    """A message that decoded but holds a value the codec cannot take (a lone surrogate escape, a
    binary field that is not base64): `bad_request`, with the message's id when it has a valid
    one, so the error reply goes where the request came from."""

    def __init__(self, value: Any, message: str) -> None:
        super().__init__("bad_request", message)
        self.request_id = schema.request_id_of(value) if isinstance(value, dict) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(text: str | bytes, code: str) -> Any:
    """Strict JSON from a client (a WebSocket text message or a REST body).

    Stricter than `json.loads` where its leniency lets through what the gateway cannot carry:
    bytes must be UTF-8 (json.loads would pass encoded surrogates through), NaN and Infinity are
    not JSON, and nesting past the interpreter's recursion limit is refused instead of raising
    RecursionError from wherever the decoder happened to be.

    Raises:
        ProtocolError: `code` for what is not JSON; `InvalidMessage` (`bad_request`) for a lone
            surrogate escape (`"\\ud800"`), which is JSON but not text: it cannot be encoded for
            the agent.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError(code, "JSON nested too deeply") from None
    except UnicodeDecodeError:  # a ValueError too: caught first
        raise ProtocolError(code, "not UTF-8 text") from None
    except ValueError as exc:
        raise ProtocolError(code, f"not JSON: {str(exc).splitlines()[0]:.120}") from None
    if "\\u" in text:  # only an escape can make a lone surrogate: strict UTF-8 text has none
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage(value, "a string holds a lone surrogate escape: not Unicode text") from None
        except RecursionError:
            raise ProtocolError(code, "JSON nested too deeply") from None
    return value


class ClientCodec:
    """Encodes and decodes client messages for one negotiated subprotocol."""

    def __init__(self, subprotocol: str) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(subprotocol)
        self.subprotocol = subprotocol
        self.binary = subprotocol == MSGPACK

    def decode(self, payload: str | bytes) -> dict[str, Any]:
        """One client message; `ProtocolError` for anything malformed."""
        if self.binary:
            if not isinstance(payload, bytes):
                raise ProtocolError("bad_frame", f"{MSGPACK} takes binary frames")
            return unpack_message(payload, max_size=MAX_CLIENT_MESSAGE)
        if not isinstance(payload, str):
            raise ProtocolError("bad_frame", f"{JSON} takes text frames")
        message = parse_json(payload, "bad_frame")
        if not isinstance(message, dict):
            raise ProtocolError("bad_frame", "a message must be a JSON object")
        for name in BINARY_FIELDS:
            value = message.get(name)
            if isinstance(value, str):
                try:
                    message[name] = base64.b64decode(value, validate=True)
                except ValueError:  # binascii.Error, or plain ValueError for non-ASCII text
                    raise InvalidMessage(message, f"field {name!r} must be base64") from None
        return message

    def encode(self, message: Mapping[str, Any]) -> str | bytes:
        if self.binary:
            return pack(message)
        if any(isinstance(message.get(name), bytes | bytearray) for name in BINARY_FIELDS):
            message = dict(message)
            for name in BINARY_FIELDS:
                value = message.get(name)
                if isinstance(value, bytes | bytearray):
                    message[name] = base64.b64encode(value).decode("ascii")
        return json.dumps(message, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):  # a binary value outside BINARY_FIELDS (nested)
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
