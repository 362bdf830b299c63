"""What a connection may hold before it has said anything: bounds applied per TCP connection.

aiohttp reads request heads without a deadline of its own (its keep-alive timer is the only one, and
it is meant for idle connections), and accepts any number of connections from one address. Before a
request has a head, nobody is authenticated, so these bounds live below the application, where
aiohttp makes one protocol object per connection (`web.Server.__call__`):

- a head timeout: a new connection must send a complete request head within `header_timeout_s`,
  or it is closed (a slowloris client trickling header bytes holds nothing past it);
- an idle timeout between requests on a keep-alive connection (aiohttp's `keepalive_timeout`; a
  partial next head counts as idle, so it bounds that head too);
- a per-address bound: an address holding `max_connections_per_address` connections has further
  ones closed at accept, before a byte is read; other addresses are not affected.

`GuardedRunner` is `web.AppRunner` with the guarded server; `serve` runs the gateway with it (what
`sandgate serve` does, in place of `web.run_app`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.config import Settings

log = logging.getLogger(__name__)


class ConnectionGuard:
    """The bounds, and the count of open connections per remote address (sans-I/O)."""

    def __init__(self, *, header_timeout_s: float, max_per_address: int) -> None:
        self.header_timeout_s = header_timeout_s
        #: 0: no bound (a gateway behind a proxy sees every client as the proxy's one address).
        self.max_per_address = max_per_address
        self.open: Counter[str] = Counter()
        #: Connections closed at accept, and for a head not sent in time (for logs and tests).
        self.refused = 0
        self.timed_out = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionGuard:
        return cls(header_timeout_s=settings.http_header_timeout_s,
                   max_per_address=settings.max_connections_per_address)

    def admit(self, address: str) -> bool:
        """Count a new connection from `address`; False (not counted) when it is over the bound."""
        if self.max_per_address and self.open[address] >= self.max_per_address:
            self.refused += 1
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, admitted by the guard and held to its head timeout."""

    __slots__ = ("_address", "_admitted", "_guard", "_head_timer")

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._admitted = False
        self._address: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        # A TCP peer is (host, port, ...); a Unix socket's is not, and is not bounded.
        address = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if address is not None and not self._guard.admit(address):
            log.warning("refused a connection from %s: %d connections open from it", address,
                        self._guard.max_per_address)
            cast(asyncio.Transport, transport).abort()  # connection_lost follows; nothing started for it
            return
        self._admitted = True
        self._address = address
        super().connection_made(transport)
        self._head_timer = asyncio.get_running_loop().call_later(self._guard.header_timeout_s, self._head_deadline)

    def _head_deadline(self) -> None:
        self._head_timer = None
        # aiohttp counts a request once its head is parsed; until then the client is nobody.
        if self._request_count == 0:
            self._guard.timed_out += 1
            log.info("closed a connection from %s: no request head within %g s", self._address,
                     self._guard.header_timeout_s)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if not self._admitted:  # refused at accept: aiohttp never saw it
            return
        self._admitted = False
        if self._address is not None:
            self._guard.release(self._address)
        super().connection_lost(exc)


class GuardedServer(web.Server):
    """`web.Server` making `GuardedRequestHandler`s: the one place the guard enters aiohttp."""

    def __init__(self, guard: ConnectionGuard, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, self.guard, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """`web.AppRunner` serving through `GuardedServer`."""

    def __init__(self, app: web.Application, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the application's startup
        return GuardedServer(self.guard, base.request_handler, request_factory=base.request_factory,
                             **self._kwargs)


def make_runner(app: web.Application, settings: Settings, **kwargs: Any) -> GuardedRunner:
    """The runner for `app` with `settings`' connection bounds (also what tests serve through)."""
    return GuardedRunner(app, ConnectionGuard.from_settings(settings),
                         keepalive_timeout=settings.http_idle_timeout_s, **kwargs)


async def serve(app: web.Application, settings: Settings, ready: Callable[[str], None],
                shutdown_timeout: float = 30.0) -> None:
    """Serve `app` on settings.host:port until SIGINT or SIGTERM, then shut down gracefully
    (sessions closed, every sandbox destroyed), as `web.run_app` would."""
    runner = make_runner(app, settings, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        ready(f"======== Running on {site.name} ========\n(Press CTRL+C to quit)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
