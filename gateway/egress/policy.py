"""Where a sandbox may connect: its network policy, and the ranges no policy reopens.

A sandbox's `"network"` at create (and `PATCH`) is one of:
- `"none"` (the default): nothing at all;
- `"public"`: any public address, never one in `REFUSED` (private, loopback, link-local and the
  metadata address, CGNAT, ULA, ...) nor an address of the gateway's host;
- `"all"`: everything but loopback and the gateway's host (so private networks and the metadata
  address too): an operator must allow it per tenant (`[network] all`);
- `{"allow": [...], "deny": [...]}`: rules, each a name (`api.example.com`), a wildcard
  (`*.example.org`: its subdomains, not itself), an address or CIDR (`203.0.113.0/24`), any of
  them with a port (`host:443`, `[2001:db8::1]:443`). The deny list is read first, then the allow
  list; the first rule that matches decides; nothing matched is refused. Whatever the rules say,
  `REFUSED` stays refused: rules narrow "public", they never open private ranges.

A name rule matches an address only through a name this sandbox resolved to it (by its DNS
answers or a proxy request naming the host): an allowed name cannot be used to reach an address
it does not resolve to, and a raw address matches only address rules.

Sans-I/O except `host_addresses`, which reads the host's own addresses from /proc.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from guest_agent.wire import ProtocolError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Ranges no sandbox may reach, with why. Written out rather than taken from `ipaddress`'s
#: `is_private` / `is_global`: those also count the documentation ranges (192.0.2.0/24,
#: 198.51.100.0/24, 203.0.113.0/24) as private, which would leave the tests no "public" address
#: to stand up an upstream on, and their lists change between Python versions.
REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
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


#: What even `"all"` refuses: the gateway's host itself (its own addresses are added at each check).
ALWAYS_REFUSED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (net, why) for net, why in REFUSED if str(net) in ("0.0.0.0/8", "127.0.0.0/8", "::/128", "::1/128"))


def refusal(address: IPAddress, host_own: Iterable[IPAddress] = (),
            table: tuple[tuple[IPNetwork, str], ...] = REFUSED) -> str | None:
    """Why a sandbox may not connect to `address`, or None if it may (before any rules).

    IPv6 addresses that carry an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, 6to4 2002::/16, NAT64
    64:ff9b::/96) are judged by the IPv4 address they reach.

    Args:
        host_own: the host's own addresses (`host_addresses()`): a public address of the host
            still reaches the gateway's host.
        table: the ranges refused (`ALWAYS_REFUSED` for a sandbox with `"all"`).
    """
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        why = refusal(embedded, host_own, table)
        return None if why is None else f"{why}, as {address}"
    for network, why in table:
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


#: The modes a policy's wire form names; a rules object is mode "rules".
MODES = ("none", "public", "all")
#: Bounds on what a client may send: rules per list, a rule's length.
MAX_RULES = 256
MAX_RULE_CHARS = 300


@dataclass(frozen=True)
class Rule:
    """One allow or deny entry: exactly one of `name` (lower case, no trailing dot), `suffix`
    (".example.org" for "*.example.org") and `network`, and an optional port."""

    text: str
    name: str | None = None
    suffix: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: Any) -> Rule:
        if not isinstance(text, str) or not 0 < len(text) <= MAX_RULE_CHARS:
            raise ProtocolError("bad_request", f"network: a rule is a string of 1 to {MAX_RULE_CHARS} characters")
        host, port = _split_port(text)
        try:
            return cls(text, network=ipaddress.ip_network(host, strict=False), port=port)
        except ValueError:
            pass
        if host.startswith("*."):
            return cls(text, suffix="." + normal_name(host[2:], text), port=port)
        return cls(text, name=normal_name(host, text), port=port)

    def matches_name(self, name: str, port: int | None) -> bool:
        """Whether the rule covers `name` (normalised) on `port` (None: some port)."""
        if self.port is not None and port is not None and port != self.port:
            return False
        if self.name is not None:
            return name == self.name
        return self.suffix is not None and name.endswith(self.suffix)

    def matches_address(self, address: IPAddress, port: int | None, names: Iterable[str]) -> bool:
        """Whether the rule covers `address` on `port`: an address rule by its range, a name rule
        through one of `names`, the names this sandbox resolved to the address."""
        if self.network is None:
            return any(self.matches_name(name, port) for name in names)
        if self.port is not None and port is not None and port != self.port:
            return False
        embedded = _embedded_ipv4(address)
        return any(a.version == self.network.version and a in self.network
                   for a in (address, embedded) if a is not None)


def _split_port(text: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port`, or a bare host / v6 address / CIDR."""
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ProtocolError("bad_request", f"network: {text!r} is not [address]:port")
        return inside, _port(rest[1:], text) if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _port(port, text)
    return text, None


def _port(text: str, rule: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ProtocolError("bad_request", f"network: {rule!r} has no valid port (1-65535)")
    return int(text)


def normal_name(name: str, shown: str | None = None) -> str:
    """A DNS name as rules and answers compare it: lower case, no trailing dot, IDNA-encoded.

    Raises:
        ProtocolError: `bad_request` for something that is not a host name.
    """
    text = name.rstrip(".").lower()
    try:
        text = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        text = ""
    labels = text.split(".")
    if not text or len(text) > 253 or not all(
            0 < len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label) for label in labels):
        raise ProtocolError("bad_request", f"network: {shown or name!r} is not a host name, address or CIDR")
    return text


@dataclass(frozen=True)
class NetworkPolicy:
    """A sandbox's network policy (see the module's docstring)."""

    mode: str = "none"
    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()

    @classmethod
    def parse(cls, value: Any) -> NetworkPolicy:
        """The policy a wire value names. `true` and `false` (wave 1's form) mean "public" and "none".

        Raises:
            ProtocolError: `bad_request`, naming what is wrong.
        """
        if value is None or value is False:
            return cls("none")
        if value is True:
            return cls("public")
        if isinstance(value, str):
            if value not in MODES:
                raise ProtocolError("bad_request", f"network must be one of {list(MODES)} or "
                                                   "{\"allow\": [...], \"deny\": [...]}, not {value!r}")
            return cls(value)
        if not isinstance(value, Mapping):
            raise ProtocolError("bad_request", "network must be a string or {\"allow\": [...], \"deny\": [...]}")
        unknown = set(value) - {"allow", "deny"}
        if unknown:
            raise ProtocolError("bad_request", f"network: unknown keys {sorted(unknown)} (have allow, deny)")
        lists = []
        for key in ("allow", "deny"):
            items = value.get(key, [])
            if not isinstance(items, list) or len(items) > MAX_RULES:
                raise ProtocolError("bad_request", f"network.{key} must be a list of at most {MAX_RULES} rules")
            lists.append(tuple(Rule.parse(item) for item in items))
        return cls("rules", allow=lists[0], deny=lists[1])

    def to_wire(self) -> str | dict[str, list[str]]:
        if self.mode != "rules":
            return self.mode
        return {"allow": [r.text for r in self.allow], "deny": [r.text for r in self.deny]}

    @property
    def has_network(self) -> bool:
        return self.mode != "none"

    def name_refusal(self, name: str, port: int | None = None) -> str | None:
        """Why this sandbox may not reach `name` (normalised) on `port` (None: some port), before
        resolution: DNS answers NXDOMAIN for it, the proxy refuses to resolve it."""
        if self.mode == "none":
            return "the sandbox has no network"
        if self.mode != "rules":
            return None
        for rule in self.deny:
            if rule.matches_name(name, port):
                return f"{name} is denied by the rule {rule.text!r}"
        if any(rule.matches_name(name, port) for rule in self.allow):
            return None
        return f"{name}{'' if port is None else f':{port}'} is not in the allow list"

    def address_refusal(self, address: IPAddress, port: int | None, names: Iterable[str],
                        host_own: Iterable[IPAddress]) -> str | None:
        """Why this sandbox may not connect to `address` on `port`, or None.

        Args:
            names: the names this sandbox resolved to `address` (the one a request named, or its
                DNS answers): name rules match through them.
            host_own: the gateway host's addresses, refused always.
        """
        if self.mode == "none":
            return "the sandbox has no network"
        table = ALWAYS_REFUSED if self.mode == "all" else REFUSED
        why = refusal(address, host_own, table)
        if why is not None:
            return why if self.mode == "all" else f"sandboxes may reach public addresses only: {why}"
        if self.mode != "rules":
            return None
        names = list(names)
        for rule in self.deny:
            if rule.matches_address(address, port, names):
                return f"{address} is denied by the rule {rule.text!r}"
        if any(rule.matches_address(address, port, names) for rule in self.allow):
            return None
        via = f" (resolved from {', '.join(sorted(names))})" if names else ""
        return f"{address}{'' if port is None else f' port {port}'}{via} is not in the allow list"
