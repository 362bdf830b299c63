"""The SDK's volumes, files at create and absolute paths, against a real gateway and WASM sandboxes."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from gateway.client import AsyncClient, AsyncSandbox, Client, Sandbox, errors
from gateway.config import Storage
from gateway.web.app import create_app
from tests.client.conftest import KEY, OTHER_KEY, settings
from tests.serving import serve

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


@pytest.fixture
async def url(aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path) -> str:
    server = await aiohttp_server(create_app(settings(storage=Storage(dir=str(tmp_path / "volumes")))))
    return f"http://127.0.0.1:{server.port}"


async def test_volumes_files_at_create_and_absolute_paths(url: str) -> None:
    async with AsyncClient(url, KEY) as client:
        volume = await client.create_volume("notes", 16)
        assert (volume.name, volume.quota_mb, volume.mounted_by) == ("notes", 16, [])
        assert await client.write_volume_file("notes", "/seed.txt", "seeded") == 6
        with pytest.raises(errors.Exists):
            await client.create_volume("notes")
        async with AsyncSandbox.create(runtime="wasm", url=url, api_key=KEY, volumes={"/notes": {"name": "notes"}},
                                       files={"main.py": "print(open('/notes/seed.txt').read())"}) as sb:
            assert (await sb.exec(code="exec(open('main.py').read())")).stdout == "seeded\n"
            # Absolute and relative paths in every files op.
            await sb.files.write("/work/a.txt", "abs")
            assert await sb.files.read("a.txt") == b"abs"
            await sb.files.write("/notes/out.txt", "to the volume")
            assert await sb.files.read("/notes/out.txt") == b"to the volume"
            assert "out.txt" in [f.name for f in await sb.files.list("/notes")]
            [mount] = (await client.get_volume("notes")).mounted_by
            assert mount == {"sandbox_id": sb.id, "readonly": False}
            with pytest.raises(errors.Busy):
                await client.delete_volume("notes")
        assert await client.read_volume_file("notes", "out.txt") == b"to the volume"
        async with AsyncClient(url, OTHER_KEY) as other:
            assert await other.list_volumes() == []
            with pytest.raises(errors.NotFound):
                await other.read_volume_file("notes", "out.txt")
        await client.delete_volume("notes")
        assert await client.list_volumes() == []


@pytest.fixture
def served_url(tmp_path: Path) -> Iterator[str]:
    """`sandgate serve` as a subprocess: the sync SDK blocks, so the gateway runs elsewhere."""
    env = {**os.environ, "SANDGATE_API_KEYS": f"{KEY}:sync", "SANDGATE_STATE_DIR": str(tmp_path / "state"),
           "SANDGATE_DATA_DIR": str(tmp_path / "data")}
    with serve(env) as served:
        yield f"http://127.0.0.1:{served.port}"
        served.stop()
    assert (tmp_path / "data" / "volumes" / "records").is_dir(), "volumes live under SANDGATE_DATA_DIR"


def test_sync_volumes(served_url: str) -> None:
    url = served_url
    with Client(url, KEY) as client:
        client.create_volume("sync-vol", 16)
        client.write_volume_file("sync-vol", "x.txt", b"x")
        with Sandbox.create(runtime="wasm", url=url, api_key=KEY,
                            volumes={"/data": {"name": "sync-vol", "readonly": True}}) as sb:
            assert sb.files.read("/data/x.txt") == b"x"
        assert [v.name for v in client.list_volumes()] == ["sync-vol"]
        client.delete_volume("sync-vol")
