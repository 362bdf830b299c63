"""Published ports (a fixed contract): publish, list and unpublish a sandbox's ports, and the proxy
that serves each port's URL, `/v1/sandboxes/{id}/ports/{port}/...`, with HTTP and WebSockets.

Who may use a port's URL: the sandbox's tenant with its API key (as on every REST route), or
anyone with the port's token, given as `?token=` on any URL under the prefix or as the cookie a
`?token=` exchange sets (HttpOnly, SameSite=Lax, Path = the prefix; a GET or HEAD with `?token=` is
answered with a redirect to the same URL without it, so a browser's preview page loads its assets
and never shows the token in its address bar). Refusals reveal nothing: another tenant's key gets
404 as for a missing sandbox, and a wrong, stale or missing token 401 whether or not the sandbox
or the port exists. A WebSocket authenticated only by the cookie must come from an allowed Origin
(the gateway's own, or `allowed_origins`): a cookie is sent by the browser whoever opens the socket.

The connection to the guest goes through its agent (gateway/ports/tunnel.py), never through the
sandbox's network, and the guest never sees the gateway's credentials (gateway/ports/headers.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web

from gateway.ports import headers as hdr
from gateway.ports.http_proxy import proxy_http
from gateway.ports.registry import PublishedPort, check_port, url_of
from gateway.ports.tunnel import open_connection
from gateway.ports.ws_proxy import is_upgrade, proxy_websocket
from gateway.sessions.manager import SandboxManager
from gateway.sessions.sandbox import Sandbox
from gateway.web.context import MANAGER, SETTINGS, authenticate, bearer_token, json_body
from gateway.web.rest import sandbox_of
from gateway.web.ws import origin_allowed
from guest_agent.wire import ProtocolError

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

PORT_PATH = "/v1/sandboxes/{sandbox_id}/ports/{port:[0-9]{1,5}}"
#: The one answer to a request without a valid credential (whether the sandbox exists or not).
_UNAUTHORIZED = "send the sandbox's tenant's API key (Authorization: Bearer) or the port's token (?token=...)"


def _offers_ports(sandbox: Sandbox) -> None:
    if "ports" not in sandbox.runtime.capabilities:
        raise ProtocolError("unsupported", f"runtime {sandbox.runtime.id!r} cannot publish ports (its guests have no "
                                           "sockets to serve them)")


@routes.post("/v1/sandboxes/{sandbox_id}/ports")
async def publish(request: web.Request) -> web.Response:
    """Publish `{"port": N}`: `{port, url, token, ...}` (201; 200 with the same token when the
    port was published already)."""
    sandbox = await sandbox_of(request)
    port = check_port((await json_body(request)).get("port"))
    _offers_ports(sandbox)
    published, new = sandbox.ports.publish(port)
    sandbox.touch()
    return web.json_response(published.describe(sandbox.id, with_token=True), status=201 if new else 200)


@routes.get("/v1/sandboxes/{sandbox_id}/ports")
async def list_ports(request: web.Request) -> web.Response:
    """The published ports, with their tokens (the tenant could publish them again to get them)."""
    sandbox = await sandbox_of(request)
    return web.json_response({"ports": [p.describe(sandbox.id, with_token=True) for p in sandbox.ports.list()]})


@routes.delete(PORT_PATH)
async def unpublish(request: web.Request) -> web.Response:
    """Unpublish: its token stops working and its open connections are cut."""
    sandbox = await sandbox_of(request)
    published = sandbox.ports.unpublish(check_port(request.match_info["port"]))
    for connection in list(published.connections):
        connection.close_soon()
    return web.Response(status=204)


@routes.get(PORT_PATH)  # (and HEAD)
async def to_prefix(request: web.Request) -> web.StreamResponse:
    """The port's URL without its trailing slash: relative links of a page there would miss the
    prefix, so the browser is sent to the prefix (nothing is revealed: no lookup happens)."""
    path, _, query = request.raw_path.partition("?")
    return web.Response(status=308, headers={"Location": path + "/" + (f"?{query}" if query else "")})


@dataclass(frozen=True)
class _Access:
    sandbox: Sandbox
    published: PublishedPort
    #: How the request authenticated: "key", "query" (a `?token=`) or "cookie".
    via: str
    #: The Authorization header carried a gateway API key (it must not reach the guest).
    drop_authorization: bool
    token: str = ""


async def _authorize(request: web.Request, manager: SandboxManager, sandbox_id: str, port: int) -> _Access:
    bearer = bearer_token(request)
    key_tenant: str | None = None
    if bearer is not None:
        try:
            key_tenant = authenticate(request, bearer)
        except ProtocolError:
            key_tenant = None  # not a gateway key: perhaps the guest app's own bearer token
    for via, token in (("query", request.query.get(hdr.TOKEN_PARAM)), ("cookie", request.cookies.get(hdr.PORT_COOKIE))):
        if not token:
            continue
        sandbox = manager.find(sandbox_id)
        published = sandbox.ports.by_token(port, token) if sandbox is not None else None
        if sandbox is not None and published is not None:
            return _Access(sandbox, published, via, key_tenant is not None, token)
    if key_tenant is None:
        raise ProtocolError("unauthorized", _UNAUTHORIZED)
    sandbox = await manager.lookup(key_tenant, sandbox_id)  # another tenant's: 404, as a missing one
    published = sandbox.ports.get(port)
    if published is None:
        raise ProtocolError("not_found", f"port {port} is not published")
    return _Access(sandbox, published, "key", True)


class _Exchange:
    """One proxied connection as its port's registry counts it; unpublishing cancels its task."""

    def __init__(self) -> None:
        self.task = asyncio.current_task()

    def close_soon(self) -> None:
        if self.task is not None:
            self.task.cancel()


@routes.route("*", PORT_PATH + "/{tail:.*}")
async def proxy(request: web.Request) -> web.StreamResponse:
    """Everything under a port's prefix: HTTP and WebSocket traffic to the guest's port."""
    manager = request.app[MANAGER]
    limits = request.app[SETTINGS].ports
    sandbox_id = request.match_info["sandbox_id"]
    port = check_port(request.match_info["port"])
    access = await _authorize(request, manager, sandbox_id, port)
    prefix = url_of(sandbox_id, port)
    path, _, query = request.raw_path.partition("?")
    query = hdr.without_token(query)
    websocket = is_upgrade(request)
    if access.via == "query" and request.method in ("GET", "HEAD") and not websocket:
        # The token becomes a cookie for the prefix, and leaves the address bar.
        reply = web.Response(status=303, headers={"Location": path + (f"?{query}" if query else ""),
                                                  "Cache-Control": "no-store"})
        reply.set_cookie(hdr.PORT_COOKIE, access.token, path=prefix, httponly=True, samesite="Lax",
                         secure=request.secure)
        return reply
    if websocket and access.via == "cookie" and not origin_allowed(request, request.app[SETTINGS].allowed_origins):
        raise ProtocolError("forbidden_origin", "a WebSocket to a port authenticated by its cookie must come from the "
                                                "gateway's own origin or an allowed one; or give ?token=")
    sandbox, published = access.sandbox, access.published
    if sandbox.state != "running":
        raise ProtocolError("guest_died", f"the sandbox is {sandbox.state}")
    tail = path[len(prefix):] if path.startswith(prefix) else quote(request.match_info["tail"])
    target = "/" + tail + (f"?{query}" if query else "")
    exchange = _Exchange()
    sandbox.ports.admit(published, exchange)
    sandbox.touch()
    try:
        conn = await open_connection(sandbox.agent, port, window=limits.window_bytes,
                                     connect_timeout=limits.connect_timeout_s, idle_timeout=limits.idle_timeout_s)
        try:
            raw = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers]
            headers = hdr.to_guest(raw, port=port, prefix=prefix, forwarded_host=request.host,
                                   forwarded_proto=request.scheme, drop_authorization=access.drop_authorization,
                                   websocket=websocket)
            if websocket:
                return await proxy_websocket(request, conn, target=target, headers=headers, port=port, limits=limits)
            return await proxy_http(request, conn, target=target, headers=headers, port=port, prefix=prefix,
                                    limits=limits)
        finally:
            published.bytes_in += conn.bytes_in
            published.bytes_out += conn.bytes_out
            await conn.close()
    finally:
        sandbox.ports.release(published, exchange)
        sandbox.touch()


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)
