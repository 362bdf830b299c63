"""HTTP/1.1 pieces the gateway's two proxies share (the egress policy proxy, gateway/egress/, and
the published-ports proxy, gateway/ports/): which headers are hop-by-hop, and feeding h11 from a
byte stream."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Any, Protocol

import h11

#: Hop-by-hop headers (RFC 9110 7.6.1), plus the proxies' own: never forwarded.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-connection"})


def named_by_connection(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Headers a Connection header names (lower case): hop-by-hop as well (RFC 9110 7.6.1)."""
    return {token.strip().lower() for name, value in headers if name.lower() == "connection"
            for token in value.split(",") if token.strip()}


class Readable(Protocol):
    def read(self) -> Awaitable[bytes]: ...


async def next_event(stream: Readable, conn: h11.Connection) -> Any:
    """The next h11 event of `conn`, reading from `stream` as it needs (b"": the peer closed).

    Raises:
        h11.RemoteProtocolError: the peer broke HTTP/1.1 (h11's bounds included).
    """
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.read())
