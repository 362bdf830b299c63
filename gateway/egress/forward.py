"""HTTP requests the policy proxy reads and forwards itself: absolute-URI proxy requests
(`GET http://...`, `GET https://...`) and the requests inside an intercepted TLS connection to a
host a secret is bound to. This is where secrets are filled in (headers, the target, and a body
of up to MAX_BUFFERED_BODY bytes, re-framed with its new length; a larger body streams, filled
piece by piece, chunked) and where what comes back is redacted (a secret's value the host echoes
goes back to its placeholder). h11 parses and frames both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from gateway.egress.network import MAX_BUFFERED_BYTES, Connection, SandboxNetwork
from gateway.egress.secrets import Leak, Redactor, StreamFiller
from gateway.egress.streams import READ_CHUNK, PlainStream, Stream, send
from gateway.egress.tls import ServerTLS
from gateway.egress.upstream import Refused, admitted, authority, close, connect
from gateway.http1 import HOP_BY_HOP, named_by_connection, next_event

#: The largest request head taken (request line and headers), on either side.
MAX_HEAD_BYTES = 16 << 10
#: A request body up to this size is read whole, its secrets filled and its length set; a larger
#: one (or one past the sandbox's share, network.MAX_BUFFERED_BYTES) is streamed, chunked.
MAX_BUFFERED_BODY = 1 << 20
#: Marks the proxy's own refusals (`answer_error`), so a client can tell them from an upstream's
#: answer (the WASM launcher's fetch does); never forwarded from an upstream, which could forge one.
REFUSAL_HEADER = (b"sandgate-egress", b"refused")
#: Headers not forwarded: hop-by-hop ones, and the framing the proxy sets itself (it reads a body
#: whole or re-chunks it, and answers a 100-continue itself).
NOT_FORWARDED = HOP_BY_HOP | {"expect", "content-length"}
#: How long an idle intercepted connection is kept open between requests.
IDLE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    def matches(self, host_header: bytes) -> bool:
        host, _, port = host_header.decode("ascii", "replace").lower().rpartition(":")
        if not host or not port.isdigit():
            host, port = host_header.decode("ascii", "replace").lower(), str(self.port)
        return host.rstrip(".") == self.host and int(port) == self.port


class Upstream:
    """An upstream HTTP/1.1 connection, its bytes counted as the sandbox's."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, network: SandboxNetwork) -> None:
        self.reader = reader
        self.writer = writer
        self.network = network
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def read(self) -> bytes:
        data = await self.reader.read(READ_CHUNK)
        self.network.counters.bytes_in += len(data)
        return data

    def write(self, data: bytes) -> None:
        self.network.counters.bytes_out += len(data)
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()


def origin_of(request: h11.Request) -> Origin:
    url = urlsplit(request.target.decode("ascii", "replace"))
    if url.scheme not in ("http", "https") or not url.netloc:
        raise Refused(400, "a proxy request needs an absolute http:// or https:// URI (or CONNECT)")
    host, port = authority(url.netloc, default_port=443 if url.scheme == "https" else 80)
    return Origin(url.scheme, host.lower(), port)


async def serve(client: PlainStream, conn: h11.Connection, request: h11.Request, network: SandboxNetwork) -> None:
    """One absolute-URI request: its own upstream connection, `Connection: close` both ways. A
    policy change that ends it ends the client's connection too: an answer cut short must not
    look whole to the client (a body framed by the upstream's close would)."""
    origin = origin_of(request)
    name, addresses = await admitted(network, origin.host, origin.port)
    https = origin.scheme == "https"
    reader, writer, address = await connect(network, name, addresses, origin.port,
                                            tls_name=(name or origin.host) if https else None)

    def abort() -> None:
        writer.transport.abort()
        client.writer.transport.abort()

    connection = Connection(address, origin.port, (name,) if name else (), abort)
    network.open.add(connection)
    try:
        url = urlsplit(request.target.decode("ascii", "replace"))
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        await exchange(client, conn, request, path.encode("ascii", "replace"), network,
                       Origin(origin.scheme, name or origin.host, origin.port), Upstream(reader, writer, network),
                       secrets_host=(name or origin.host) if https else None, keep_alive=False)
    finally:
        network.open.discard(connection)
        await close(writer)


async def serve_intercepted(guest: ServerTLS, network: SandboxNetwork, origin: Origin, upstream: Upstream) -> None:
    """The requests of an intercepted connection, one after another, over one upstream connection."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while True:
        try:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                request = await next_event(guest, conn)
        except (TimeoutError, h11.RemoteProtocolError):
            return
        if not isinstance(request, h11.Request):
            return
        host = dict(request.headers).get(b"host", b"")
        try:
            if not origin.matches(host):
                raise Refused(421, f"the request's Host {host[:100]!r} is not the intercepted host {origin.host}")
            await exchange(guest, conn, request, request.target, network, origin, upstream,
                           secrets_host=origin.host, keep_alive=True)
        except Refused as exc:
            network.refuse(f"{origin.host}:{origin.port}", exc.reason)
            with contextlib.suppress(ConnectionError, OSError, h11.LocalProtocolError):
                answer_error(guest, conn, exc.status, exc.reason)
                await guest.drain()
            return
        if conn.states != {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE} or \
                upstream.conn.states != {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            return
        conn.start_next_cycle()
        upstream.conn.start_next_cycle()


async def exchange(client: Stream, conn: h11.Connection, request: h11.Request, target: bytes,
                   network: SandboxNetwork, origin: Origin, upstream: Upstream, *,
                   secrets_host: str | None, keep_alive: bool) -> None:
    """Forward one request and relay its answer.

    Args:
        secrets_host: where the request goes over TLS, whose secrets are filled in; None for
            plain HTTP, which no placeholder may reach.
    """
    secrets = network.secrets

    def fill(data: bytes) -> bytes:
        try:
            return secrets.fill(data, secrets_host)
        except Leak as exc:
            raise Refused(403, str(exc)) from None

    # raw_items: the names as the guest spelled them (h11 lower-cases them otherwise); some
    # servers care. Header names are ASCII tokens (h11 checked them).
    raw = [(name.decode("ascii"), value) for name, value in request.headers.raw_items()]
    dropped = NOT_FORWARDED | named_by_connection((name, value.decode("latin-1")) for name, value in raw)
    headers = [(name.encode("ascii"), fill(value)) for name, value in raw if name.lower() not in dropped]
    if not any(name.lower() == b"host" for name, _ in headers):
        default = origin.port == (443 if origin.scheme == "https" else 80)
        headers.insert(0, (b"host", origin.host.encode() + (b"" if default else b":%d" % origin.port)))
    if not keep_alive:
        headers.append((b"connection", b"close"))
    target = fill(target)
    if conn.they_are_waiting_for_100_continue:
        send(client, conn, h11.InformationalResponse(status_code=100, headers=[]))
    body, ended = await _read_some(client, conn, network)
    filler = StreamFiller(secrets, secrets_host)
    try:
        if ended:
            whole = filler.feed(body) + filler.end()
            send(upstream, upstream.conn, h11.Request(method=request.method, target=target,
                                                      headers=[*headers, (b"content-length", b"%d" % len(whole))]))
            send(upstream, upstream.conn, h11.Data(data=whole), h11.EndOfMessage())
        else:
            send(upstream, upstream.conn, h11.Request(method=request.method, target=target,
                                                      headers=[*headers, (b"transfer-encoding", b"chunked")]))
            send(upstream, upstream.conn, h11.Data(data=filler.feed(body)))
            await upstream.drain()
            while True:
                event = await next_event(client, conn)
                if isinstance(event, h11.Data):
                    if piece := filler.feed(event.data):
                        send(upstream, upstream.conn, h11.Data(data=piece))
                        await upstream.drain()
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise Refused(400, "the request body ended early")
            if tail := filler.end():
                send(upstream, upstream.conn, h11.Data(data=tail))
            send(upstream, upstream.conn, h11.EndOfMessage())
    except Leak as exc:
        raise Refused(403, str(exc)) from None
    except h11.RemoteProtocolError as exc:
        raise Refused(400, f"a malformed request: {exc}") from None
    await upstream.drain()
    await _relay_response(client, conn, request, network, upstream)


async def _read_some(client: Stream, conn: h11.Connection, network: SandboxNetwork) -> tuple[bytes, bool]:
    """Up to MAX_BUFFERED_BODY bytes of the request's body (less when the sandbox's other
    connections hold its share), and whether that is all of it."""
    body = bytearray()
    limit = max(0, min(MAX_BUFFERED_BODY, MAX_BUFFERED_BYTES - network.buffered))
    try:
        while True:
            event = await next_event(client, conn)
            if isinstance(event, h11.Data):
                body += event.data
                network.buffered += len(event.data)
                if len(body) > limit:
                    return bytes(body), False
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body), True
            else:
                raise Refused(400, "the request body ended early")
    except h11.RemoteProtocolError as exc:
        raise Refused(400, f"a malformed request: {exc}") from None
    finally:
        network.buffered -= len(body)


async def _relay_response(client: Stream, conn: h11.Connection, request: h11.Request, network: SandboxNetwork,
                          upstream: Upstream) -> None:
    redactor = Redactor(network.secrets)
    try:
        while True:
            event = await next_event(upstream, upstream.conn)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code != 101:
                    continue  # 100 Continue and the like: the proxy already read the whole body
                raise Refused(502, "protocol upgrades (WebSocket) to a secret's host are not relayed")
            break
        if not isinstance(event, h11.Response):
            raise Refused(502, "the upstream closed without answering")
        kept_length = set() if network.secrets else {"content-length"}  # a redacted body is re-chunked
        headers = [(name, redactor.redact(value)) for name, value in event.headers.raw_items()
                   if name.decode("ascii").lower() not in NOT_FORWARDED - kept_length]
        send(client, conn, h11.Response(status_code=event.status_code, headers=headers, reason=event.reason))
        while True:
            event = await next_event(upstream, upstream.conn)
            if isinstance(event, h11.Data):
                if piece := redactor.feed(event.data):
                    send(client, conn, h11.Data(data=piece))
                    await client.drain()
            elif isinstance(event, h11.EndOfMessage):
                if tail := redactor.end():
                    send(client, conn, h11.Data(data=tail))
                send(client, conn, h11.EndOfMessage())
                await client.drain()
                return
            else:
                raise Refused(502, "the upstream's answer ended early")
    except h11.RemoteProtocolError as exc:
        raise Refused(502, f"the upstream broke HTTP/1.1: {exc}") from None


def answer_error(client: Stream, conn: h11.Connection, status: int, reason: str) -> None:
    """An error answer whose body says why, if nothing of an answer was sent yet."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"sandgate egress: {reason}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)),
               (b"connection", b"close"), REFUSAL_HEADER]
    if status == 407:  # a listener shared by sandboxes (pods') asks for their credentials (RFC 9110 11.7.1)
        headers.append((b"proxy-authenticate", b'Basic realm="sandgate egress"'))
    send(client, conn, h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage())
