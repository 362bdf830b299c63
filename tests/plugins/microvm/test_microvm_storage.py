"""Named volumes, patches and whole-file-system access on microVMs: real QEMU, real ext4 images on
virtio-blk, through the real gateway (issue 17).

A sandbox with volumes boots cold (no snapshot has its disks), a few seconds each under TCG, so
each test makes only the VMs it needs.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Limits, Settings, Storage
from gateway.storage import local
from gateway.testing.conformance import AUTH, KEY, OTHER_KEY, Gateway, GatewayFixtures
from gateway.web.app import create_app

pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_image")]

CONFIG = {"pool_size": 1}


@pytest.fixture(autouse=True)
def _local_store() -> None:
    why = local.available()
    if why is not None:
        pytest.skip(why)


class TestMicrovmStorage(GatewayFixtures):
    runtime = "microvm"
    runtime_config = CONFIG

    @pytest.fixture
    async def gateway(self, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
                      tmp_path: Path) -> Gateway:
        settings = Settings(api_keys={KEY: "tenant-a", OTHER_KEY: "tenant-b"},
                            limits=Limits(exec_timeout_s=60.0), reap_interval_s=3600.0,
                            blocked_plugins=self._blocked(), runtimes={self.runtime: self.runtime_config},
                            storage=Storage(dir=str(tmp_path / "volumes")))
        client = await aiohttp_client(create_app(settings, plugins=self.plugins))
        return Gateway(client, self.runtime, {})

    async def _volume(self, gateway: Gateway, name: str, quota_mb: int = 8) -> None:
        resp = await gateway.client.post("/v1/volumes", json={"name": name, "quota_mb": quota_mb,
                                                              "runtime": "microvm"}, headers=AUTH)
        assert resp.status == 201, await resp.text()

    async def _destroy(self, gateway: Gateway, sandbox_id: str) -> None:
        resp = await gateway.client.delete(f"/v1/sandboxes/{sandbox_id}", headers=AUTH)
        assert resp.status == 204, await resp.text()

    async def test_written_in_one_read_only_in_two(self, gateway: Gateway) -> None:
        """A file written (and closed, nothing else) in one microVM is in the image once that VM is
        destroyed (the guest's page cache was flushed before the kill), and two microVMs mounting
        the volume read-only at once both read it and cannot write it."""
        await self._volume(gateway, "shared")
        writer = await gateway.create(volumes={"/data": {"name": "shared"}})
        done = await gateway.exec(writer["id"], command=["sh", "-c", "printf hello > /data/greeting && "
                                                         "mkdir /data/sub && seq 1 50000 > /data/sub/n"])
        assert done["exit_code"] == 0, done
        await self._destroy(gateway, writer["id"])

        readers = [await gateway.create(volumes={"/mnt/in": {"name": "shared", "readonly": True}}) for _ in range(2)]
        for reader in readers:
            got = await gateway.exec(reader["id"], command=["sh", "-c", "cat /mnt/in/greeting; wc -l < /mnt/in/sub/n"])
            assert got["stdout"] == "hello50000\n", got
            refused = await gateway.exec(reader["id"], command=["sh", "-c", "echo x > /mnt/in/new"])
            assert refused["exit_code"] != 0 and "Read-only file system" in refused["stderr"], refused
            resp = await gateway.client.put(f"/v1/sandboxes/{reader['id']}/files", params={"path": "/mnt/in/new"},
                                            data=b"x", headers=AUTH)
            assert resp.status >= 400, await resp.text()
        listed = await (await gateway.client.get("/v1/volumes/shared", headers=AUTH)).json()
        assert sorted(m["sandbox_id"] for m in listed["mounted_by"]) == sorted(r["id"] for r in readers)
        assert all(m["readonly"] for m in listed["mounted_by"])
        # read-write while two read it: refused
        resp = await gateway.client.post("/v1/sandboxes", json={"runtime": "microvm",
                                                                "volumes": {"/data": {"name": "shared"}}},
                                          headers=AUTH)
        assert resp.status == 409 and (await resp.json())["error"]["code"] == "busy"
        for reader in readers:
            await self._destroy(gateway, reader["id"])
        listed = await (await gateway.client.get("/v1/volumes/shared", headers=AUTH)).json()
        assert listed["mounted_by"] == []

    async def test_quota(self, gateway: Gateway) -> None:
        """Past the image's size: ENOSPC inside the guest, `disk_quota` through the files API; the
        volume keeps working after (a smaller file fits)."""
        await self._volume(gateway, "small", quota_mb=4)
        sandbox = await gateway.create(volumes={"/data": {"name": "small"}})
        sid = sandbox["id"]
        inside = await gateway.exec(sid, command=["sh", "-c", "dd if=/dev/zero of=/data/big bs=1M count=16"])
        assert inside["exit_code"] != 0 and "No space left on device" in inside["stderr"], inside
        await gateway.exec(sid, command=["rm", "/data/big"])
        resp = await gateway.client.put(f"/v1/sandboxes/{sid}/files", params={"path": "/data/big"},
                                        data=io.BytesIO(bytes(16 << 20)), headers=AUTH)
        assert resp.status == 507, await resp.text()
        assert (await resp.json())["error"]["code"] == "disk_quota"
        resp = await gateway.client.put(f"/v1/sandboxes/{sid}/files", params={"path": "/data/fits"},
                                        data=b"ok", headers=AUTH)
        assert resp.status in (200, 201), await resp.text()
        await self._destroy(gateway, sid)

    async def test_patches_and_whole_file_system(self, gateway: Gateway) -> None:
        """Patches at create reach the root file system (/etc) before the first exec; the files API
        reads /etc and writes /tmp, outside /work; a volume mounted at a path with a
        space and a percent sign is where it was asked to be."""
        await self._volume(gateway, "odd")
        sandbox = await gateway.create(
            volumes={"/srv/my data%20": {"name": "odd"}},
            patches=[{"op": "text", "path": "/etc/sandgate-test.conf", "text": "patched=1\n"},
                     {"op": "append", "path": "/etc/sandgate-test.conf", "text": "more=2\n"},
                     {"op": "mkdir", "path": "/opt/tools"},
                     {"op": "symlink", "path": "/opt/tools/conf", "target": "/etc/sandgate-test.conf"}],
            files={"/tmp/seed.txt": "seed"})
        sid = sandbox["id"]
        first = await gateway.exec(sid, command=["sh", "-c", "cat /opt/tools/conf /tmp/seed.txt; "
                                                 "grep -c ' /srv/my\\\\040data%20 ext4 ' /proc/mounts"])
        assert first["stdout"] == "patched=1\nmore=2\nseed1\n", first
        # The default template is an initramfs without /etc/os-release; its init's own config is
        # the same kind of file: the image's, under /etc.
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files", params={"path": "/etc/sandgate/image.conf"},
                                        headers=AUTH)
        assert resp.status == 200 and b"SANDGATE_TEMPLATE=default" in await resp.read()
        resp = await gateway.client.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/x"}, data=b"tmp!",
                                        headers=AUTH)
        assert resp.status in (200, 201), await resp.text()
        got = await gateway.exec(sid, command=["cat", "/tmp/x"])
        assert got["stdout"] == "tmp!"
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/x"}, headers=AUTH)
        assert await resp.read() == b"tmp!"
        await self._destroy(gateway, sid)
