"""The SDKs' published ports (`sandbox.ports`), sync and async, against the real gateway.

The runtime is tests/gateway/test_ports.py's (the real agent as a host process, declaring `ports`),
so the "sandbox's server" is an aiohttp server of this test on the host's loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.client import AsyncSandbox, Sandbox, errors
from gateway.config import Settings
from gateway.web.app import create_app
from tests.client.conftest import KEY, OTHER_KEY
from tests.gateway.test_ports import _Plugin


@pytest.fixture
async def urls(aiohttp_server: Any) -> tuple[str, int]:
    """The gateway's URL, and the port of a server the sandbox's agent can reach."""
    settings = Settings(api_keys={KEY: "tenant", OTHER_KEY: "other"}, reap_interval_s=3600.0,
                        blocked_plugins=("wasm", "microvm", "pod"), default_runtime="local-ports")
    gateway = await aiohttp_server(create_app(settings, plugins=[_Plugin()]))
    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=f"served {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    guest = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{gateway.port}", guest.port


async def test_async_ports(urls: tuple[str, int]) -> None:
    url, port = urls
    async with AsyncSandbox.create(url=url, api_key=KEY, ports=[port]) as sandbox:
        published = await sandbox.ports.publish(port)
        assert published.port == port and published.token
        assert published.url == f"{url}/v1/sandboxes/{sandbox.id}/ports/{port}/"
        assert published.preview_url == f"{published.url}?token={published.token}"
        assert [p.port for p in await sandbox.ports.list()] == [port]
        # The preview URL opens the page in a browser-like session with no API key.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            page = await browser.get(published.preview_url)
            assert page.status == 200 and await page.text() == "served /"
            assert str(page.url) == published.url  # the token left the address bar
        await sandbox.ports.unpublish(port)
        assert await sandbox.ports.list() == []
        with pytest.raises(errors.NotFound):
            await sandbox.ports.unpublish(port)
        with pytest.raises(errors.BadRequest):
            await sandbox.ports.publish(0)


async def test_sync_ports(urls: tuple[str, int]) -> None:
    url, port = urls

    def use() -> None:
        with Sandbox.create(url=url, api_key=KEY) as sandbox:
            published = sandbox.ports.publish(port)
            assert sandbox.ports.list()[0].token == published.token
            sandbox.ports.unpublish(port)
            assert sandbox.ports.list() == []

    await asyncio.to_thread(use)
