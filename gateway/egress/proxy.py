"""The policy proxy: every outbound connection of every sandbox ends here, on the gateway.

An HTTP/1.1 forward proxy (h11 parses what the guest sends):
- `CONNECT host:port` opens a tunnel (HTTPS and any other TCP). The name is checked against the
  sandbox's policy, resolved by the gateway, each address checked again (so a name resolving to a
  private address is refused), and the connection goes to an address that passed (never resolved
  again, so the name cannot be rebound between check and connect). When the guest starts TLS the
  server name it asks for (SNI) is read, and must be one the policy admits at that address. For
  a host one of the sandbox's secrets is bound to, the proxy ends the guest's TLS itself, with a
  certificate from the sandbox's CA, reads the requests and fills in the secrets (forward.py).
- `GET http://host/...` (any method, absolute URI): one request, forwarded with `Connection:
  close`; no secret goes over plain HTTP (a request carrying a placeholder is refused).
- `GET https://host/...`: the same, but the proxy speaks TLS to the host and fills in the
  secrets bound to it: what the WASM runtime's `sandgate.fetch` sends.

Which sandbox a connection is from is decided before it is read (a microVM's or WASM sandbox's
own handoff socket) or from the first request (a pod's `Proxy-Authorization`, by `find`).
A refusal answers an HTTP error whose body says why, is counted and logged once
(`SandboxNetwork.refuse`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import h11

from gateway.egress import forward, tls
from gateway.egress.network import Connection, SandboxNetwork
from gateway.egress.policy import IPAddress, normal_name
from gateway.egress.streams import READ_CHUNK, PlainStream, send
from gateway.egress.upstream import Refused, admitted, authority, close, connect
from gateway.http1 import next_event
from guest_agent.wire import ProtocolError

log = logging.getLogger("sandgate.egress")

#: The largest request head taken (request line and headers).
MAX_HEAD_BYTES = 16 << 10
#: How long a client has to send its request head.
HEAD_TIMEOUT_S = 30.0
#: Which sandbox a request is from, for listeners shared by several (pods); raises Refused(407).
Find = Callable[[h11.Request], SandboxNetwork]


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, find: Find) -> None:
    """Serve one client connection (a tunnel, or requests), then close it."""
    client = PlainStream(reader, writer)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    network: SandboxNetwork | None = None
    target = "?"
    try:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                request = await next_event(client, conn)
        except TimeoutError:
            return
        except h11.RemoteProtocolError as exc:
            raise Refused(exc.error_status_hint, f"not an HTTP/1.1 proxy request: {exc}") from None
        if not isinstance(request, h11.Request):
            return
        network = find(request)
        target = request.target.decode("ascii", "replace")[:200]
        if request.method == b"CONNECT":
            await tunnel(client, conn, request, network)
        else:
            await forward.serve(client, conn, request, network)
    except Refused as exc:
        if network is not None:
            network.refuse(target, exc.reason)
        else:
            log.info("egress: refused %s (%d): %s", target, exc.status, exc.reason)
        with contextlib.suppress(ConnectionError, OSError, h11.LocalProtocolError):
            forward.answer_error(client, conn, exc.status, exc.reason)
            await client.drain()
    except ConnectionError:
        pass  # a side went away mid-answer (the guest dropped a response, a policy change cut it): no fault
    finally:
        await close(writer)


def sni_refusal(network: SandboxNetwork, name: str | None, address: IPAddress, port: int,
                server_name: str | None) -> str | None:
    """Why a TLS client may not ask for `server_name` on a tunnel to `address` (CONNECT named
    `name`, or an address), or None. Only a policy of rules cares, and only where a name rule
    admitted the address: the name asked for must be the one the tunnel was opened to (or, to an
    address, one this sandbox resolved to it) and admitted itself."""
    policy = network.policy
    host_own = network.egress.host_own()
    if policy.mode != "rules" or policy.address_refusal(address, port, (), host_own) is None:
        return None
    if not server_name:
        return "a TLS connection admitted by a name rule must name its server (SNI)"
    try:
        asked = normal_name(server_name)
    except ProtocolError:
        return f"the TLS server name {server_name[:100]!r} is not a host name"
    if name is not None and asked != name:
        return f"the TLS server name {asked} does not match the tunnel's host {name}"
    if name is None and asked not in network.resolutions.names(address, time.monotonic()):
        return f"the TLS server name {asked} was not resolved to {address} by this sandbox"
    return policy.address_refusal(address, port, [asked], host_own)


async def tunnel(client: PlainStream, conn: h11.Connection, request: h11.Request, network: SandboxNetwork) -> None:
    host, port = authority(request.target.decode("ascii", "replace"), default_port=None)
    name, addresses = await admitted(network, host, port)
    if name is not None and network.secrets.intercepts(name):
        await intercept(client, conn, network, name, addresses, port)
        return
    reader, writer, address = await connect(network, name, addresses, port)
    connection = Connection(address, port, (name,) if name else (), _aborter(client.writer, writer))
    network.open.add(connection)
    try:
        send(client, conn, h11.Response(status_code=200, headers=[], reason=b"Connection established"))
        first = conn.trailing_data[0]
        await asyncio.gather(_client_to_upstream(client, writer, network, name, address, port, first),
                             _pipe(reader, client.writer, writer, network, inbound=True))
    finally:
        network.open.discard(connection)
        await close(writer)


async def intercept(client: PlainStream, conn: h11.Connection, network: SandboxNetwork, name: str,
                    addresses: list[IPAddress], port: int) -> None:
    """A tunnel to a host a secret is bound to: TLS ends here, requests are forwarded one by one."""
    reader, writer, address = await connect(network, name, addresses, port, tls_name=name)
    connection = Connection(address, port, (name,), _aborter(client.writer, writer))
    network.open.add(connection)
    try:
        send(client, conn, h11.Response(status_code=200, headers=[], reason=b"Connection established"))
        first = conn.trailing_data[0] or await client.read()
        if not tls.looks_like_tls(first):
            network.refuse(f"{name}:{port}", "a secret's host is reached over TLS only")
            return
        peek = tls.ServerNamePeek()
        seen = first
        while not peek.feed(first):
            first = await client.read()
            if not first:
                return
            seen += first
        if peek.server_name is not None and normal_name(peek.server_name) != name:
            network.refuse(f"{name}:{port}", f"the TLS server name {peek.server_name[:100]} does not match {name}")
            return
        guest = tls.ServerTLS(client.reader, client.writer, network.ca.server_context(name))
        try:
            await guest.handshake(seen)
        except (OSError, ConnectionError) as exc:  # ssl.SSLError included: e.g. the guest does not trust the CA
            network.refuse(f"{name}:{port}", f"the guest's TLS handshake failed: {exc}")
            return
        await forward.serve_intercepted(guest, network, forward.Origin("https", name, port),
                                        forward.Upstream(reader, writer, network))
    finally:
        network.open.discard(connection)
        await close(writer)


async def _client_to_upstream(client: PlainStream, upstream: asyncio.StreamWriter, network: SandboxNetwork,
                              name: str | None, address: IPAddress, port: int, first: bytes) -> None:
    """Relay the guest's bytes; if they start TLS, the server name it asks for is checked first."""
    try:
        data = first or await client.read()
        if data and tls.looks_like_tls(data):
            peek = tls.ServerNamePeek()
            held = bytearray(data)
            while not peek.feed(data):
                data = await client.read()
                if not data:
                    break
                held += data
            why = sni_refusal(network, name, address, port, peek.server_name)
            if why is not None:
                network.refuse(f"{name or address}:{port}", why)
                client.writer.transport.abort()
                upstream.transport.abort()
                return
            data = bytes(held)
        if data:
            network.counters.bytes_out += len(data)
            upstream.write(data)
            await upstream.drain()
            await _pipe(client.reader, upstream, client.writer, network, inbound=False)
        elif upstream.can_write_eof() and not upstream.is_closing():
            upstream.write_eof()
    except (ConnectionError, OSError):
        client.writer.transport.abort()
        upstream.transport.abort()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, src_writer: asyncio.StreamWriter,
                network: SandboxNetwork, *, inbound: bool) -> None:
    """Copy `src` to `dst` until end of input, then half-close `dst`; count the bytes. On an
    error, both ends are aborted, so the other direction ends too."""
    try:
        while data := await src.read(READ_CHUNK):
            if inbound:
                network.counters.bytes_in += len(data)
            else:
                network.counters.bytes_out += len(data)
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.transport.abort()
        src_writer.transport.abort()


def _aborter(*writers: asyncio.StreamWriter) -> Callable[[], None]:
    def abort() -> None:
        for writer in writers:
            writer.transport.abort()
    return abort


