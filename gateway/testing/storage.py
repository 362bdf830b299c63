"""The storage conformance suite (issue 17, docs/storage.md): named volumes, patches and files at
create, and absolute paths in every files op, through the real gateway.

A runtime that mounts volumes proves it by subclassing `StorageConformance`:

    class TestMyRuntimeStorage(StorageConformance):
        runtime = "my-runtime"
        whole_file_system = True   # its files API reaches / (microVM, pod), not only its preopens

Every test makes its own volumes in a private storage folder, real sandboxes that mount them, and
checks through REST what a client sees; a gateway restart is a second gateway on the same folder.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Limits, Settings, Storage
from gateway.testing.conformance import AUTH, KEY, OTHER_AUTH, OTHER_KEY, Gateway, GatewayFixtures
from gateway.web.app import create_app


def _python(code: str) -> dict[str, Any]:
    return {"language": "python", "code": code}


class StorageConformance(GatewayFixtures):
    """Subclass with `runtime = "<id>"` (a runtime whose `volume_store` runs here)."""

    #: A volume's size in these tests: small, so the quota test fills it fast.
    quota_mb: ClassVar[int] = 16
    #: Whether the guest's file system has symbolic links (WASM's sandbox refuses to make them).
    symlinks: ClassVar[bool] = True
    #: A file of the image's own, outside /work, that the files API must read on a whole-file-system
    #: runtime (an initramfs without /etc/os-release names another), and bytes it holds.
    system_file: ClassVar[str] = "/etc/os-release"
    system_file_holds: ClassVar[bytes] = b"ID="

    def _settings(self, folder: Path) -> Settings:
        return Settings(api_keys={KEY: "tenant-a", OTHER_KEY: "tenant-b"}, limits=Limits(exec_timeout_s=60.0),
                        reap_interval_s=3600.0, blocked_plugins=self._blocked(),
                        runtimes={self.runtime: self.runtime_config}, storage=Storage(dir=str(folder)))

    @pytest.fixture
    def storage_dir(self, tmp_path: Path) -> Path:
        return tmp_path / "volumes"

    @pytest.fixture
    async def gateway(self, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
                      storage_dir: Path) -> Gateway:
        client = await aiohttp_client(create_app(self._settings(storage_dir), plugins=self.plugins))
        gateway = Gateway(client, self.runtime, dict(self.create_options))
        runtimes = await (await client.get("/v1/runtimes", headers=AUTH)).json()
        if self.runtime not in [r["id"] for r in runtimes["runtimes"]]:
            pytest.skip(f"runtime {self.runtime} is unavailable here: {runtimes['unavailable'].get(self.runtime)}")
        return gateway

    async def _volume(self, gateway: Gateway, name: str, **body: Any) -> dict[str, Any]:
        resp = await gateway.client.post("/v1/volumes", json={"name": name, "quota_mb": self.quota_mb,
                                                              "runtime": self.runtime, **body}, headers=AUTH)
        if resp.status == 503:
            pytest.skip(f"volumes are unavailable here: {(await resp.json())['error']['message']}")
        assert resp.status == 201, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]

    async def _destroy(self, gateway: Gateway, sandbox_id: str) -> None:
        resp = await gateway.client.delete(f"/v1/sandboxes/{sandbox_id}", headers=AUTH)
        assert resp.status == 204

    async def _run(self, gateway: Gateway, sandbox_id: str, code: str) -> dict[str, Any]:
        return await gateway.exec(sandbox_id, **_python(code))

    # -- volumes -----------------------------------------------------------------------------

    async def test_volume_api_and_tenants(self, gateway: Gateway) -> None:
        created = await self._volume(gateway, "v1")
        assert created["name"] == "v1" and created["quota_mb"] == self.quota_mb and created["mounted_by"] == []
        resp = await gateway.client.post("/v1/volumes", json={"name": "v1", "runtime": self.runtime}, headers=AUTH)
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "exists"
        for bad in ({"name": "Bad Name"}, {"name": "ok", "quota_mb": 0}, {"name": "ok", "size": 1}):
            resp = await gateway.client.post("/v1/volumes", json={**bad, "runtime": self.runtime}, headers=AUTH)
            assert resp.status == 400, bad
        listed = await (await gateway.client.get("/v1/volumes", headers=AUTH)).json()
        assert [v["name"] for v in listed["volumes"]] == ["v1"]
        assert isinstance(listed["volumes"][0]["used_bytes"], int | None)
        # Another tenant: the volume does not exist for it, in any route.
        assert (await (await gateway.client.get("/v1/volumes", headers=OTHER_AUTH)).json())["volumes"] == []
        for method, path in (("GET", "/v1/volumes/v1"), ("DELETE", "/v1/volumes/v1"),
                             ("GET", "/v1/volumes/v1/files/a"), ("PUT", "/v1/volumes/v1/files/a")):
            resp = await gateway.client.request(method, path, headers=OTHER_AUTH, data=b"x")
            assert resp.status == 404, (method, path)
        resp = await gateway.client.post("/v1/sandboxes", headers=OTHER_AUTH,
                                         json={"runtime": self.runtime, **self.create_options,
                                               "volumes": {"/data": {"name": "v1"}}})
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
        resp = await gateway.client.delete("/v1/volumes/v1", headers=AUTH)
        assert resp.status == 204
        assert (await (await gateway.client.get("/v1/volumes", headers=AUTH)).json())["volumes"] == []

    async def test_written_in_one_sandbox_read_only_in_two(self, gateway: Gateway) -> None:
        await self._volume(gateway, "shared")
        writer = await gateway.create(volumes={"/data": {"name": "shared", "readonly": False}})
        assert writer["volumes"] == {"/data": {"name": "shared", "readonly": False}}
        done = await self._run(gateway, writer["id"], "import os\nos.makedirs('/data/d', exist_ok=True)\n"
                                                      "open('/data/d/note.txt', 'w').write('from the writer')\n"
                                                      "print(sorted(os.listdir('/data/d')))")
        assert done["exit_code"] == 0 and done["stdout"] == "['note.txt']\n", done
        # The files API reaches the volume by its absolute path.
        resp = await gateway.client.put(f"/v1/sandboxes/{writer['id']}/files?path=/data/api.txt", data=b"by api",
                                        headers=AUTH)
        assert resp.status == 201, await resp.text()
        # While one sandbox writes, nobody else mounts it, and it cannot be deleted.
        for readonly in (False, True):
            resp = await gateway.client.post("/v1/sandboxes", headers=AUTH,
                                             json={"runtime": self.runtime, **self.create_options,
                                                   "volumes": {"/data": {"name": "shared", "readonly": readonly}}})
            assert resp.status == 409 and (await resp.json())["error"]["code"] == "busy"
        resp = await gateway.client.delete("/v1/volumes/shared", headers=AUTH)
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "busy"
        described = await (await gateway.client.get("/v1/volumes/shared", headers=AUTH)).json()
        assert described["mounted_by"] == [{"sandbox_id": writer["id"], "readonly": False}]
        await self._destroy(gateway, writer["id"])

        readers = [await gateway.create(volumes={"/mnt/shared": {"name": "shared", "readonly": True}})
                   for _ in range(2)]
        for reader in readers:
            done = await self._run(gateway, reader["id"], "print(open('/mnt/shared/d/note.txt').read())\n"
                                                          "print(open('/mnt/shared/api.txt').read())\n"
                                                          "try:\n    open('/mnt/shared/x', 'w')\n"
                                                          "except OSError as e:\n    print('refused')")
            assert done["stdout"] == "from the writer\nby api\nrefused\n", done
            resp = await gateway.client.get(f"/v1/sandboxes/{reader['id']}/files?path=/mnt/shared/d/note.txt",
                                            headers=AUTH)
            assert resp.status == 200 and await resp.read() == b"from the writer"
        # Read-only mounts share; a writer still cannot join, nor can the API write.
        resp = await gateway.client.put("/v1/volumes/shared/files/x", data=b"x", headers=AUTH)
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "busy"
        resp = await gateway.client.delete("/v1/volumes/shared", headers=AUTH)
        assert resp.status == 409
        described = await (await gateway.client.get("/v1/volumes/shared", headers=AUTH)).json()
        assert sorted(m["sandbox_id"] for m in described["mounted_by"]) == sorted(r["id"] for r in readers)
        for reader in readers:
            await self._destroy(gateway, reader["id"])
        resp = await gateway.client.delete("/v1/volumes/shared", headers=AUTH)
        assert resp.status == 204

    async def test_quota_is_refused_inside_and_through_the_api(self, gateway: Gateway) -> None:
        await self._volume(gateway, "small")
        too_much = (self.quota_mb + 4) << 20
        resp = await gateway.client.put("/v1/volumes/small/files/big", data=io.BytesIO(b"x" * too_much),
                                        headers=AUTH)
        assert resp.status == 507 and (await resp.json())["error"]["code"] == "disk_quota"
        sandbox = await gateway.create(volumes={"/data": {"name": "small"}})
        done = await self._run(gateway, sandbox["id"], f"""
import errno
try:
    with open('/data/fill', 'wb') as f:
        for _ in range({too_much >> 20}):
            f.write(b'x' * (1 << 20))
except OSError as e:
    print('ENOSPC' if e.errno == errno.ENOSPC else e)
""")
        assert done["stdout"] == "ENOSPC\n", done
        await self._run(gateway, sandbox["id"], "import os\nos.remove('/data/fill')")
        resp = await gateway.client.put(f"/v1/sandboxes/{sandbox['id']}/files?path=/data/big",
                                        data=io.BytesIO(b"x" * too_much), headers=AUTH)
        assert resp.status == 507 and (await resp.json())["error"]["code"] == "disk_quota"
        await self._destroy(gateway, sandbox["id"])

    async def test_volume_outlives_its_sandboxes_and_the_gateway(
            self, gateway: Gateway, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
            storage_dir: Path) -> None:
        await self._volume(gateway, "keep")
        resp = await gateway.client.put("/v1/volumes/keep/files/seed/a.txt", data=b"seeded", headers=AUTH)
        assert resp.status == 201, await resp.text()
        sandbox = await gateway.create(volumes={"/data": {"name": "keep"}})
        done = await self._run(gateway, sandbox["id"], "print(open('/data/seed/a.txt').read())\n"
                                                       "_ = open('/data/seed/a.txt', 'a').write(' and changed')")
        assert done["stdout"] == "seeded\n", done
        await self._destroy(gateway, sandbox["id"])
        resp = await gateway.client.get("/v1/volumes/keep/files/seed/a.txt", headers=AUTH)
        assert resp.status == 200 and await resp.read() == b"seeded and changed"
        resp = await gateway.client.get("/v1/volumes/keep/files/missing", headers=AUTH)
        assert resp.status == 404
        await gateway.client.close()  # the gateway stops; its volumes stay

        again = await aiohttp_client(create_app(self._settings(storage_dir), plugins=self.plugins))
        listed = await (await again.get("/v1/volumes", headers=AUTH)).json()
        assert [v["name"] for v in listed["volumes"]] == ["keep"]
        resp = await again.get("/v1/volumes/keep/files/seed/a.txt", headers=AUTH)
        assert resp.status == 200 and await resp.read() == b"seeded and changed"
        restarted = Gateway(again, self.runtime, dict(self.create_options))
        sandbox = await restarted.create(volumes={"/data": {"name": "keep", "readonly": True}})
        done = await restarted.exec(sandbox["id"], **_python("print(open('/data/seed/a.txt').read())"))
        assert done["stdout"] == "seeded and changed\n", done

    # -- patches and files at create ---------------------------------------------------------

    def _patch_dir(self) -> str:
        """Where patches go: the root file system where the runtime has one, else /work."""
        return "/etc/sandgate-patched" if self.whole_file_system else "/work/patched"

    async def test_patches_and_files_are_there_at_the_first_exec(self, gateway: Gateway) -> None:
        base = self._patch_dir()
        patches = [
            {"op": "mkdir", "path": f"{base}/conf.d"},
            {"op": "text", "path": f"{base}/conf.d/app.ini", "text": "[app]\n"},
            {"op": "append", "path": f"{base}/conf.d/app.ini", "text": "debug = true\n"},
            {"op": "text", "path": f"{base}/blob", "base64": base64.b64encode(b"\x00\xffbin").decode()},
            {"op": "copy", "src": f"{base}/conf.d", "path": f"{base}/copy.d"},
            {"op": "text", "path": f"{base}/gone", "text": "x"},
            {"op": "remove", "path": f"{base}/gone"},
        ]
        link = {"op": "symlink", "path": f"{base}/link", "target": "conf.d/app.ini"}
        if self.symlinks:
            patches.insert(5, link)
        else:
            resp = await gateway.client.post("/v1/sandboxes", headers=AUTH,
                                             json={"runtime": self.runtime, **self.create_options,
                                                   "patches": [*patches, link]})
            assert resp.status == 500 and "patches[7] (symlink" in (await resp.json())["error"]["message"]
        files = {"main.py": "print('hello')\n",
                 "/work/data/raw.bin": {"base64": base64.b64encode(b"\x01\x02").decode()}}
        sandbox = await gateway.create(patches=patches, files=files)
        done = await self._run(gateway, sandbox["id"], f"""
import json, os
base = {base!r}
print(json.dumps({{
    "ini": open(base + '/conf.d/app.ini').read(),
    "copy": open(base + '/copy.d/app.ini').read(),
    "link": [os.readlink(base + '/link'), open(base + '/link').read()] if os.path.lexists(base + '/link') else None,
    "blob": list(open(base + '/blob', 'rb').read()),
    "gone": os.path.exists(base + '/gone'),
    "main": open('main.py').read(),
    "raw": list(open('/work/data/raw.bin', 'rb').read()),
}}))
""")
        assert done["exit_code"] == 0, done
        assert json.loads(done["stdout"]) == {
            "ini": "[app]\ndebug = true\n", "copy": "[app]\ndebug = true\n",
            "link": ["conf.d/app.ini", "[app]\ndebug = true\n"] if self.symlinks else None,
            "blob": [0, 255, 98, 105, 110],
            "gone": False, "main": "print('hello')\n", "raw": [1, 2]}

    async def test_a_failing_patch_fails_the_create_and_leaves_nothing(self, gateway: Gateway) -> None:
        await self._volume(gateway, "held")
        for body, code in (
                ({"patches": [{"op": "copy", "src": "/work/missing", "path": "/work/x"}]}, "not_found"),
                ({"patches": [{"op": "chmod", "path": "/work/x"}]}, "bad_request"),
                ({"patches": [{"op": "text", "path": "/work/x"}]}, "bad_request"),
                ({"patches": [{"op": "text", "path": "/work/../x", "text": "x"}]}, "path_escape"),
                ({"files": {"a": {"hex": "00"}}}, "bad_request"),
                ({"files": {"a": {"base64": "!!"}}}, "bad_request")):
            resp = await gateway.client.post("/v1/sandboxes", headers=AUTH,
                                             json={"runtime": self.runtime, **self.create_options,
                                                   "volumes": {"/data": {"name": "held"}}, **body})
            assert (await resp.json())["error"]["code"] == code, body
            listed = await (await gateway.client.get("/v1/sandboxes", headers=AUTH)).json()
            assert listed["sandboxes"] == [], body
            described = await (await gateway.client.get("/v1/volumes/held", headers=AUTH)).json()
            assert described["mounted_by"] == [], "a failed create gives its volumes back"

    # -- paths -------------------------------------------------------------------------------

    async def test_absolute_and_relative_paths_in_every_files_op(self, gateway: Gateway) -> None:
        sandbox = await gateway.create()
        sid = sandbox["id"]
        ws = await gateway.ws(sid)
        await ws.call("fs.write", path="/work/abs.txt", data=b"absolute")
        assert (await ws.call("fs.stat", path="abs.txt"))["size"] == 8
        names = [e["name"] for e in (await ws.call("fs.list", path="/work"))["entries"]]
        assert "abs.txt" in names
        await ws.call("fs.move", src="/work/abs.txt", dst="rel.txt")
        for query in ("path=rel.txt", "path=/work/rel.txt"):
            resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files?{query}", headers=AUTH)
            assert resp.status == 200 and await resp.read() == b"absolute", query
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files/rel.txt", headers=AUTH)
        assert resp.status == 200 and await resp.read() == b"absolute"
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files//work/rel.txt", headers=AUTH)
        assert resp.status == 400, "the path form of the route stays relative to /work"
        resp = await gateway.client.put(f"/v1/sandboxes/{sid}/files?path=/work/up/load.txt", data=b"up",
                                        headers=AUTH)
        assert resp.status == 201, await resp.text()
        resp = await gateway.client.delete(f"/v1/sandboxes/{sid}/files?path=/work/up", headers=AUTH)
        assert resp.status == 204
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files?path=up/load.txt", headers=AUTH)
        assert resp.status == 404
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files", params={"path": self.system_file},
                                        headers=AUTH)
        if self.whole_file_system:
            assert resp.status == 200 and self.system_file_holds in await resp.read(), self.system_file
            resp = await gateway.client.put(f"/v1/sandboxes/{sid}/files?path=/tmp/x", data=b"tmp", headers=AUTH)
            assert resp.status == 201, await resp.text()
            assert (await ws.call("fs.stat", path="/tmp/x"))["size"] == 3
        else:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "path_escape"
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files", headers=AUTH)
        assert resp.status == 400, "no path: a clear error"
        await ws.ws.close()
