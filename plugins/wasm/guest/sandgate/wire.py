"""The frames of the WASM host door: what `sandgate` in the guest and the launcher's door
(plugins/wasm/fetch.py) say to each other through `_host.call(frame) -> frame`.

One call, one frame each way, each a msgpack map. The guest asks:

- `{"op": "open", "method", "url", "headers": [[name, value], ...], "body": bytes | None,
  "timeout": seconds}`: send one request; the answer is its response's head,
  `{"ok": True, "id", "status", "reason", "headers": [[name, value], ...], "done"}`;
- `{"op": "read", "id", "size"}`: up to `size` more bytes of that body (at least one, unless it
  ended): `{"ok": True, "data", "done"}`;
- `{"op": "close", "id"}`: drop a response not read to its end: `{"ok": True}`.

Any of them may be answered `{"ok": False, "kind", "message", "status"}`, `kind` one of KINDS
(`refused`: the egress proxy said no; `status` is its HTTP status and `message` its reason). A
response read to its end (`done`) is closed by the host and its id forgotten.

The guest checks its own requests with the same functions the host checks them with, so a
mistake is a ValueError where it was made; the host never trusts that it did. Standard library
and msgpack only (the guest has msgpack's pure-Python fallback). Sans-I/O.
"""

from __future__ import annotations

import re
from typing import Any

#: The largest request body a fetch sends (it travels in one frame).
MAX_BODY = 16 << 20
#: The largest frame the door reads from the guest: a body and its request's head.
MAX_FRAME = MAX_BODY + (64 << 10)
MAX_URL = 8 << 10
MAX_HEADERS = 100
#: Every header name and value together (the egress proxy takes a request head of 16 KiB).
MAX_HEADER_BYTES = 12 << 10
#: The most body one `read` answers.
READ_CHUNK = 1 << 20
#: Responses a sandbox may hold open (not read to their end, not closed) at once.
MAX_OPEN = 8
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0

#: Why a request failed. `refused`: the egress proxy refused it (the policy, a secret headed
#: elsewhere, no network); `timeout`: a wait for the network took longer than the request's
#: timeout; `too_large`: a frame or a response past its cap; `bad_request`: a frame the host
#: does not take; `busy`: MAX_OPEN responses are open; `error`: the connection failed otherwise.
KINDS = ("refused", "timeout", "too_large", "bad_request", "busy", "error")

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_URL_CHAR = re.compile(r"[^\x21-\x7e]")
_BAD_VALUE_CHAR = re.compile(r"[\x00\r\n]")


class BadFrame(ValueError):
    """A frame or a request the door does not take; the message says why."""


def encode(message: dict[str, Any]) -> bytes:
    import msgpack

    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def decode(frame: bytes) -> dict[str, Any]:
    """One frame as a map with a str `op` (guest to host) or a bool `ok` (host to guest).

    Raises:
        BadFrame: not a msgpack map (or more than one object).
    """
    import msgpack

    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, its own errors and more: all are one answer
        raise BadFrame(f"not one msgpack map: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise BadFrame(f"a frame is a msgpack map, not {type(message).__name__}")
    return message


def failure(kind: str, message: str, status: int | None = None) -> bytes:
    return encode({"ok": False, "kind": kind, "message": message, "status": status})


def success(**fields: Any) -> bytes:
    return encode({"ok": True, **fields})


class Open:
    """A checked `open`: one request."""

    __slots__ = ("body", "headers", "method", "timeout", "url")

    def __init__(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None,
                 timeout: float) -> None:
        self.method = method
        self.url = url
        self.headers = headers
        self.body = body
        self.timeout = timeout

    def to_wire(self) -> dict[str, Any]:
        return {"op": "open", "method": self.method, "url": self.url,
                "headers": [list(pair) for pair in self.headers], "body": self.body, "timeout": self.timeout}


def check_open(message: dict[str, Any]) -> Open:
    """Raises BadFrame naming the field that is wrong."""
    method = message.get("method")
    if not isinstance(method, str) or not 0 < len(method) <= 32 or not _TOKEN.fullmatch(method):
        raise BadFrame(f"method must be an HTTP method name, not {str(method)[:40]!r}")
    return Open(method.upper(), check_url(message.get("url")), check_headers(message.get("headers")),
                check_body(message.get("body")), check_timeout(message.get("timeout")))


def check_url(url: Any) -> str:
    """An absolute http:// or https:// URL, ASCII (percent-encoded), without its fragment."""
    if not isinstance(url, str):
        raise BadFrame(f"url must be a string, not {type(url).__name__}")
    url = url.partition("#")[0]
    if len(url) > MAX_URL:
        raise BadFrame(f"the url is longer than {MAX_URL} characters")
    bad = _BAD_URL_CHAR.search(url)
    if bad:
        raise BadFrame(f"the url holds {bad.group()!r} at {bad.start()}: percent-encode spaces, controls and "
                       f"non-ASCII (urllib.parse.quote)")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise BadFrame(f"only http:// and https:// URLs are fetched, not {url[:100]!r}")
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise BadFrame("a URL with user information is not sent: put credentials in a header")
    if not authority or authority.startswith(":"):
        raise BadFrame(f"the url names no host: {url[:100]!r}")
    return f"{scheme.lower()}://{rest}"


def check_headers(headers: Any) -> list[tuple[str, str]]:
    """[[name, value], ...] of str; names are HTTP tokens, values hold no CR, LF or NUL."""
    if headers is None:
        return []
    if not isinstance(headers, list | tuple) or len(headers) > MAX_HEADERS:
        raise BadFrame(f"headers must be a list of at most {MAX_HEADERS} [name, value] pairs")
    checked: list[tuple[str, str]] = []
    total = 0
    for pair in headers:
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise BadFrame("each header is a [name, value] pair of strings")
        name, value = pair
        if not _TOKEN.fullmatch(name):
            raise BadFrame(f"the header name {name[:40]!r} is not an HTTP token")
        if _BAD_VALUE_CHAR.search(value):
            raise BadFrame(f"the value of header {name[:40]!r} holds a CR, LF or NUL")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise BadFrame(f"the value of header {name[:40]!r} is not Latin-1 (encode it first)") from None
        total += len(name) + len(value)
        checked.append((name, value))
    if total > MAX_HEADER_BYTES:
        raise BadFrame(f"the headers hold more than {MAX_HEADER_BYTES} bytes")
    return checked


def check_body(body: Any) -> bytes | None:
    if body is None:
        return None
    if not isinstance(body, bytes):
        raise BadFrame(f"body must be bytes or None, not {type(body).__name__}")
    if len(body) > MAX_BODY:
        raise BadFrame(f"the body is larger than {MAX_BODY} bytes")
    return body


def check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise BadFrame(f"timeout must be a number of seconds above 0, at most {MAX_TIMEOUT_S:g}")
    return float(timeout)


def check_id(message: dict[str, Any]) -> int:
    response_id = message.get("id")
    if isinstance(response_id, bool) or not isinstance(response_id, int):
        raise BadFrame("id must be an integer (the response's, from its open)")
    return response_id


def check_size(message: dict[str, Any]) -> int:
    size = message.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BadFrame("size must be a positive integer")
    return min(size, READ_CHUNK)
