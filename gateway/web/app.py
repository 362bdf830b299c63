"""`create_app()`: the aiohttp application, its state and its lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pluggy
from aiohttp import web

from gateway.config import Settings
from gateway.plugins import collect_runtimes, get_plugin_manager
from gateway.protocol.client import CLOSE_GOING_AWAY
from gateway.sessions.manager import SandboxManager
from gateway.web import ide, rest, rest_functions, rest_ports, rest_volumes, ws
from gateway.web.context import MANAGER, PLUGINS, SESSIONS, SETTINGS, Closable, error_response
from guest_agent.wire import ProtocolError

__all__ = ["MANAGER", "PLUGINS", "SESSIONS", "SETTINGS", "create_app"]

log = logging.getLogger(__name__)

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
    settings = settings or Settings()
    pm = pm or get_plugin_manager(blocked=settings.blocked_plugins, extra_plugins=plugins)
    app = web.Application(middlewares=[errors_middleware], client_max_size=1 << 20)
    app[SETTINGS] = settings
    app[PLUGINS] = pm
    app[SESSIONS] = set()
    registry = collect_runtimes(pm)
    runtimes = {rid: registry.get(rid)(settings.runtimes.get(rid, {})) for rid in registry.ids()}
    app[MANAGER] = SandboxManager(settings, runtimes, pm)
    rest.add_routes(app)
    rest_functions.add_routes(app)
    rest_volumes.add_routes(app)
    rest_ports.add_routes(app)
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
    # Each session closes itself (a client that stopped reading is cut after a few seconds, so a
    # stalled client cannot hold the shutdown); aiohttp then waits for the handlers to return.
    sessions: set[Closable] = app[SESSIONS]
    for session in list(sessions):
        session.request_close(CLOSE_GOING_AWAY, "gateway shutting down")
    # Then end what runs: in-flight execs end with `unavailable` (a REST exec answers with what it
    # collected), so no handler waits out an exec's timeout with its guest still running.
    await app[MANAGER].drain()
