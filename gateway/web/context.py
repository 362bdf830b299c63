"""What the web layer's modules share: the application's state keys, authentication, the REST error
form and body parsing. A module of its own so that `app` (which builds the application from the
route modules) and the route modules (rest, ws, ide) import it instead of each other."""

from __future__ import annotations

import hmac
from typing import Any, Protocol

import pluggy
from aiohttp import web

from gateway.config import Settings
from gateway.protocol.client import parse_json
from gateway.sessions.admission import QuotaExceeded
from gateway.sessions.manager import SandboxManager
from guest_agent.wire import ERRORS, ProtocolError

SETTINGS = web.AppKey("settings", Settings)
MANAGER = web.AppKey("manager", SandboxManager)
PLUGINS = web.AppKey("plugins", pluggy.PluginManager)
class Closable(Protocol):
    """A WebSocket session, as the application's shutdown sees it."""

    def request_close(self, code: int, message: str) -> None:
        """Close the session (its handler does the handshake, and cuts a client that never answers)."""


#: The open WebSocket sessions, closed with 1001 at shutdown.
SESSIONS: web.AppKey[set[Closable]] = web.AppKey("sessions", set)


def error_response(error: ProtocolError) -> web.Response:
    """The REST form of a wire error: its HTTP status and `{"error": {...}}`."""
    headers = {}
    if isinstance(error, QuotaExceeded):
        headers["Retry-After"] = str(error.retry_after)
    return web.json_response({"error": error.to_wire()}, status=ERRORS[error.code].http_status, headers=headers)


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
    body = parse_json(await request.read(), "bad_request")
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "the body must be a JSON object")
    return body
