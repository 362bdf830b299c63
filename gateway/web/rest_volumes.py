"""The volume REST routes (a fixed contract: docs/storage.md): create, list, delete a tenant's named
volumes, and read or write their files while no sandbox mounts them read-write."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway.protocol.paths import check_path
from gateway.web.context import MANAGER, json_body
from gateway.web.rest import tenant_of
from guest_agent.wire import CHUNK_SIZE, ProtocolError

routes = web.RouteTableDef()


@routes.post("/v1/volumes")
async def create_volume(request: web.Request) -> web.Response:
    tenant = tenant_of(request)
    manager = request.app[MANAGER]
    body = await json_body(request)
    runtime_id = body.get("runtime", manager.settings.default_runtime)
    runtime = manager.runtimes.get(runtime_id) if isinstance(runtime_id, str) else None
    if runtime is None:
        raise ProtocolError("bad_request", f"unknown runtime {runtime_id!r:.60}; have {sorted(manager.runtimes)}")
    store = runtime.volume_store
    if store is None:
        raise ProtocolError("unsupported", f"runtime {runtime.id!r} does not mount volumes")
    if store not in manager.volumes.backends:
        why = manager.volume_stores_unavailable.get(store, "it does not run here")
        raise ProtocolError("unavailable", f"the {store!r} volume store is unavailable: {why}")
    volume = await manager.volumes.create(tenant, body, store)
    return web.json_response(await manager.volumes.describe(volume), status=201)


@routes.get("/v1/volumes")
async def list_volumes(request: web.Request) -> web.Response:
    volumes = request.app[MANAGER].volumes
    return web.json_response({"volumes": [await volumes.describe(v) for v in volumes.list_for(tenant_of(request))]})


@routes.get("/v1/volumes/{name}")
async def get_volume(request: web.Request) -> web.Response:
    volumes = request.app[MANAGER].volumes
    return web.json_response(await volumes.describe(volumes.get(tenant_of(request), request.match_info["name"])))


@routes.delete("/v1/volumes/{name}")
async def delete_volume(request: web.Request) -> web.Response:
    await request.app[MANAGER].volumes.delete(tenant_of(request), request.match_info["name"])
    return web.Response(status=204)


@routes.get("/v1/volumes/{name}/files/{path:.+}")
async def download(request: web.Request) -> web.StreamResponse:
    volumes = request.app[MANAGER].volumes
    volume = volumes.for_download(tenant_of(request), request.match_info["name"])
    path = check_path(request.match_info["path"], allow_absolute=False)
    chunks = volumes.backend(volume).read_file(volume, path)
    response: web.StreamResponse | None = None
    try:
        async for chunk in chunks:  # the first chunk, or the error, before any header is out
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                await response.prepare(request)
            await response.write(chunk)
    finally:
        await chunks.aclose()
    if response is None:  # an empty file
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 0
        await response.prepare(request)
    await response.write_eof()
    return response


@routes.put("/v1/volumes/{name}/files/{path:.+}")
async def upload(request: web.Request) -> web.Response:
    volumes = request.app[MANAGER].volumes
    tenant = tenant_of(request)
    path = check_path(request.match_info["path"], allow_absolute=False)
    if path.endswith("/"):
        raise ProtocolError("bad_request", "an upload names a file: the path must not end with '/'")
    volume = volumes.get(tenant, request.match_info["name"])
    limit = volume.quota_mb << 20
    if request.content_length is not None and request.content_length > limit:
        raise ProtocolError("disk_quota", f"{request.content_length} bytes exceed volume {volume.name!r}'s "
                                          f"{volume.quota_mb} MB")
    volume = volumes.for_upload(tenant, volume.name)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            yield chunk

    try:
        written = await volumes.backend(volume).write_file(volume, path, body())
    finally:
        await volumes.release(f"api:{volume.id}")
    return web.json_response({"path": path, "bytes": written}, status=201)


def add_routes(app: web.Application) -> None:
    app.add_routes(routes)
