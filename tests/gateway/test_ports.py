"""Published ports through the real gateway, with the guest agent as a host process.

The runtime here is the example runtime's (the real agent as a host subprocess) declaring `ports`,
so its 127.0.0.1 is this host's and the "guest's servers" are aiohttp servers this test starts:
this file attacks the gateway's own logic (the contract, authentication, what reaches the guest,
flow control, bounds). The same contract against real microVMs and pods: tests/plugins/microvm/
test_ports.py and tests/plugins/pod/test_pod_ports.py.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sandgate_example_runtime import LocalProcessRuntime

from gateway import hookimpl
from gateway.config import Ports, Settings
from gateway.ports import headers as hdr
from gateway.runtime import RuntimeRegistry
from gateway.web.app import create_app

KEY, OTHER_KEY = "key-a", "key-b"
AUTH, OTHER_AUTH = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER_KEY}"}


class PortsRuntime(LocalProcessRuntime):
    """The example runtime, declaring that its guests (host processes) may publish ports."""

    id = "local-ports"
    capabilities = frozenset({"ports"})


class _Plugin:
    @hookimpl
    def sandgate_register_runtimes(self, registry: RuntimeRegistry) -> None:
        registry.add(PortsRuntime)


Gateway = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_gateway(aiohttp_client: Any) -> Gateway:
    async def make(ports: Ports | None = None) -> TestClient[Any, Any]:
        settings = Settings(api_keys={KEY: "tenant-a", OTHER_KEY: "tenant-b"}, reap_interval_s=3600.0,
                            blocked_plugins=("wasm", "microvm", "pod"), default_runtime="local-ports",
                            ports=ports or Ports())
        return await aiohttp_client(create_app(settings, plugins=[_Plugin()]))  # type: ignore[no-any-return]

    return make


@pytest.fixture
async def gateway(make_gateway: Gateway) -> TestClient[Any, Any]:
    return await make_gateway()


class Guest:
    """The "server in the sandbox": records what each request carried."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.closes: list[tuple[int | None, str]] = []
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.closed = asyncio.Event()
        self.app = web.Application(client_max_size=64 << 20)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.path_qs, "headers": dict(request.headers),
                          "cookies": dict(request.cookies), "body": body})
        if request.path == "/ws":
            return await self.websocket(request)
        if request.path == "/redirect":
            raise web.HTTPFound("/login?next=1")
        if request.path == "/huge-header":
            return web.Response(text="x", headers={"X-Big": "y" * (100 << 10)})
        if request.path == "/hold":
            self.holding.set()
            await self.release.wait()
            return web.Response(text="released")
        if request.path == "/stream":
            return await self.stream(request, int(request.query["mib"]))
        if request.path == "/echo":
            return web.Response(body=hashlib.sha256(body).hexdigest().encode() + b" %d" % len(body))
        if request.path == "/app.js":
            return web.Response(text="console.log('asset')", content_type="text/javascript")
        return web.Response(text=f"page {request.path_qs}", headers={"X-Guest": "yes"},
                            content_type="text/html")

    async def stream(self, request: web.Request, mib: int) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = mib << 20
        await response.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        for _ in range(mib * 16):
            await response.write(block)
        return response

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v2",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "close-me":
                    await ws.close(code=4002, message=b"bye from guest")
                    break
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        self.closes.append((ws.close_code, ""))
        self.closed.set()
        return ws


@pytest.fixture
async def guest(aiohttp_server: Any) -> AsyncIterator[tuple[Guest, int]]:
    server_guest = Guest()
    server: TestServer = await aiohttp_server(server_guest.app, host="127.0.0.1")
    yield server_guest, server.port  # type: ignore[misc]
    server_guest.release.set()


async def _sandbox(gateway: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    resp = await gateway.post("/v1/sandboxes", json=body, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def _publish(gateway: TestClient[Any, Any], sid: str, port: int) -> dict[str, Any]:
    resp = await gateway.post(f"/v1/sandboxes/{sid}/ports", json={"port": port}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def test_publish_list_describe_unpublish(gateway: TestClient[Any, Any], guest: tuple[Guest, int]) -> None:
    _, port = guest
    created = await _sandbox(gateway, ports=[port])
    sid = created["id"]
    (at_create,) = created["ports"]
    assert at_create["port"] == port and at_create["url"] == f"/v1/sandboxes/{sid}/ports/{port}/"
    assert len(at_create["token"]) >= 32
    # Publishing again answers the same port and token (200), a new one is 201 with its own token.
    again = await gateway.post(f"/v1/sandboxes/{sid}/ports", json={"port": port}, headers=AUTH)
    assert again.status == 200 and (await again.json())["token"] == at_create["token"]
    other = await _publish(gateway, sid, port + 1 if port < 65535 else port - 1)
    assert other["token"] != at_create["token"]
    listed = await (await gateway.get(f"/v1/sandboxes/{sid}/ports", headers=AUTH)).json()
    assert {p["port"]: p["token"] for p in listed["ports"]} == {port: at_create["token"],
                                                                other["port"]: other["token"]}
    described = await (await gateway.get(f"/v1/sandboxes/{sid}", headers=AUTH)).json()
    assert sorted(p["port"] for p in described["ports"]) == sorted([port, other["port"]])
    assert all("token" not in p for p in described["ports"])
    assert at_create["token"] not in await (await gateway.get("/v1/sandboxes", headers=AUTH)).text()
    # Another tenant sees no sandbox; bad numbers are refused.
    assert (await gateway.get(f"/v1/sandboxes/{sid}/ports", headers=OTHER_AUTH)).status == 404
    assert (await gateway.post(f"/v1/sandboxes/{sid}/ports", json={"port": 8000}, headers=OTHER_AUTH)).status == 404
    for bad in (0, 65536, "http", True, None):
        resp = await gateway.post(f"/v1/sandboxes/{sid}/ports", json={"port": bad}, headers=AUTH)
        assert resp.status == 400, bad
    assert (await gateway.post("/v1/sandboxes", json={"ports": [0]}, headers=AUTH)).status == 400
    # Unpublish: gone from the list; a second unpublish is 404.
    assert (await gateway.delete(f"/v1/sandboxes/{sid}/ports/{other['port']}", headers=AUTH)).status == 204
    assert (await gateway.delete(f"/v1/sandboxes/{sid}/ports/{other['port']}", headers=AUTH)).status == 404
    listed = await (await gateway.get(f"/v1/sandboxes/{sid}/ports", headers=AUTH)).json()
    assert [p["port"] for p in listed["ports"]] == [port]


async def test_ports_per_sandbox_are_bounded(make_gateway: Gateway) -> None:
    gateway = await make_gateway(Ports(max_per_sandbox=2))
    assert (await gateway.post("/v1/sandboxes", json={"ports": [1, 2, 3]}, headers=AUTH)).status == 400
    sid = (await _sandbox(gateway, ports=[1000, 1001]))["id"]
    resp = await gateway.post(f"/v1/sandboxes/{sid}/ports", json={"port": 1002}, headers=AUTH)
    assert resp.status == 429 and (await resp.json())["error"]["code"] == "quota_exceeded"


async def test_http_with_the_key_reaches_the_guest_without_gateway_credentials(
        gateway: TestClient[Any, Any], guest: tuple[Guest, int]) -> None:
    server, port = guest
    sid = (await _sandbox(gateway, ports=[port]))["id"]
    base = f"/v1/sandboxes/{sid}/ports/{port}"
    headers = {**AUTH, "Cookie": f"app=1; {hdr.PORT_COOKIE}=leaked", "X-Forwarded-For": "6.6.6.6",
               "X-Forwarded-Host": "evil.example"}
    resp = await gateway.get(f"{base}/a/b?x=1&token=nope&y=%20", headers=headers)
    assert resp.status == 200, await resp.text()
    assert await resp.text() == "page /a/b?x=1&y=%20" and resp.headers["X-Guest"] == "yes"
    seen = server.seen[-1]["headers"]
    assert "Authorization" not in seen and seen["Host"] == f"localhost:{port}"
    assert seen["X-Forwarded-Prefix"] == base and seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == f"127.0.0.1:{gateway.port}" and "X-Forwarded-For" not in seen
    assert server.seen[-1]["cookies"] == {"app": "1"}
    # Without the trailing slash: sent to the prefix. A guest's redirect stays under the prefix.
    resp = await gateway.get(base, headers=AUTH, allow_redirects=False)
    assert resp.status == 308 and resp.headers["Location"] == base + "/"
    resp = await gateway.get(f"{base}/redirect", headers=AUTH, allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == f"{base}/login?next=1"
    # A request body streams to the guest whole (2 MiB in 64 KiB chunks, each once the guest took the last).
    body = bytes(range(256)) * (8 << 10)
    resp = await gateway.post(f"{base}/echo", data=io.BytesIO(body), headers=AUTH)
    assert await resp.text() == f"{hashlib.sha256(body).hexdigest()} {len(body)}"

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(32):
            yield bytes([i]) * 10_000

    resp = await gateway.put(f"{base}/echo", data=chunked(), headers=AUTH)
    expected = b"".join(bytes([i]) * 10_000 for i in range(32))
    assert await resp.text() == f"{hashlib.sha256(expected).hexdigest()} {len(expected)}"
    # The port's figures count it.
    (listed,) = (await (await gateway.get(f"/v1/sandboxes/{sid}/ports", headers=AUTH)).json())["ports"]
    assert listed["connections_total"] == 4 and listed["bytes_out"] > len(body) + len(expected)


async def test_token_exchange_sets_a_cookie_that_loads_assets(
        gateway: TestClient[Any, Any], guest: tuple[Guest, int]) -> None:
    server, port = guest
    published = (await _sandbox(gateway, ports=[port]))["ports"][0]
    url, token = published["url"], published["token"]
    # A browser (a cookie jar, no API key) opens the preview URL with the token.
    async with aiohttp.ClientSession(base_url=str(gateway.make_url("/")),
                                     cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        first = await browser.get(f"{url}index.html?lang=en&token={token}", allow_redirects=False)
        assert first.status == 303 and first.headers["Location"] == f"{url}index.html?lang=en"
        cookie = first.headers["Set-Cookie"]
        assert f"{hdr.PORT_COOKIE}={token}" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert f"Path={url}" in cookie
        assert not server.seen  # the exchange itself never reaches the guest
        page = await browser.get(first.headers["Location"])
        assert page.status == 200 and await page.text() == "page /index.html?lang=en"
        asset = await browser.get(f"{url}app.js")
        assert asset.status == 200 and await asset.text() == "console.log('asset')"
        # The guest never saw the token, as a parameter or as the cookie.
        for seen in server.seen:
            assert token not in seen["path"] and token not in str(seen["headers"])
        # The cookie is the port's alone: another path of the gateway does not get it.
        other = await browser.get("/v1/sandboxes")
        assert other.status == 401


async def test_refusals(gateway: TestClient[Any, Any], guest: tuple[Guest, int]) -> None:
    server, port = guest
    created = await _sandbox(gateway, ports=[port])
    sid, token = created["id"], created["ports"][0]["token"]
    base = f"/v1/sandboxes/{sid}/ports/{port}/"
    expected = {"code": "unauthorized"}
    for headers, query in (({}, ""), ({}, "?token=wrong"), ({"Cookie": f"{hdr.PORT_COOKIE}=wrong"}, ""),
                           ({"Authorization": "Bearer not-a-key"}, "")):
        resp = await gateway.get(base + query, headers=headers, allow_redirects=False)
        assert resp.status == 401 and (await resp.json())["error"]["code"] == expected["code"], (headers, query)
    # The same answer for a sandbox that does not exist, with a token: nothing is revealed.
    missing = await gateway.get(f"/v1/sandboxes/sb_missing/ports/{port}/?token={token}")
    assert missing.status == 401
    # The token of one port opens no other port; another tenant's key sees no sandbox.
    assert (await gateway.get(f"/v1/sandboxes/{sid}/ports/{port + 1}/?token={token}")).status == 401
    resp = await gateway.get(base, headers=OTHER_AUTH)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    # The key of the tenant on a port that is not published: 404.
    assert (await gateway.get(f"/v1/sandboxes/{sid}/ports/{port + 1}/", headers=AUTH)).status == 404
    assert not server.seen
    # A published port where nothing listens: 503, retryable.
    with_nothing = await _publish(gateway, sid, 1)
    resp = await gateway.get(with_nothing["url"], headers=AUTH)
    assert resp.status == 503 and (await resp.json())["error"]["retryable"] is True
    # A token as a query parameter works for other methods too (no redirect) and never reaches the guest.
    resp = await gateway.post(f"{base}echo?token={token}", data=b"abc")
    assert resp.status == 200 and server.seen[-1]["path"] == "/echo"


async def test_guest_response_heads_are_bounded(make_gateway: Gateway, guest: tuple[Guest, int]) -> None:
    gateway = await make_gateway(Ports(max_header_bytes=16 << 10))
    _, port = guest
    url = (await _sandbox(gateway, ports=[port]))["ports"][0]["url"]
    resp = await gateway.get(f"{url}huge-header", headers=AUTH)
    assert resp.status == 502 and (await resp.json())["error"]["code"] == "guest_protocol"
    assert (await gateway.get(f"{url}fine", headers=AUTH)).status == 200


async def test_connections_per_port_are_bounded(make_gateway: Gateway, guest: tuple[Guest, int]) -> None:
    gateway = await make_gateway(Ports(max_connections_per_port=1, max_connections_per_sandbox=1))
    server, port = guest
    url = (await _sandbox(gateway, ports=[port]))["ports"][0]["url"]
    held = asyncio.create_task(gateway.get(f"{url}hold", headers=AUTH))
    await server.holding.wait()  # the first exchange reached the guest and waits there
    resp = await gateway.get(f"{url}other", headers=AUTH)
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
    server.release.set()
    assert await (await held).text() == "released"
    assert (await gateway.get(f"{url}again", headers=AUTH)).status == 200


async def test_large_response_to_a_slow_reader_holds_bounded_memory(
        gateway: TestClient[Any, Any], guest: tuple[Guest, int]) -> None:
    """64 MiB from the guest to a client that takes 16 KiB at a time: the gateway holds about one
    window of it at a time, and every byte arrives."""
    _, port = guest
    url = (await _sandbox(gateway, ports=[port]))["ports"][0]["url"]
    gc.collect()
    tracemalloc.start()
    try:
        resp = await gateway.get(f"{url}stream?mib=64", headers=AUTH)
        assert resp.status == 200 and resp.content_length == 64 << 20
        block = bytes(range(256)) * 256
        received, digest = 0, hashlib.sha256()
        while chunk := await resp.content.read(16 << 10):
            digest.update(chunk)
            received += len(chunk)
            await asyncio.sleep(0)  # a slow reader: every read is a turn of the loop
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == 64 << 20
    assert digest.hexdigest() == hashlib.sha256(block * 1024).hexdigest()
    # This process holds the gateway, the client and the guest's server: the whole body is 64 MiB.
    assert peak < 16 << 20, f"peak traced memory {peak >> 20} MiB"


async def test_websocket_frames_and_close_codes_both_ways(
        gateway: TestClient[Any, Any], guest: tuple[Guest, int]) -> None:
    server, port = guest
    published = (await _sandbox(gateway, ports=[port]))["ports"][0]
    url, token = published["url"], published["token"]
    # With the tenant's key, offering two subprotocols: the guest picks chat.v2.
    ws = await gateway.ws_connect(f"{url}ws", headers=AUTH, protocols=("chat.v1", "chat.v2"))
    assert ws.protocol == "chat.v2"
    await ws.send_str("hello")
    assert await ws.receive_str() == "echo:hello"
    await ws.send_bytes(b"\x00\x01\x02" * 1000)
    assert await ws.receive_bytes() == (b"\x00\x01\x02" * 1000)[::-1]
    seen = server.seen[-1]["headers"]
    assert "Authorization" not in seen and seen["X-Forwarded-Prefix"] == url.rstrip("/")
    # The client's close code reaches the guest.
    await ws.close(code=4001, message=b"client done")
    await server.closed.wait()
    assert server.closes[-1][0] == 4001
    # With the token as a parameter (a browser's WebSocket cannot send headers): the guest closes
    # with its own code, which reaches the client.
    ws = await gateway.ws_connect(f"{url}ws?token={token}")
    await ws.send_str("close-me")
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4002 and msg.extra == "bye from guest"
    await ws.close()
    # Without credentials: refused before any upgrade.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect(f"{url}ws")
    assert refused.value.status == 401


async def test_cookie_websocket_needs_an_allowed_origin(
        gateway: TestClient[Any, Any], guest: tuple[Guest, int]) -> None:
    _, port = guest
    published = (await _sandbox(gateway, ports=[port]))["ports"][0]
    cookie = {"Cookie": f"{hdr.PORT_COOKIE}={published['token']}"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect(f"{published['url']}ws", headers={**cookie, "Origin": "https://evil.example"})
    assert refused.value.status == 403
    own = f"http://127.0.0.1:{gateway.port}"
    ws = await gateway.ws_connect(f"{published['url']}ws", headers={**cookie, "Origin": own})
    await ws.send_str("ok")
    assert await ws.receive_str() == "echo:ok"
    await ws.close()


async def test_unpublish_stops_tokens_and_cuts_connections(
        gateway: TestClient[Any, Any], guest: tuple[Guest, int]) -> None:
    _, port = guest
    created = await _sandbox(gateway, ports=[port])
    sid, published = created["id"], created["ports"][0]
    url, token = published["url"], published["token"]
    assert (await gateway.get(f"{url}?token={token}", allow_redirects=False)).status == 303
    ws = await gateway.ws_connect(f"{url}ws?token={token}")
    await ws.send_str("before")
    assert await ws.receive_str() == "echo:before"
    assert (await gateway.delete(f"/v1/sandboxes/{sid}/ports/{port}", headers=AUTH)).status == 204
    msg = await ws.receive()
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    assert (await gateway.get(f"{url}?token={token}", allow_redirects=False)).status == 401
    assert (await gateway.get(url, headers={"Cookie": f"{hdr.PORT_COOKIE}={token}"})).status == 401
    assert (await gateway.get(url, headers=AUTH)).status == 404
    # Publishing it again makes a new token; the old one stays dead.
    again = await _publish(gateway, sid, port)
    assert again["token"] != token
    assert (await gateway.get(f"{url}?token={token}", allow_redirects=False)).status == 401


def test_settings_are_checked() -> None:
    from gateway.config import ConfigError

    for bad in ({"window_bytes": 1000}, {"max_per_sandbox": 0},
                {"max_connections_per_port": 10, "max_connections_per_sandbox": 5}):
        with pytest.raises(ConfigError, match=r"\[ports\]"):
            Ports(**bad)  # type: ignore[arg-type]
    assert replace(Ports(), window_bytes=1 << 20).window_bytes == 1 << 20
