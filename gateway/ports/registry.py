"""A sandbox's published ports: which ports, their tokens, and their open connections (sans-I/O).

Each sandbox holds one `PortRegistry`. Publishing a port makes a token (from `secrets`), which
authenticates requests to the port's URL besides the tenant's API key; tokens are compared in
constant time and never logged or listed (`describe` shows one only to the caller that published
it). The registry also counts the connections the proxy has open, per port and per sandbox, and
refuses one past the `[ports]` bounds. Nothing here reads or writes: the proxy (rest_ports) does.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.config import Ports
from guest_agent.wire import ProtocolError

#: The bytes of entropy in a port's token (URL-safe base64: 32 characters).
TOKEN_BYTES = 24


class Closable(Protocol):
    """An open proxied connection, as unpublishing sees it."""

    def close_soon(self) -> None:
        """Cut the connection (its task notices and ends)."""


def url_of(sandbox_id: str, port: int) -> str:
    """The port's URL prefix on the gateway (the contract's `url`; it ends with a slash)."""
    return f"/v1/sandboxes/{sandbox_id}/ports/{port}/"


def check_port(value: Any) -> int:
    """A port number from a request, or `bad_request`."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 5:
        value = int(value)
    if type(value) is not int or not 1 <= value <= 65535:
        raise ProtocolError("bad_request", f"'port' must be a TCP port number (1..65535), not {value!r:.40}")
    return value


@dataclass(eq=False)
class PublishedPort:
    """One published port."""

    port: int
    token: str
    created_at: float = field(default_factory=time.time)
    #: The proxied connections open to it now.
    connections: set[Closable] = field(default_factory=set)
    #: Proxied connections so far, and the bytes they carried from and to the guest.
    connections_total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def token_matches(self, token: str) -> bool:
        return secrets.compare_digest(self.token.encode(), token.encode())

    def describe(self, sandbox_id: str, *, with_token: bool) -> dict[str, Any]:
        """The port as the REST API shows it; the token only to who may have it (publish)."""
        out: dict[str, Any] = {"port": self.port, "url": url_of(sandbox_id, self.port)}
        if with_token:
            out["token"] = self.token
        out.update(created_at=self.created_at, connections=len(self.connections),
                   connections_total=self.connections_total, bytes_in=self.bytes_in, bytes_out=self.bytes_out)
        return out


class PortRegistry:
    """The published ports of one sandbox and their open connections, within `[ports]` bounds."""

    def __init__(self, limits: Ports) -> None:
        self.limits = limits
        self._ports: dict[int, PublishedPort] = {}

    def publish(self, port: int) -> tuple[PublishedPort, bool]:
        """Publish `port`; returns it and whether it is new. Publishing a published port again
        returns it unchanged, token included (so a client may publish whenever it needs the URL).

        Raises:
            ProtocolError: `bad_request` for a number that is no port; `quota_exceeded` past
                `max_per_sandbox`.
        """
        port = check_port(port)
        existing = self._ports.get(port)
        if existing is not None:
            return existing, False
        if len(self._ports) >= self.limits.max_per_sandbox:
            raise ProtocolError("quota_exceeded", f"the sandbox has {len(self._ports)} published ports, the most "
                                                  f"it may have ([ports] max_per_sandbox)")
        published = self._ports[port] = PublishedPort(port, secrets.token_urlsafe(TOKEN_BYTES))
        return published, True

    def unpublish(self, port: int) -> PublishedPort:
        """Unpublish `port`: its token stops working at once. The caller closes its connections.

        Raises:
            ProtocolError: `not_found` for a port that is not published.
        """
        published = self._ports.pop(check_port(port), None)
        if published is None:
            raise ProtocolError("not_found", f"port {port} is not published")
        return published

    def get(self, port: int) -> PublishedPort | None:
        return self._ports.get(port)

    def by_token(self, port: int, token: str) -> PublishedPort | None:
        """The published `port` if `token` is its token (compared in constant time), else None."""
        published = self._ports.get(port)
        if published is None or not published.token_matches(token):
            return None
        return published

    def list(self) -> list[PublishedPort]:
        return sorted(self._ports.values(), key=lambda p: p.port)

    @property
    def open_connections(self) -> int:
        return sum(len(p.connections) for p in self._ports.values())

    def admit(self, published: PublishedPort, connection: Closable) -> None:
        """Count a new proxied connection to `published`, or refuse it past the bounds.

        Raises:
            ProtocolError: `not_found` if the port was unpublished meanwhile; `unavailable`
                (retryable) past `max_connections_per_port` or `max_connections_per_sandbox`.
        """
        if self._ports.get(published.port) is not published:
            raise ProtocolError("not_found", f"port {published.port} is not published")
        if len(published.connections) >= self.limits.max_connections_per_port:
            raise ProtocolError("unavailable", f"port {published.port} has {len(published.connections)} open "
                                               "connections, the most it may have; try again")
        if self.open_connections >= self.limits.max_connections_per_sandbox:
            raise ProtocolError("unavailable", "the sandbox's ports have as many open connections as they may; "
                                               "try again")
        published.connections.add(connection)
        published.connections_total += 1

    @staticmethod
    def release(published: PublishedPort, connection: Closable) -> None:
        published.connections.discard(connection)

    def close_all(self) -> None:
        """The sandbox is going: cut every connection, unpublish everything."""
        for published in self._ports.values():
            for connection in list(published.connections):
                connection.close_soon()
        self._ports.clear()
