"""The REST API (a fixed contract: README and docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.protocol.client import describe as describe_client_leg
from gateway.protocol.paths import MAX_NAME, check_path
from gateway.sessions.sandbox import Sandbox
from gateway.web.context import MANAGER, authenticate, bearer_token, json_body
from guest_agent import schema
from guest_agent.wire import CHUNK_SIZE, MAX_WRITE_CHUNK, ProtocolError

routes = web.RouteTableDef()
#: How long a failed upload's cleanup waits for a dying agent to be declared dead (the runtime's
#: reason for the death is asked for with 5 s to answer).
AGENT_DEATH_WAIT_S = 10.0


def tenant_of(request: web.Request) -> str:
    return authenticate(request, bearer_token(request))


async def sandbox_of(request: web.Request) -> Sandbox:
    """The request's `{sandbox_id}`, the caller's own (404 otherwise)."""
    return await request.app[MANAGER].lookup(tenant_of(request), request.match_info["sandbox_id"])


def exec_args(body: dict[str, Any]) -> dict[str, Any]:
    """A REST exec body as exec.start's checked arguments."""
    if isinstance(body.get("stdin"), str):  # JSON has no bytes: REST takes stdin as text
        body = {**body, "stdin": body["stdin"].encode()}
    return schema.parse({**body, "id": 0, "op": "exec.start"}, schema.CLIENT).args


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    status = 503 if manager.draining else 200
    return web.json_response({"status": "draining" if manager.draining else "ok", "version": __version__},
                             status=status)


@routes.get("/v1/protocol")
async def protocol(request: web.Request) -> web.Response:
    """The op schema and the client leg's constants (what gateway/web/js/protocol.js holds), for
    clients that take them from the gateway they talk to. Public, like /healthz: it is the same
    for every gateway of this version."""
    return web.json_response(describe_client_leg())


@routes.get("/v1/runtimes")
async def list_runtimes(request: web.Request) -> web.Response:
    tenant_of(request)
    manager = request.app[MANAGER]
    runtimes = [{"id": r.id, "description": r.description, "capabilities": sorted(r.capabilities),
                 "languages": r.languages(),
                 "unavailable_languages": r.unavailable_languages} for r in manager.runtimes.values()]
    return web.json_response({"runtimes": runtimes, "unavailable": manager.unavailable})


@routes.post("/v1/sandboxes")
async def create_sandbox(request: web.Request) -> web.Response:
    tenant = tenant_of(request)
    sandbox = await request.app[MANAGER].create(tenant, await json_body(request))
    return web.json_response(sandbox.describe(port_tokens=True), status=201)


@routes.get("/v1/sandboxes")
async def list_sandboxes(request: web.Request) -> web.Response:
    tenant = tenant_of(request)
    return web.json_response({"sandboxes": [s.describe() for s in request.app[MANAGER].list_for(tenant)]})


@routes.get("/v1/sandboxes/{sandbox_id}")
async def get_sandbox(request: web.Request) -> web.Response:
    return web.json_response((await sandbox_of(request)).describe())


@routes.patch("/v1/sandboxes/{sandbox_id}")
async def update_sandbox(request: web.Request) -> web.Response:
    """Change a running sandbox (its network policy); answers the sandbox as it is now."""
    sandbox = await sandbox_of(request)
    await request.app[MANAGER].update(sandbox, await json_body(request))
    return web.json_response(sandbox.describe())


@routes.get("/v1/sandboxes/{sandbox_id}/network")
async def sandbox_network(request: web.Request) -> web.Response:
    """The sandbox's policy, its secrets (never their values), its network figures and its recent
    refusals, each with the reason."""
    sandbox = await sandbox_of(request)
    if sandbox.spec.egress is None:
        return web.json_response({"policy": "none", "secrets": [], "metrics": None, "open_connections": 0,
                                  "recent_refusals": []})
    return web.json_response(sandbox.spec.egress.describe())


@routes.delete("/v1/sandboxes/{sandbox_id}")
async def delete_sandbox(request: web.Request) -> web.Response:
    await request.app[MANAGER].destroy(await sandbox_of(request), "api")
    return web.Response(status=204)


@routes.post("/v1/sandboxes/{sandbox_id}/exec")
async def exec_sandbox(request: web.Request) -> web.Response:
    sandbox = await sandbox_of(request)
    args = exec_args(await json_body(request))
    return web.json_response(await request.app[MANAGER].run_collected(sandbox, args))


@routes.get("/v1/sandboxes/{sandbox_id}/changes")
async def sandbox_changes(request: web.Request) -> web.Response:
    """Which files were created, modified, deleted under /work, the mounts and the volumes since
    `since` (a token an earlier answer gave), or since the sandbox was handed out; with a token for now."""
    sandbox = await sandbox_of(request)
    args = {"since": request.query["since"]} if "since" in request.query else {}
    args = schema.parse({**args, "id": 0, "op": "fs.changes"}, schema.CLIENT).args
    answer = await request.app[MANAGER].request(sandbox, "fs.changes", args)
    token = answer.get("token")
    if not isinstance(token, str) or len(token) > schema.MAX_TAG:
        raise ProtocolError("guest_protocol", "fs.changes answered without a token")
    return web.json_response({"token": token, "files": schema.check_files(answer.get("files"))})


@routes.get("/v1/sandboxes/{sandbox_id}/mounts")
async def sandbox_mounts(request: web.Request) -> web.Response:
    """The sandbox's host mounts, each with its pending changes (permitted and denied)."""
    sandbox = await sandbox_of(request)
    return web.json_response({"mounts": await request.app[MANAGER].list_mounts(sandbox)})


@routes.post("/v1/sandboxes/{sandbox_id}/mounts/sync")
async def sync_mounts(request: web.Request) -> web.Response:
    """Apply the chosen pending changes (`{"paths": [...]}`, a folder meaning what lies under it too)."""
    sandbox = await sandbox_of(request)
    body = await json_body(request)
    paths = body.get("paths")
    if not isinstance(paths, list) or not paths or len(paths) > 10_000 or not all(
            isinstance(p, str) and 0 < len(p) <= schema.MAX_PATH and "\0" not in p for p in paths):
        raise ProtocolError("bad_request", "'paths' is a list of 1 to 10000 paths")
    return web.json_response(await request.app[MANAGER].sync_mounts(sandbox, paths))


@routes.get("/v1/sandboxes/{sandbox_id}/metrics")
async def sandbox_metrics(request: web.Request) -> web.Response:
    sandbox = await sandbox_of(request)
    return web.json_response(await request.app[MANAGER].metrics(sandbox))


def file_path(request: web.Request) -> str:
    """The file a files route names: `/files/{path}` is relative to the sandbox's working folder
    (/work); `/files?path=...` takes any path, absolute or relative (E2B's shape)."""
    if "path" in request.match_info:
        return check_path(request.match_info["path"], allow_absolute=False)
    path = request.query.get("path")
    if path is None:
        raise ProtocolError("bad_request", "the query parameter 'path' names the file")
    return check_path(path, allow_absolute=True)


@routes.get("/v1/sandboxes/{sandbox_id}/files/{path:.+}")
@routes.get("/v1/sandboxes/{sandbox_id}/files")
async def download(request: web.Request) -> web.StreamResponse:
    sandbox = await sandbox_of(request)
    path = file_path(request)
    stream = await request.app[MANAGER].read_file(sandbox, path)
    response: web.StreamResponse | None = None
    try:
        async for event in stream:
            if event["ev"] == "start":
                response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                size = event.get("size")
                if isinstance(size, int):
                    response.content_length = size
                await response.prepare(request)
            elif event["ev"] == "data" and response is not None:
                await response.write(event["data"])
            elif event["ev"] == "end":
                if "error" in event:
                    error = ProtocolError.from_wire(event["error"])
                    if response is None:
                        raise error
                    # Headers are out: the honest signal is a broken transfer, never a short file.
                    raise ConnectionResetError(f"download failed: {error.message}")
                break
    finally:
        if not stream.finished:
            stream.discard()
    if response is None:
        raise ProtocolError("guest_protocol", "the agent ended the read without starting it")
    await response.write_eof()
    return response


@routes.delete("/v1/sandboxes/{sandbox_id}/files/{path:.+}")
@routes.delete("/v1/sandboxes/{sandbox_id}/files")
async def delete_file(request: web.Request) -> web.Response:
    """Remove a file, or a directory with everything in it."""
    sandbox = await sandbox_of(request)
    await request.app[MANAGER].request(sandbox, "fs.remove", {"path": file_path(request), "recursive": True})
    return web.Response(status=204)


def _in_work(path: str) -> bool:
    return not path.startswith("/") or path == "/work" or path.startswith("/work/")


@routes.put("/v1/sandboxes/{sandbox_id}/files/{path:.+}")
@routes.put("/v1/sandboxes/{sandbox_id}/files")
async def upload(request: web.Request) -> web.Response:
    """Stream the body into a temporary file next to the target, then move it into place, so a
    failed upload (quota, dropped connection) never leaves a half-written target behind."""
    manager = request.app[MANAGER]
    sandbox = await sandbox_of(request)
    path = file_path(request)
    if path.endswith("/"):
        raise ProtocolError("bad_request", "an upload names a file: the path must not end with '/'")
    quota = 1 << 62  # elsewhere (a volume, /tmp) the file system's own size is the bound (ENOSPC)
    if _in_work(path) and not any(path.startswith(m.path + "/") for m in sandbox.spec.volumes):
        # The host's figure where the runtime has one (the guest's could be forged, and costs a walk).
        usage = sandbox.backend.disk_usage()
        if usage is not None:
            used = usage[0]
        else:
            reported = (await manager.request(sandbox, "metrics", {})).get("disk_bytes")
            used = reported if isinstance(reported, int) and reported > 0 else 0
        quota = (sandbox.spec.disk_mb << 20) - used
        if request.content_length is not None and request.content_length > quota:
            raise ProtocolError("disk_quota", f"{request.content_length} bytes with the {used} bytes already in use "
                                              f"exceed the {sandbox.spec.disk_mb} MB quota")
    head, _, name = path.rpartition("/")
    temp = f"{head}/" if head or path.startswith("/") else ""
    # The name, cut so the temporary name stays within MAX_NAME bytes too (a 255-byte name is legal).
    stem = name.encode()[: MAX_NAME - 32].decode("utf-8", "ignore")
    temp += f".{stem}.upload-{secrets.token_hex(4)}"
    if head:
        await manager.request(sandbox, "fs.mkdir", {"path": head, "parents": True})
    written = 0
    moved = False
    try:
        await manager.request(sandbox, "fs.write", {"path": temp, "data": b"", "truncate": True})
        buffer = bytearray()
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            buffer += chunk
            if len(buffer) >= MAX_WRITE_CHUNK:
                written = await _write(manager, sandbox, temp, buffer[:MAX_WRITE_CHUNK], written, quota)
                del buffer[:MAX_WRITE_CHUNK]
        if buffer:
            written = await _write(manager, sandbox, temp, buffer, written, quota)
        await manager.request(sandbox, "fs.move", {"src": temp, "dst": path})
        moved = True
    finally:
        if not moved:
            await _remove_temporary(manager, sandbox, temp)
    return web.json_response({"path": path, "bytes": written}, status=201)


async def _remove_temporary(manager: Any, sandbox: Sandbox, temp: str) -> None:
    """Best effort: the upload already failed with its own error. When the agent died under the
    upload, the remove can still reach the dying agent (its channel broke, and it is closed only once
    the runtime said why it died); then wait for that, and remove through the restarted agent, so the
    temporary file is not left behind to eat the quota."""
    dying = sandbox.agent
    for _attempt in range(2):
        if sandbox.state != "running":
            return
        try:
            await manager.request(sandbox, "fs.remove", {"path": temp})
            return
        except ProtocolError as exc:
            if exc.code != "guest_died":
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(dying.closed), AGENT_DEATH_WAIT_S)


async def _write(manager: Any, sandbox: Sandbox, path: str, data: bytearray, offset: int, quota: int) -> int:
    if offset + len(data) > quota:
        raise ProtocolError("disk_quota", f"the upload exceeds the sandbox's {sandbox.spec.disk_mb} MB disk quota")
    await manager.request(sandbox, "fs.write", {"path": path, "data": bytes(data), "offset": offset})
    return offset + len(data)


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)
