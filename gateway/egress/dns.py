"""The DNS server a sandbox asks (a microVM's resolv.conf names it, over TCP): answered by the
gateway, by the sandbox's policy, never by a resolver the guest reaches itself.

- A name the policy refuses: NXDOMAIN (and a refusal counted and logged).
- A/AAAA of an admitted name: the gateway resolves it (gateway/egress/resolver.py) and answers
  only the addresses the policy admits: an address in a refused range (a name rebound to
  10.0.0.1 or 127.0.0.1) is dropped from the answer. What it answers is remembered as resolved
  by this sandbox, so name rules match those addresses when the guest connects to them.
- Any other type of an admitted name: an empty answer (the gateway resolves addresses only).

dnslib parses and builds the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from gateway.egress.network import SandboxNetwork
from gateway.egress.policy import IPAddress, normal_name
from gateway.egress.resolver import ResolveError
from guest_agent.wire import ProtocolError

#: The TTL of the answers: short, so a policy change or a new address is seen soon.
ANSWER_TTL_S = 30
#: A TCP connection with no query for this long is closed.
IDLE_TIMEOUT_S = 30.0
#: The largest query taken (real ones are a few dozen bytes).
MAX_QUERY_BYTES = 4096


async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, network: SandboxNetwork) -> None:
    """DNS over TCP (RFC 7766): length-prefixed messages, any number per connection."""
    try:
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT_S):
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                if length > MAX_QUERY_BYTES:
                    return
                query = await reader.readexactly(length)
            reply = await answer(query, network)
            if reply is None:
                return
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def answer(query: bytes, network: SandboxNetwork) -> bytes | None:
    """The reply to one DNS message, or None for something that is not a DNS query at all."""
    try:
        record = DNSRecord.parse(query)
    except (DNSError, ValueError, IndexError, struct.error):
        return None
    reply = record.reply()
    reply.header.ra = 1
    if record.header.qr or record.header.opcode != 0 or len(record.questions) != 1:
        reply.header.rcode = RCODE.NOTIMP if record.header.opcode != 0 else RCODE.FORMERR
        return bytes(reply.pack())
    network.counters.dns_queries += 1
    question = record.q
    try:
        name = normal_name(str(question.qname))
    except ProtocolError:
        reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())
    why = network.name_refusal(name, None)
    if why is not None:
        network.refuse(f"dns {name}", why)
        reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())
    if question.qtype in (QTYPE.A, QTYPE.AAAA):
        try:
            addresses = await network.resolve(name)
        except ResolveError as exc:
            reply.header.rcode = RCODE.NXDOMAIN if exc.missing else RCODE.SERVFAIL
            return bytes(reply.pack())
        version = 4 if question.qtype == QTYPE.A else 6
        kept: list[IPAddress] = []
        dropped: list[IPAddress] = []
        for address in addresses:
            if address.version != version:
                continue
            (dropped if network.address_refusal(address, None, [name]) else kept).append(address)
        if dropped:
            network.refuse(f"dns {name}", f"answers dropped (refused ranges): {', '.join(map(str, dropped))}")
        for address in kept:
            rdata = A(str(address)) if version == 4 else AAAA(str(address))
            reply.add_answer(RR(question.qname, question.qtype, rdata=rdata, ttl=ANSWER_TTL_S))
    return bytes(reply.pack())
