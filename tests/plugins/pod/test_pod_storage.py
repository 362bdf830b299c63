"""Named volumes and whole-file-system access on the pod runtime, against the local test cluster:
volumes are PersistentVolumeClaims that the test kubelet provisions as loop-mounted ext4 images of
the claim's size (tests/kube/kubelet.py), so quotas end in a real ENOSPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Limits, Settings, Storage
from gateway.testing.conformance import AUTH, KEY, OTHER_AUTH, OTHER_KEY, Gateway
from gateway.testing.storage import StorageConformance
from gateway.web.app import create_app
from plugins.pod import manifests as m
from tests.kube.cluster import KubeCluster
from tests.kube.kubelet import TEST_STORAGE_CLASS

pytestmark = pytest.mark.pod

Client = TestClient[Any, Any]


class TestPodStorageConformance(StorageConformance):
    runtime = "pod"
    whole_file_system = True

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = {**pod_config, "storage_class": TEST_STORAGE_CLASS}  # per test: its own namespace

    def _patch_dir(self) -> str:
        # A pod's root file system is read-only: patches reach its writable emptyDirs (/work, /tmp).
        return "/tmp/patched"


def pod_gateway_settings(tmp_path: Path, pod_config: dict[str, Any], **extra: Any) -> Settings:
    from importlib.metadata import entry_points

    from gateway.plugins import ENTRY_POINT_GROUP

    blocked = tuple(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name != "pod")
    config = {**pod_config, "storage_class": TEST_STORAGE_CLASS, "volume_bind_timeout_s": 60.0, **extra}
    return Settings(api_keys={KEY: "tenant-a", OTHER_KEY: "tenant-b"}, limits=Limits(exec_timeout_s=60.0),
                    reap_interval_s=3600.0, blocked_plugins=blocked, runtimes={"pod": config},
                    storage=Storage(dir=str(tmp_path / "volumes")))


@pytest.fixture
async def gateway(aiohttp_client: Callable[..., Awaitable[Client]], tmp_path: Path,
                  pod_config: dict[str, Any]) -> Gateway:
    return Gateway(await aiohttp_client(create_app(pod_gateway_settings(tmp_path, pod_config))), "pod", {})


async def make_volume(client: Client, name: str, quota_mb: int = 16) -> dict[str, Any]:
    resp = await client.post("/v1/volumes", json={"name": name, "quota_mb": quota_mb, "runtime": "pod"},
                             headers=AUTH)
    assert resp.status == 201, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def python(gateway: Gateway, sandbox_id: str, code: str) -> dict[str, Any]:
    return await gateway.exec(sandbox_id, language="python", code=code)


@pytest.fixture
async def sandboxes(gateway: Gateway) -> AsyncIterator[list[str]]:
    made: list[str] = []
    yield made
    for sandbox_id in made:
        await gateway.client.delete(f"/v1/sandboxes/{sandbox_id}", headers=AUTH)


async def test_write_in_one_pod_read_only_in_two_others(gateway: Gateway, sandboxes: list[str],
                                                        kube_cluster: KubeCluster, kube_namespace: str) -> None:
    client = gateway.client
    await make_volume(client, "shared")
    writer = await gateway.create(volumes={"/data": {"name": "shared"}})
    sandboxes.append(writer["id"])
    # Cold, not from the pool: its pod mounts the claim.
    pod = kube_cluster.api("GET", f"/api/v1/namespaces/{kube_namespace}/pods?labelSelector="
                                  f"{m.SANDBOX_ID}={m.label_value(writer['id'])}")["items"][0]
    claims = [v["persistentVolumeClaim"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert [c.get("readOnly", False) for c in claims] == [False] and claims[0]["claimName"].startswith("sandgate-vol-")
    result = await python(gateway, writer["id"], "import os; open('/data/note.txt', 'w').write('kept'); "
                                                 "print(os.stat('/data/note.txt').st_uid)")
    assert result["exit_code"] == 0, result
    # A second read-write mount, or a read-only one beside the writer, is refused.
    resp = await client.post("/v1/sandboxes", json={"runtime": "pod", "volumes": {"/data": {"name": "shared",
                                                                                           "readonly": True}}},
                             headers=AUTH)
    assert resp.status == 409, await resp.text()
    assert (await client.delete(f"/v1/sandboxes/{writer['id']}", headers=AUTH)).status == 204
    sandboxes.remove(writer["id"])

    readers = [await gateway.create(volumes={"/in": {"name": "shared", "readonly": True}}) for _ in range(2)]
    sandboxes.extend(r["id"] for r in readers)
    for reader in readers:
        result = await python(gateway, reader["id"], "print(open('/in/note.txt').read())\n"
                                                     "try:\n    open('/in/x', 'w')\nexcept OSError as e:\n"
                                                     "    print(e.errno)")
        assert result["stdout"] == "kept\n30\n", result  # EROFS
    listed = (await (await client.get("/v1/volumes", headers=AUTH)).json())["volumes"]
    assert sorted(u["sandbox_id"] for u in listed[0]["mounted_by"]) == sorted(r["id"] for r in readers)
    resp = await client.delete("/v1/volumes/shared", headers=AUTH)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "busy"


async def test_quota_is_enforced_in_the_pod_and_through_the_api(gateway: Gateway, sandboxes: list[str]) -> None:
    client = gateway.client
    await make_volume(client, "small", quota_mb=8)
    sandbox = await gateway.create(volumes={"/data": "small"})
    sandboxes.append(sandbox["id"])
    result = await python(gateway, sandbox["id"], "import errno\ntry:\n"
                                                  "    open('/data/big', 'wb').write(b'x' * (16 << 20))\n"
                                                  "except OSError as e:\n    print(errno.errorcode[e.errno])")
    assert result["stdout"] == "ENOSPC\n", result
    await client.delete(f"/v1/sandboxes/{sandbox['id']}", headers=AUTH)
    sandboxes.remove(sandbox["id"])

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the file system must refuse it
        for _ in range(16):
            yield b"y" * (1 << 20)

    resp = await client.put("/v1/volumes/small/files/more.bin", data=chunks(), headers=AUTH)
    assert resp.status == 507 and (await resp.json())["error"]["code"] == "disk_quota", await resp.text()


async def test_files_api_used_bytes_survival_and_tenants(gateway: Gateway, sandboxes: list[str]) -> None:
    client = gateway.client
    await make_volume(client, "docs")
    resp = await client.put("/v1/volumes/docs/files/a/b.txt", data=b"hello volume", headers=AUTH)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["bytes"] == 12
    described = await (await client.get("/v1/volumes/docs", headers=AUTH)).json()
    assert isinstance(described["used_bytes"], int) and described["used_bytes"] > 0
    assert (await client.get("/v1/volumes/docs", headers=OTHER_AUTH)).status == 404
    assert (await client.get("/v1/volumes/docs/files/a/b.txt", headers=OTHER_AUTH)).status == 404
    sandbox = await gateway.create(volumes={"/docs": "docs"})
    sandboxes.append(sandbox["id"])
    result = await python(gateway, sandbox["id"], "print(open('/docs/a/b.txt').read()); "
                                                  "n = open('/docs/c.txt', 'w').write('from the pod')")
    assert result["stdout"] == "hello volume\n", result
    resp = await client.get("/v1/volumes/docs/files/c.txt", headers=AUTH)
    assert resp.status == 409  # mounted read-write: read it through that sandbox
    await client.delete(f"/v1/sandboxes/{sandbox['id']}", headers=AUTH)
    sandboxes.remove(sandbox["id"])
    resp = await client.get("/v1/volumes/docs/files/c.txt", headers=AUTH)
    assert resp.status == 200 and await resp.read() == b"from the pod"
    resp = await client.get("/v1/volumes/docs/files/missing.txt", headers=AUTH)
    assert resp.status == 404
    assert (await client.delete("/v1/volumes/docs", headers=AUTH)).status == 204
    assert (await client.get("/v1/volumes/docs", headers=AUTH)).status == 404


async def test_volumes_survive_a_gateway_restart(aiohttp_client: Callable[..., Awaitable[Client]], tmp_path: Path,
                                                 pod_config: dict[str, Any], kube_cluster: KubeCluster,
                                                 kube_namespace: str) -> None:
    first = await aiohttp_client(create_app(pod_gateway_settings(tmp_path, pod_config)))
    await make_volume(first, "durable")
    assert (await first.put("/v1/volumes/durable/files/f", data=b"1", headers=AUTH)).status == 201
    await first.close()
    second = await aiohttp_client(create_app(pod_gateway_settings(tmp_path, pod_config)))
    resp = await second.get("/v1/volumes/durable/files/f", headers=AUTH)
    assert resp.status == 200 and await resp.read() == b"1"
    claims = kube_cluster.api("GET", f"/api/v1/namespaces/{kube_namespace}/persistentvolumeclaims")["items"]
    assert [c["status"]["phase"] for c in claims] == ["Bound"]
    assert claims[0]["metadata"]["labels"][m.TENANT] == "tenant-a"
    assert (await second.delete("/v1/volumes/durable", headers=AUTH)).status == 204


async def test_a_claim_no_provisioner_serves_fails_the_create(
        aiohttp_client: Callable[..., Awaitable[Client]], tmp_path: Path, pod_config: dict[str, Any],
        kube_cluster: KubeCluster, kube_namespace: str) -> None:
    settings = pod_gateway_settings(tmp_path, pod_config, storage_class="nobody-provisions-this",
                                    volume_bind_timeout_s=2.0)
    client = await aiohttp_client(create_app(settings))
    resp = await client.post("/v1/volumes", json={"name": "lost", "quota_mb": 8, "runtime": "pod"}, headers=AUTH)
    assert resp.status == 503, await resp.text()
    assert "stayed Pending" in (await resp.json())["error"]["message"]
    # The claim is deleted: gone, or going (the pvc-protection finalizer is lifted by the cluster, here
    # the test kubelet, after the gateway's delete returned).
    claims = kube_cluster.api("GET", f"/api/v1/namespaces/{kube_namespace}/persistentvolumeclaims")["items"]
    assert all("deletionTimestamp" in c["metadata"] for c in claims), claims
    assert (await (await client.get("/v1/volumes", headers=AUTH)).json())["volumes"] == []


async def test_whole_file_system_and_read_only_patches(gateway: Gateway, sandboxes: list[str]) -> None:
    client = gateway.client
    sandbox = await gateway.create(patches=[{"op": "text", "path": "/tmp/patched", "text": "p"}])
    sandboxes.append(sandbox["id"])
    resp = await client.get(f"/v1/sandboxes/{sandbox['id']}/files", params={"path": "/etc/os-release"}, headers=AUTH)
    assert resp.status == 200 and b"ID=" in await resp.read()
    resp = await client.get(f"/v1/sandboxes/{sandbox['id']}/files", params={"path": "/tmp/patched"}, headers=AUTH)
    assert resp.status == 200 and await resp.read() == b"p"
    # The pod's root file system is read-only: a patch there fails the create, saying so.
    resp = await client.post("/v1/sandboxes", json={"runtime": "pod", "patches": [
        {"op": "text", "path": "/etc/motd", "text": "x"}]}, headers=AUTH)
    assert resp.status >= 400
    assert "Read-only file system" in (await resp.json())["error"]["message"]
