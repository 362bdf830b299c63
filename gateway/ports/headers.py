"""What a proxied request and response carry across the gateway (sans-I/O, pure functions).

Towards the guest: never the gateway's credentials (an API key in Authorization, the port's cookie,
the `token` query parameter), never hop-by-hop headers or the client's own X-Forwarded-* (which
could lie); the gateway's X-Forwarded-Host/-Proto/-Prefix instead, and `Host: localhost:<port>`,
the host a server started inside the sandbox expects (dev servers refuse others). Towards the
client: the guest's headers less hop-by-hop ones and any attempt to set the port's cookie, with a
redirect that points at the guest itself (`/login`, `http://localhost:8000/x`) moved under the
port's prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from gateway.http1 import HOP_BY_HOP, named_by_connection

#: The cookie a `?token=` exchange sets (Path = the port's prefix, so ports never see each other's).
PORT_COOKIE = "sandgate_port_token"
#: The query parameter that carries a port's token.
TOKEN_PARAM = "token"
#: Set by the gateway only (a client's would be believed by the guest's server).
_FORWARDED = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                        "x-forwarded-prefix", "x-forwarded-port", "x-real-ip"})
#: Framing the gateway decides itself, and Expect (aiohttp answered the client's 100-continue).
_REQUEST_OWN = frozenset({"host", "content-length", "expect"})
#: What the WebSocket handshake to the guest sets itself (websockets' ClientProtocol).
_WEBSOCKET_OWN = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
                            "sec-websocket-extensions", "sec-websocket-accept"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def without_port_cookie(cookie: str) -> str:
    """A Cookie header's value without the port's cookie (the guest's own cookies stay)."""
    kept = [pair for pair in cookie.split(";") if pair.strip().partition("=")[0].strip() != PORT_COOKIE]
    return ";".join(kept).strip()


def without_token(query: str) -> str:
    """A raw query string without `token=` parameters (the others as they were, undecoded)."""
    return "&".join(p for p in query.split("&") if p and p.partition("=")[0] != TOKEN_PARAM)


def to_guest(headers: Iterable[tuple[str, str]], *, port: int, prefix: str, forwarded_host: str,
             forwarded_proto: str, drop_authorization: bool, websocket: bool = False) -> list[tuple[str, str]]:
    """The request headers the guest's server gets.

    Args:
        headers: the client's request headers, in order.
        prefix: the port's URL prefix (`/v1/sandboxes/<id>/ports/<port>/`).
        drop_authorization: the Authorization header carried a gateway API key.
        websocket: for a WebSocket handshake (whose own headers websockets writes).
    """
    headers = list(headers)
    dropped = HOP_BY_HOP | _FORWARDED | _REQUEST_OWN | named_by_connection(headers)
    if websocket:
        dropped |= _WEBSOCKET_OWN
    if drop_authorization:
        dropped |= {"authorization"}
    out = [] if websocket else [("Host", f"localhost:{port}")]
    for name, value in headers:
        lower = name.lower()
        if lower in dropped:
            continue
        if lower == "cookie":
            value = without_port_cookie(value)
            if not value:
                continue
        out.append((name, value))
    out += [("X-Forwarded-Host", forwarded_host), ("X-Forwarded-Proto", forwarded_proto),
            ("X-Forwarded-Prefix", prefix.rstrip("/"))]
    return out


def to_client(headers: Iterable[tuple[str, str]], *, port: int, prefix: str) -> list[tuple[str, str]]:
    """The response headers the client gets (framing is left to the gateway's server)."""
    headers = list(headers)
    dropped = HOP_BY_HOP | {"content-length"} | named_by_connection(headers)
    out = []
    for name, value in headers:
        lower = name.lower()
        if lower in dropped:
            continue
        if lower == "set-cookie" and value.partition("=")[0].strip() == PORT_COOKIE:
            continue  # the guest may not replace (or clear) the visitor's token
        if lower == "location":
            value = rewrite_location(value, port=port, prefix=prefix)
        out.append((name, value))
    return out


def rewrite_location(location: str, *, port: int, prefix: str) -> str:
    """A guest's redirect as the client must follow it: an absolute path, or a URL of the guest
    itself (its loopback at its port), moves under the port's prefix; anything else is kept."""
    base = prefix.rstrip("/")
    if location.startswith("/") and not location.startswith("//"):
        return base + location
    try:
        parts = urlsplit(location)
        guest_port = parts.port
    except ValueError:
        return location
    if parts.scheme in ("http", "https") and parts.hostname in LOOPBACK_HOSTS and guest_port in (port, None):
        query = f"?{parts.query}" if parts.query else ""
        return base + (parts.path or "/") + query + (f"#{parts.fragment}" if parts.fragment else "")
    return location
