"""One sandbox's network as the gateway holds it (`SandboxNetwork`), and the gateway-wide part
every sandbox's shares (`Egress`: the resolver, the trust for upstream TLS, the host's addresses,
the sandboxes by id for listeners that must find one).

Everything a runtime brings to the policy proxy or the DNS server is judged against the
`SandboxNetwork` of the sandbox it came from: its policy (changed live by `PATCH`), the names it
resolved (a name rule matches an address only through them), its secrets and the CA that signs
the certificates of their hosts, and the figures its metrics show.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.egress.ca import SandboxCA
from gateway.egress.policy import IPAddress, NetworkPolicy, host_addresses
from gateway.egress.resolver import Resolver
from gateway.egress.secrets import Secrets

log = logging.getLogger("sandgate.egress")

#: How long a name this sandbox resolved lets a name rule match its address (DNS answers say 30 s;
#: clients cache longer than they are told, so the gateway remembers longer).
RESOLUTION_TTL_S = 600.0
#: The names remembered per sandbox: the oldest are forgotten first.
MAX_RESOLUTIONS = 4096
#: Refusals kept for `GET /v1/sandboxes/{id}/network`.
RECENT_REFUSALS = 50
#: Names one sandbox may have the gateway resolve at once (its DNS queries and proxy requests
#: together): a guest cannot turn the gateway into a flood of queries to the operator's resolver.
MAX_RESOLVING = 8
#: Request bytes one sandbox's connections may have the proxy hold at once to fill in secrets;
#: past it, bodies stream (filled piece by piece) instead of being read whole.
MAX_BUFFERED_BYTES = 4 << 20
#: How long the gateway host's own addresses (refused to every sandbox) are taken as read.
HOST_ADDRESSES_S = 1.0
#: Refusal log lines per sandbox: this many, then one a LOG_EVERY_S (a guest that loops on a
#: refused name must not fill the gateway's log); the rest are counted only.
LOG_BURST = 20
LOG_EVERY_S = 10.0


class Resolutions:
    """Which names this sandbox resolved to which address, and until when (sans-I/O: `now` given).
    Looked up by address on every connection and DNS answer, so kept by address."""

    def __init__(self, ttl_s: float = RESOLUTION_TTL_S, limit: int = MAX_RESOLUTIONS) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        #: (address, name) pairs, oldest first: the limit forgets from the front.
        self._order: collections.OrderedDict[tuple[IPAddress, str], None] = collections.OrderedDict()
        self._until: dict[IPAddress, dict[str, float]] = {}

    def record(self, name: str, addresses: Iterable[IPAddress], now: float) -> None:
        for address in addresses:
            self._order.pop((address, name), None)
            self._order[(address, name)] = None
            self._until.setdefault(address, {})[name] = now + self.ttl_s
        while len(self._order) > self.limit:
            address, name = self._order.popitem(last=False)[0]
            names = self._until[address]
            del names[name]
            if not names:
                del self._until[address]

    def names(self, address: IPAddress, now: float) -> list[str]:
        return [name for name, until in self._until.get(address, {}).items() if until > now]


@dataclass
class Counters:
    """A sandbox's network figures, as its metrics show them."""

    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0
    refusals: int = 0
    dns_queries: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class Connection:
    """An open upstream connection, kept so a policy change can end the ones it no longer allows."""

    address: IPAddress
    port: int
    names: tuple[str, ...]
    abort: Callable[[], None]


@dataclass
class SandboxNetwork:
    sandbox_id: str
    tenant: str
    policy: NetworkPolicy
    egress: Egress
    secrets: Secrets = field(default_factory=Secrets)
    resolutions: Resolutions = field(default_factory=Resolutions)
    counters: Counters = field(default_factory=Counters)
    recent: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_REFUSALS))
    open: set[Connection] = field(default_factory=set)
    _ca: SandboxCA | None = None
    #: Held while a name of this sandbox's is being resolved (MAX_RESOLVING at once).
    resolving: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_RESOLVING))
    #: Request body bytes the proxy holds for this sandbox now (MAX_BUFFERED_BYTES at most).
    buffered: int = 0
    _log_allowance: float = LOG_BURST
    _log_checked: float = field(default_factory=time.monotonic)
    _log_skipped: int = 0

    def __hash__(self) -> int:
        return id(self)

    @property
    def ca(self) -> SandboxCA:
        """The CA whose certificates the guest sees for its secrets' hosts (made on first use; its
        name constraints admit only those hosts)."""
        if self._ca is None:
            self._ca = SandboxCA(self.sandbox_id, [rule for item in self.secrets.items for rule in item.hosts])
        return self._ca

    def refuse(self, target: str, reason: str) -> None:
        """Count a refusal and say it once: a log line and the sandbox's recent refusals."""
        self.counters.refusals += 1
        self.recent.append({"time": time.time(), "target": target, "reason": reason})
        now = time.monotonic()
        self._log_allowance = min(LOG_BURST, self._log_allowance + (now - self._log_checked) / LOG_EVERY_S)
        self._log_checked = now
        if self._log_allowance < 1:
            self._log_skipped += 1
            return
        self._log_allowance -= 1
        skipped, self._log_skipped = self._log_skipped, 0
        log.info("egress sandbox=%s tenant=%s refused %s: %s%s", self.sandbox_id, self.tenant, target, reason,
                 f" ({skipped} more refusals not logged)" if skipped else "")

    async def resolve(self, name: str) -> list[IPAddress]:
        """`name`'s addresses by the gateway's resolver, remembered as resolved by this sandbox
        (the policy judges them, not this).

        Raises:
            ResolveError: as `Resolver.resolve`.
        """
        async with self.resolving:
            addresses = await self.egress.resolver.resolve(name)
        self.resolved(name, addresses)
        return addresses

    def name_refusal(self, name: str, port: int | None) -> str | None:
        return self.policy.name_refusal(name, port)

    def address_refusal(self, address: IPAddress, port: int | None, names: Iterable[str] = ()) -> str | None:
        """Why this sandbox may not connect to `address`: by the policy, through `names` plus the
        names it resolved to the address."""
        known = set(names) | set(self.resolutions.names(address, time.monotonic()))
        return self.policy.address_refusal(address, port, known, self.egress.host_own())

    def resolved(self, name: str, addresses: Iterable[IPAddress]) -> None:
        self.resolutions.record(name, addresses, time.monotonic())

    def set_policy(self, policy: NetworkPolicy) -> int:
        """Change the policy of a running sandbox: open connections the new one refuses are ended.
        Returns how many were."""
        self.policy = policy
        ended = 0
        for connection in list(self.open):
            why = self.address_refusal(connection.address, connection.port, connection.names)
            if why is not None:
                self.refuse(f"{connection.address} port {connection.port}", f"policy changed: {why}")
                connection.abort()
                self.open.discard(connection)
                ended += 1
        log.info("egress sandbox=%s tenant=%s policy set to %s (%d open connections ended)",
                 self.sandbox_id, self.tenant, policy.to_wire(), ended)
        return ended

    def describe(self) -> dict[str, Any]:
        """`GET /v1/sandboxes/{id}/network`: the policy, secrets (never values), figures, refusals."""
        return {"policy": self.policy.to_wire(), "secrets": self.secrets.describe(),
                "metrics": self.counters.as_dict(), "open_connections": len(self.open),
                "recent_refusals": list(self.recent)}


@dataclass
class Egress:
    """The gateway-wide part: one per gateway."""

    resolver: Resolver = field(default_factory=Resolver)
    #: Trust for upstream TLS (the proxy's own connections to secrets' hosts and https:// URLs).
    upstream_tls: ssl.SSLContext = field(default_factory=ssl.create_default_context)
    host_own: Callable[[], frozenset[IPAddress]] = field(default_factory=lambda: _Recent(host_addresses))
    sandboxes: dict[str, SandboxNetwork] = field(default_factory=dict)

    def attach(self, sandbox_id: str, tenant: str, policy: NetworkPolicy, secrets: Secrets) -> SandboxNetwork:
        network = SandboxNetwork(sandbox_id, tenant, policy, self, secrets)
        self.sandboxes[sandbox_id] = network
        return network

    def detach(self, network: SandboxNetwork) -> None:
        """The sandbox is gone: forget it and end its connections."""
        if self.sandboxes.get(network.sandbox_id) is network:
            del self.sandboxes[network.sandbox_id]
        for connection in list(network.open):
            connection.abort()
        network.open.clear()


class _Recent:
    """`read()`'s answer, read again once it is HOST_ADDRESSES_S old: the host's addresses are
    checked on every connection and DNS answer (a /proc read, ~0.2 ms), and an address added to
    the host still counts within a second."""

    def __init__(self, read: Callable[[], frozenset[IPAddress]]) -> None:
        self._read = read
        self._value: frozenset[IPAddress] = frozenset()
        self._at = -HOST_ADDRESSES_S

    def __call__(self) -> frozenset[IPAddress]:
        now = time.monotonic()
        if now - self._at >= HOST_ADDRESSES_S:
            self._value, self._at = self._read(), now
        return self._value


def upstream_context(extra_ca_file: str | None) -> ssl.SSLContext:
    """The system's trust, plus an operator's extra CA file (a corporate or test CA)."""
    context = ssl.create_default_context()
    if extra_ca_file:
        context.load_verify_locations(cafile=extra_ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context

