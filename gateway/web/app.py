"""`create_app()`: the aiohttp application, its state and its lifecycle."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import pluggy
from aiohttp import WSCloseCode, web

from gateway.config import Settings
from gateway.plugins import collect_runtimes, get_plugin_manager
from gateway.sessions.manager import QuotaExceeded, SandboxManager
from guest_agent.wire import ERRORS, ProtocolError

log = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
MANAGER = web.AppKey("manager", SandboxManager)
PLUGINS = web.AppKey("plugins", pluggy.PluginManager)
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets", set)


def error_response(error: ProtocolError) -> web.Response:
    """The REST form of a wire error: its HTTP status and `{"error": {...}}`."""
    headers = {}
    if isinstance(error, QuotaExceeded):
        headers["Retry-After"] = str(error.retry_after)
    return web.json_response({"error": error.to_wire()}, status=ERRORS[error.code].http_status, headers=headers)


#: Wire codes for the HTTP errors aiohttp raises itself (no route, wrong method, body too large).
HTTP_ERROR_CODES = {401: "unauthorized", 404: "not_found", 405: "unknown_op", 413: "frame_too_large"}


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error answers `{"error": {...}}`, except a stream already under way: its handler raises
    ConnectionError, which must reach aiohttp so it drops the connection (a broken transfer, never a
    short body followed by nothing)."""
    try:
        return await handler(request)
    except ProtocolError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = {"code": HTTP_ERROR_CODES.get(exc.status, "bad_request"), "message": exc.reason, "retryable": False}
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"error": error}, status=exc.status, headers=allow)
    except ConnectionError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(ProtocolError("internal", "internal error; see the gateway's log"))


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def authenticate(request: web.Request, token: str | None) -> str:
    """The tenant for `token`; constant-time over every configured key, then the auth hook."""
    if not token:
        raise ProtocolError("unauthorized", "send 'Authorization: Bearer <API key>'")
    tenant = None
    for key, key_tenant in request.app[SETTINGS].api_keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = key_tenant
    if tenant is None:
        tenant = request.app[PLUGINS].hook.sandgate_authenticate(token=token)
    if not tenant:
        raise ProtocolError("unauthorized", "unknown API key")
    return str(tenant)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or `bad_request`."""
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise ProtocolError("bad_request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "the body must be a JSON object")
    return body


def create_app(
    settings: Settings | None = None,
    *,
    plugins: Iterable[object] = (),
    pm: pluggy.PluginManager | None = None,
) -> web.Application:
    """The gateway as an aiohttp application.

    Args:
        settings: gateway settings (defaults: loopback, no keys, WASM default runtime).
        plugins: extra plugin objects to register (embedding applications, tests).
        pm: a ready plugin manager, replacing entry-point discovery.
    """
    from gateway.web import ide, rest, ws  # the routes import this module for its keys

    settings = settings or Settings()
    pm = pm or get_plugin_manager(blocked=settings.blocked_plugins, extra_plugins=plugins)
    app = web.Application(middlewares=[errors_middleware], client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[PLUGINS] = pm
    app[SOCKETS] = set()
    registry = collect_runtimes(pm)
    runtimes = {rid: registry.get(rid)(settings.runtimes.get(rid, {})) for rid in registry.ids()}
    app[MANAGER] = SandboxManager(settings, runtimes, pm)
    rest.add_routes(app)
    ws.add_routes(app)
    ide.add_routes(app)  # the browser IDE at / and its static files
    app.cleanup_ctx.append(_manager_lifecycle)
    app.on_shutdown.append(_close_sockets)
    return app


async def _manager_lifecycle(app: web.Application) -> AsyncIterator[None]:
    await app[MANAGER].start()
    yield
    await app[MANAGER].close()


async def _close_sockets(app: web.Application) -> None:
    app[MANAGER].draining = True
    sockets: set[web.WebSocketResponse] = app[SOCKETS]
    for socket in list(sockets):
        with contextlib.suppress(Exception):
            await socket.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")
