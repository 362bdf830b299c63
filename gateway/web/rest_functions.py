"""The serverless REST routes (a fixed contract: docs/functions.md): invoke and test in a sandbox,
ephemeral invoke and execute, deployed functions, async executions, and the code cache."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.functions.calls import invoke_in, test_in
from gateway.sessions import executions
from gateway.sessions.admission import CREATE_FIELDS
from gateway.sessions.sandbox import Sandbox
from gateway.web.context import MANAGER, json_body
from gateway.web.rest import exec_args, sandbox_of, tenant_of
from guest_agent import schema
from guest_agent.wire import ProtocolError

routes = web.RouteTableDef()
#: How long a cancel waits for the exec to end before it answers with the state it has.
CANCEL_WAIT_S = 10.0
#: `GET .../executions?wait=true` without a `timeout` waits this long at most.
DEFAULT_WAIT_S = 30.0


def _args(op: str, body: dict[str, Any]) -> dict[str, Any]:
    return schema.parse({**body, "id": 0, "op": op}, schema.CLIENT).args


# -- invoke and test in a sandbox -------------------------------------------------------------


@routes.post("/v1/sandboxes/{sandbox_id}/invoke")
async def invoke(request: web.Request) -> web.Response:
    sandbox = await sandbox_of(request)
    args = _args("invoke", await json_body(request))
    return web.json_response(await invoke_in(request.app[MANAGER], sandbox, args))


@routes.post("/v1/sandboxes/{sandbox_id}/test")
async def run_tests(request: web.Request) -> web.Response:
    sandbox = await sandbox_of(request)
    args = _args("test", await json_body(request))
    return web.json_response(await test_in(request.app[MANAGER], sandbox, args))


# -- ephemeral: a fresh sandbox for one call ---------------------------------------------------


async def _ephemeral(request: web.Request, run: Callable[[Sandbox, dict[str, Any]], Awaitable[dict[str, Any]]],
                     check: Callable[[dict[str, Any]], dict[str, Any]]) -> web.Response:
    """Check the call, take a sandbox (from the warm pool where the runtime has one), run, and
    destroy the sandbox whatever happened. The sandbox is the gateway's: never in the list."""
    manager = request.app[MANAGER]
    tenant = tenant_of(request)
    body = await json_body(request)
    create = {name: body.pop(name) for name in CREATE_FIELDS if name in body}
    args = check(body)  # before the sandbox exists: a bad call costs nothing
    sandbox = await manager.create(tenant, create, owner="ephemeral")
    try:
        return web.json_response(await run(sandbox, args))
    finally:
        await manager.destroy(sandbox, "ephemeral")


@routes.post("/v1/invoke")
async def invoke_ephemeral(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    # The sandbox is destroyed after the call: its report goes with it.
    return await _ephemeral(request, lambda sandbox, args: invoke_in(manager, sandbox, args, remove_report=False),
                            lambda body: _args("invoke", body))


@routes.post("/v1/execute")
async def execute_ephemeral(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    return await _ephemeral(request, lambda sandbox, args: manager.run_collected(sandbox, args), exec_args)


# -- deployed functions -------------------------------------------------------------------------


@routes.put("/v1/functions/{name}")
async def deploy(request: web.Request) -> web.Response:
    deployment, created = request.app[MANAGER].functions.deploy(
        tenant_of(request), request.match_info["name"], await json_body(request))
    return web.json_response(deployment.describe(), status=201 if created else 200)


@routes.get("/v1/functions")
async def list_functions(request: web.Request) -> web.Response:
    registry = request.app[MANAGER].functions
    return web.json_response({"functions": [d.describe() for d in registry.list_for(tenant_of(request))]})


@routes.get("/v1/functions/{name}")
async def get_function(request: web.Request) -> web.Response:
    registry = request.app[MANAGER].functions
    return web.json_response(registry.get(tenant_of(request), request.match_info["name"]).describe())


@routes.delete("/v1/functions/{name}")
async def delete_function(request: web.Request) -> web.Response:
    await request.app[MANAGER].functions.delete(tenant_of(request), request.match_info["name"])
    return web.Response(status=204)


@routes.post("/v1/functions/{name}/invoke")
async def invoke_function(request: web.Request) -> web.Response:
    registry = request.app[MANAGER].functions
    result = await registry.invoke(tenant_of(request), request.match_info["name"], await json_body(request))
    return web.json_response(result)


# -- async executions -----------------------------------------------------------------------------


@routes.post("/v1/sandboxes/{sandbox_id}/executions")
async def start_execution(request: web.Request) -> web.Response:
    sandbox = await sandbox_of(request)
    args = exec_args(await json_body(request))
    record = await request.app[MANAGER].start_exec(sandbox, args)
    return web.json_response({"id": record.exec_id, "state": executions.state_of(record)}, status=202)


def _query_number(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ProtocolError("bad_request", f"{name} must be a number") from None
    if not low <= value <= high:
        raise ProtocolError("bad_request", f"{name} must be in {low:g}..{high:g}")
    return value


@routes.get("/v1/sandboxes/{sandbox_id}/executions/{exec_id}")
async def get_execution(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    sandbox = await sandbox_of(request)
    manager.forget_finished(sandbox)
    record = manager.find_exec(sandbox, {"exec_id": request.match_info["exec_id"]})
    offset = int(_query_number(request, "output_offset", 0, 0, 2**53))
    if request.query.get("wait", "false").lower() in ("true", "1", "yes"):
        wait = _query_number(request, "timeout", DEFAULT_WAIT_S, 0, manager.settings.functions.max_wait_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(record.done.wait(), wait)
    return web.json_response(executions.describe(record, offset))


@routes.delete("/v1/sandboxes/{sandbox_id}/executions/{exec_id}")
async def cancel_execution(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    sandbox = await sandbox_of(request)
    record = manager.find_exec(sandbox, {"exec_id": request.match_info["exec_id"]})
    if record.running:
        record.cancelled = True
        await manager.signal(sandbox, {"exec_id": record.exec_id, "signal": "SIGKILL"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(record.done.wait(), CANCEL_WAIT_S)
    return web.json_response(executions.describe(record, with_output=False))


@routes.get("/v1/sandboxes/{sandbox_id}/executions")
async def list_executions(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    sandbox = await sandbox_of(request)
    manager.forget_finished(sandbox)
    state = request.query.get("state")
    if state is not None and state not in executions.STATES:
        raise ProtocolError("bad_request", f"state must be one of {', '.join(executions.STATES)}")
    limit = int(_query_number(request, "limit", 100, 1, 1000))
    records = [r for r in reversed(sandbox.execs.values())
               if r.kind == "exec" and (state is None or executions.state_of(r) == state)]
    return web.json_response({"executions": [executions.describe(r, with_output=False) for r in records[:limit]]})


# -- the code cache ---------------------------------------------------------------------------------


@routes.get("/v1/cache")
async def list_cache(request: web.Request) -> web.Response:
    return web.json_response({"entries": request.app[MANAGER].code_cache.entries(tenant_of(request))})


@routes.delete("/v1/cache")
async def clear_cache(request: web.Request) -> web.Response:
    request.app[MANAGER].code_cache.forget(tenant_of(request))
    return web.Response(status=204)


@routes.delete("/v1/cache/{digest}")
async def delete_cache_entry(request: web.Request) -> web.Response:
    if not request.app[MANAGER].code_cache.forget(tenant_of(request), request.match_info["digest"]):
        raise ProtocolError("not_found", "no such cached code")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)
