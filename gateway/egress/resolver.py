"""The gateway's resolver for sandboxes' names: the system's (getaddrinfo), or the name servers
the operator names in `[network] nameservers` (asked over UDP, then TCP when the answer is
truncated, with dnslib), so a deployment can give sandboxes a resolver of its own and tests a
name server of theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dnslib import QTYPE, RCODE, DNSRecord

from gateway.egress.policy import IPAddress

#: How long one question to one server may take.
QUERY_TIMEOUT_S = 3.0


class ResolveError(Exception):
    """The name has no address (`missing`), or no server answered; the message says which."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Resolver:
    #: (address, port) of each name server to ask in turn; empty: the system's resolver.
    nameservers: tuple[tuple[str, int], ...] = ()

    async def resolve(self, name: str) -> list[IPAddress]:
        """`name`'s addresses (IPv4 first); an address literal is its own.

        Raises:
            ResolveError: with the reason.
        """
        with contextlib.suppress(ValueError):
            return [ipaddress.ip_address(name)]
        if not self.nameservers:
            return await _system(name)
        found: list[IPAddress] = []
        errors: list[ResolveError] = []
        answers = await asyncio.gather(self._ask(name, "A"), self._ask(name, "AAAA"), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, ResolveError):
                errors.append(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                found += answer
        if not found:
            # No such name (or no address of either family) unless a server failed to answer.
            missing = all(error.missing for error in errors)
            raise ResolveError(str(errors[0]) if errors else f"{name} has no address", missing=missing)
        return found

    async def _ask(self, name: str, qtype: str) -> list[IPAddress]:
        query = DNSRecord.question(name, qtype)
        last = "no name server answered"
        for server in self.nameservers:
            try:
                reply = await asyncio.wait_for(_udp(query.pack(), server), QUERY_TIMEOUT_S)
                record = DNSRecord.parse(reply)
                if record.header.tc:
                    record = DNSRecord.parse(await asyncio.wait_for(_tcp(query.pack(), server), QUERY_TIMEOUT_S))
            except (OSError, TimeoutError, Exception) as exc:  # dnslib raises DNSError on a bad answer
                last = f"name server {server[0]}:{server[1]}: {exc or type(exc).__name__}"
                continue
            if record.header.id != query.header.id:
                last = f"name server {server[0]}:{server[1]} answered another question"
                continue
            if record.header.rcode == RCODE.NXDOMAIN:
                raise ResolveError(f"{name} does not exist (NXDOMAIN)", missing=True)
            want = getattr(QTYPE, qtype)
            return [ipaddress.ip_address(str(rr.rdata)) for rr in record.rr if rr.rtype == want]
        raise ResolveError(last)


async def _system(name: str) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        missing = isinstance(exc, socket.gaierror) and exc.errno in (socket.EAI_NONAME, socket.EAI_NODATA)
        raise ResolveError(f"cannot resolve {name!r}: {exc}", missing=missing) from None
    found = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
    return sorted(dict.fromkeys(found), key=lambda a: a.version)


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def _udp(query: bytes, server: tuple[str, int]) -> bytes:
    transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
        _Datagram, remote_addr=server)
    try:
        transport.sendto(query)
        return await protocol.answer
    finally:
        transport.close()


async def _tcp(query: bytes, server: tuple[str, int]) -> bytes:
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(struct.pack("!H", len(query)) + query)
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()


def parse_nameservers(values: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """`["192.0.2.53", "127.0.0.1:5353", "[2001:db8::53]:53"]` as (address, port) pairs.

    Raises:
        ValueError: naming the bad entry.
    """
    servers = []
    for value in values:
        host, port = value, 53
        if value.startswith("["):
            host, _, rest = value[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif value.count(":") == 1:
            host, _, text = value.partition(":")
            port = int(text)
        ipaddress.ip_address(host)
        if not 0 < port < 65536:
            raise ValueError(f"{value!r}: the port must be 1-65535")
        servers.append((host, port))
    return tuple(servers)
