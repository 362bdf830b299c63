"""A real gateway for SDK tests, and a loopback TCP proxy whose connections a test can cut."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import entry_points
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.config import Limits, Settings
from gateway.plugins import ENTRY_POINT_GROUP
from gateway.web.app import create_app

KEY = "sdk-test-key"
OTHER_KEY = "sdk-test-key-other-tenant"


def only(runtime: str) -> tuple[str, ...]:
    """The installed runtime entry points other than `runtime`, to block: their pools would only
    cost time in tests that never use them."""
    return tuple(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name != runtime)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_keys": {KEY: "tenant", OTHER_KEY: "other"},
        "limits": Limits(exec_timeout_s=30.0),
        "reap_interval_s": 3600.0,
        "runtimes": {"wasm": {"pool_size": 1}},
        "blocked_plugins": only("wasm"),
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def gateway_url(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    """The real gateway (WASM runtime) on a loopback port, in this test's event loop."""
    server = await aiohttp_server(create_app(settings()))
    return f"http://127.0.0.1:{server.port}"


class TcpProxy:
    """Forwards loopback TCP connections to `upstream_port`.

    `cut()` aborts every forwarded connection, both ways, the way a network failure does. While
    `hold()` is in force, new connections are accepted but not forwarded until `release()`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.accepted = 0
        self._open = asyncio.Event()
        self._open.set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def cut(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.release()
        self.cut()
        # Aborted transports end every handler (cancelling them would log their CancelledError).
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self._transports.add(writer.transport)
        try:
            await self._open.wait()
            if writer.transport.is_closing():
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._transports.add(up_writer.transport)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._handlers.discard(task)
            writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()


@pytest.fixture
async def proxy(gateway_url: str) -> AsyncIterator[TcpProxy]:
    """A cuttable TCP path to `gateway_url`."""
    port = int(gateway_url.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    await proxy.start()
    yield proxy
    with contextlib.suppress(Exception):
        await proxy.close()
