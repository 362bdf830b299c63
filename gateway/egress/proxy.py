"""An HTTP forward proxy for a sandbox's outbound connections: `CONNECT host:port` (HTTPS and any
other TCP) and absolute-URI requests (`GET http://host/...`), resolved and checked here.

The name is resolved by the gateway, every answer is checked against `policy.refusal`, and the
connection goes to an address that passed (never resolved again, so a name cannot be rebound to a
refused address between check and connect). A refused or bad request gets an HTTP error whose body
says why, and one log line.

The head is parsed here (a request line and header lines, bounded); the rest is relayed as bytes.
A plain-HTTP request is forwarded with `Connection: close`: a keep-alive connection could
otherwise carry a second request to another host past the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.egress.policy import IPAddress, host_addresses, refusal

log = logging.getLogger(__name__)

#: The largest request head taken (request line and headers).
MAX_HEAD_BYTES = 16 << 10
#: How long a client has to send its request head.
HEAD_TIMEOUT_S = 30.0
#: How long connecting to the upstream may take, all of its addresses together.
CONNECT_TIMEOUT_S = 10.0
RELAY_CHUNK = 64 << 10
#: Hop-by-hop headers not forwarded (RFC 9110 7.6.1), plus the proxy's own. Transfer-Encoding
#: stays: the body is relayed as bytes, framed as the client framed it.
HOP_BY_HOP = frozenset({"connection", "proxy-connection", "keep-alive", "proxy-authorization",
                        "proxy-authenticate", "te", "trailer", "upgrade"})


class Refused(Exception):
    """A request the proxy will not carry out: an HTTP status and the reason for its body."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Plan:
    """What one request asks for: an upstream, and the head to send it (None for CONNECT, which
    answers 200 and relays bytes as they come)."""

    host: str
    port: int
    forward_head: bytes | None


def plan(head: bytes) -> Plan:
    """Read a request head (up to and including its blank line).

    Raises:
        Refused: 400 for a malformed head or a target that is not `host:port` (CONNECT) or an
            absolute http:// URI.
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise Refused(400, "the request head is not ASCII") from None
    lines = text.split("\r\n")
    request_line, header_lines = lines[0], [line for line in lines[1:] if line]
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Refused(400, f"not an HTTP/1.x request line: {request_line[:100]!r}")
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise Refused(400, f"a malformed header line: {line[:100]!r}")
        headers.append((name, value.strip()))
    if method == "CONNECT":
        host, port = _authority(target, default_port=None)
        return Plan(host, port, None)
    url = urlsplit(target)
    if url.scheme != "http" or not url.netloc:
        raise Refused(400, "a proxy request needs an absolute http:// URI (use CONNECT for https)")
    host, port = _authority(url.netloc, default_port=80)
    named = {token.strip().lower() for name, value in headers if name.lower() == "connection"
             for token in value.split(",")}
    kept = [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP | named]
    if not any(n.lower() == "host" for n, _ in kept):
        kept.insert(0, ("Host", url.netloc))
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    forwarded = [f"{method} {path} {version}", *(f"{n}: {v}" for n, v in kept), "Connection: close", "", ""]
    return Plan(host, port, "\r\n".join(forwarded).encode("ascii"))


def _authority(authority: str, default_port: int | None) -> tuple[str, int]:
    if "@" in authority:
        raise Refused(400, "user information in the target is not accepted")
    try:
        parts = urlsplit(f"//{authority}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    port = port if port is not None else default_port
    if not host or port is None or not 0 < port < 65536:
        raise Refused(400, f"the target must be host:port, not {authority[:100]!r}")
    return host, port


async def resolve(host: str, port: int) -> list[IPAddress]:
    """`host`'s addresses (an IP literal is its own), by the gateway's resolver."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(502, f"cannot resolve {host!r}: {exc}") from None
    return [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]


def allowed(addresses: Iterable[IPAddress], host_own: Iterable[IPAddress]) -> list[IPAddress]:
    """The addresses a sandbox may connect to, in order.

    Raises:
        Refused: 403 naming why the first address is refused, when none is allowed.
    """
    own = frozenset(host_own)
    addresses = list(dict.fromkeys(addresses))
    reasons = [(address, refusal(address, own)) for address in addresses]
    ok = [address for address, why in reasons if why is None]
    if not ok:
        why = next((why for _, why in reasons if why), "no address")
        raise Refused(403, f"sandboxes may reach public addresses only: {why}")
    return ok


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, label: str,
                 host_own: Callable[[], Iterable[IPAddress]] = host_addresses) -> None:
    """Serve one client connection (one request; then bytes both ways until both ends close).

    Args:
        label: who the client is, for the log (the sandbox).
        host_own: the host's own addresses, refused like private ones.
    """
    what = "?"
    try:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise Refused(431, f"the request head is over {MAX_HEAD_BYTES} bytes") from None
        except (asyncio.IncompleteReadError, TimeoutError):
            return
        request = plan(head)
        what = f"{request.host}:{request.port}"
        addresses = allowed(await resolve(request.host, request.port), host_own())
        upstream = await _connect(addresses, request.port)
    except Refused as exc:
        log.info("egress %s: refused %s (%d): %s", label, what, exc.status, exc.reason)
        body = f"sandgate egress: {exc.reason}\n".encode()
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(f"HTTP/1.1 {exc.status} Refused\r\nContent-Type: text/plain\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        await _close(writer)
        return
    except BaseException:
        await _close(writer)
        raise
    up_reader, up_writer = upstream
    try:
        if request.forward_head is None:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up_writer.write(request.forward_head)
        await asyncio.gather(_pipe(reader, up_writer, writer), _pipe(up_reader, writer, up_writer))
    finally:
        await _close(writer)
        await _close(up_writer)


async def _connect(addresses: list[IPAddress], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    last: Exception | None = None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            for address in addresses:
                try:
                    return await asyncio.open_connection(str(address), port, limit=RELAY_CHUNK)
                except OSError as exc:
                    last = exc
    except TimeoutError:
        raise Refused(504, f"connecting to {addresses[0]} port {port} timed out") from None
    raise Refused(502, f"cannot connect to {addresses[0]} port {port}: {last}")


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, src_writer: asyncio.StreamWriter) -> None:
    """Copy `src` to `dst` until end of input, then half-close `dst`. On an error, both ends of
    the connection are aborted, so the other direction ends too."""
    try:
        while data := await src.read(RELAY_CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.transport.abort()
        src_writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
