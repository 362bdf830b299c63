"""Reaching an upstream under a sandbox's policy: the target's parts, its admitted addresses
(named, resolved by the gateway, each address checked), and the connection to the first that
answers. Shared by the proxy's tunnels and its request forwarding."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from urllib.parse import urlsplit

from gateway.egress.network import SandboxNetwork
from gateway.egress.policy import IPAddress, normal_name
from gateway.egress.resolver import ResolveError
from gateway.egress.streams import READ_CHUNK
from guest_agent.wire import ProtocolError

#: How long connecting to the upstream may take, all of its addresses (and TLS) together.
CONNECT_TIMEOUT_S = 10.0

class Refused(Exception):
    """A request the proxy will not carry out: an HTTP status and the reason for its body."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def authority(text: str, default_port: int | None) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port).

    Raises:
        Refused: 400 for anything else, or user information.
    """
    if "@" in text:
        raise Refused(400, "user information in the target is not accepted")
    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    port = port if port is not None else default_port
    if not host or port is None or not 0 < port < 65536:
        raise Refused(400, f"the target must be host:port, not {text[:100]!r}")
    return host, port


def host_name(host: str) -> str | None:
    """The normalised name of `host`, or None for an address literal.

    Raises:
        Refused: 400 for something that is neither.
    """
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    try:
        return normal_name(host)
    except ProtocolError as exc:
        raise Refused(400, exc.message) from None


async def admitted(network: SandboxNetwork, host: str, port: int) -> tuple[str | None, list[IPAddress]]:
    """The addresses of `host` this sandbox may connect to on `port`, in order, and its name.

    Raises:
        Refused: 403 with the policy's reason, 502 when the name does not resolve.
    """
    name = host_name(host)
    if name is not None:
        why = network.name_refusal(name, port)
        if why is not None:
            raise Refused(403, why)
    try:
        addresses = await network.resolve(name) if name is not None else [ipaddress.ip_address(host)]
    except ResolveError as exc:
        raise Refused(502, str(exc)) from None
    names = [name] if name is not None else []
    reasons = [(address, network.address_refusal(address, port, names)) for address in dict.fromkeys(addresses)]
    ok = [address for address, why in reasons if why is None]
    if not ok:
        raise Refused(403, next((why for _, why in reasons if why), f"{host} has no address"))
    return name, ok


async def connect(network: SandboxNetwork, name: str | None, addresses: list[IPAddress], port: int, *,
                  tls_name: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, IPAddress]:
    """A connection to the first of `addresses` that answers (TLS to `tls_name` if given).

    Raises:
        Refused: 502 (or 504 on the timeout) naming the first address and the error.
    """
    last: Exception | None = None
    context = network.egress.upstream_tls if tls_name is not None else None
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            for address in addresses:
                try:
                    reader, writer = await asyncio.open_connection(
                        str(address), port, limit=READ_CHUNK, ssl=context, server_hostname=tls_name)
                except OSError as exc:  # ssl.SSLError (a certificate refused) is an OSError
                    last = exc
                    continue
                network.counters.connections += 1
                return reader, writer, address
    except TimeoutError:
        raise Refused(504, f"connecting to {addresses[0]} port {port} timed out") from None
    raise Refused(502, f"cannot connect to {name or addresses[0]} ({addresses[0]}) port {port}: {last}")


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
