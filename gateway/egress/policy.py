"""Which addresses a sandbox may connect to: public ones only, never the gateway's host.

Sans-I/O except `host_addresses`, which reads the host's own addresses from /proc. The one table
of refused ranges is `REFUSED`; the network issue's allowlists are meant to be checked after it
(an allowlist can narrow what is public, never reopen these).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Ranges no sandbox may reach, with why. Written out rather than taken from `ipaddress`'s
#: `is_private` / `is_global`: those also count the documentation ranges (192.0.2.0/24,
#: 198.51.100.0/24, 203.0.113.0/24) as private, which would leave the tests no "public" address
#: to stand up an upstream on, and their lists change between Python versions.
REFUSED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why) for net, why in (
        ("0.0.0.0/8", "unspecified ('this network')"),
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("100.64.0.0/10", "carrier-grade NAT (RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        # Link-local, the cloud metadata service 169.254.169.254 among them.
        ("169.254.0.0/16", "link-local (the cloud metadata address among them)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("198.18.0.0/15", "benchmarking (RFC 2544)"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (and broadcast)"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "unique local (ULA)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)


def refusal(address: IPAddress, host_own: Iterable[IPAddress] = ()) -> str | None:
    """Why a sandbox may not connect to `address`, or None if it may.

    IPv6 addresses that carry an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, 6to4 2002::/16, NAT64
    64:ff9b::/96) are judged by the IPv4 address they reach.

    Args:
        host_own: the host's own addresses (`host_addresses()`): a public address of the host
            still reaches the gateway's host.
    """
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        why = refusal(embedded, host_own)
        return None if why is None else f"{why}, as {address}"
    for network, why in REFUSED:
        if address.version == network.version and address in network:
            return f"{address} is {why} ({network})"
    if address in set(host_own):
        return f"{address} is an address of the gateway's host"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def host_addresses() -> frozenset[IPAddress]:
    """The addresses of this host's interfaces (Linux: /proc/net/fib_trie and /proc/net/if_inet6;
    empty where they cannot be read). Read at each check, so an address added later counts."""
    found: set[IPAddress] = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            last = ""
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] in ("|--", "+--"):
                    last = words[1]
                elif "/32 host LOCAL" in line and last:
                    found.add(ipaddress.IPv4Address(last))
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                hex_address = line.split()[0]
                found.add(ipaddress.IPv6Address(int(hex_address, 16)))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)
