"""The "kubernetes" volume store: each named volume a PersistentVolumeClaim of the pod runtime's namespace.

The claim's storage request is the volume's quota (the storage class's file system enforces it, so a
write past it fails with ENOSPC in the guest); the gateway never sees its bytes. For the volume
file routes (`PUT`/`GET /v1/volumes/{name}/files/{path}`) the backend starts a short-lived *access
pod*: a pod of the agent image mounting the claim at /volume (read-only for reads), reached through
the agent exactly like a sandbox (`PodRuntime._start`), removed once the request ends. It carries
sandbox labels, so the runtime's sweep removes it if the gateway dies mid-request. `used_bytes` is
what the last access pod measured (statvfs of the mount); None until one ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

from gateway.runtime.agent_client import AgentClient
from gateway.runtime.base import SandboxSpec
from gateway.storage.volumes import Volume, VolumeBackend, VolumeMount
from guest_agent.wire import MAX_WRITE_CHUNK, ProtocolError
from plugins.pod import manifests as m
from plugins.pod.runtime import API_ERRORS

if TYPE_CHECKING:
    from plugins.pod.runtime import PodBackend, PodRuntime

#: Where an access pod mounts the claim.
ACCESS_MOUNT = "/volume"
#: An access pod's size and life: it only moves one file.
ACCESS_MEMORY_MB = 128
ACCESS_DISK_MB = 16
ACCESS_TTL_S = 600.0
_USED = ("import os; s = os.statvfs({path!r}); print((s.f_blocks - s.f_bfree) * s.f_frsize)")


def claim_name(volume: Volume) -> str:
    """The PVC's name: a DNS subdomain (a volume id's `_` is not allowed there)."""
    return "sandgate-" + volume.id.replace("_", "-")


class PodVolumes(VolumeBackend):
    """Volumes as PersistentVolumeClaims (`[runtimes.pod] storage_class`, `volume_bind_timeout_s`)."""

    store = "kubernetes"

    def __init__(self, runtime: PodRuntime) -> None:
        self.runtime = runtime
        self._used: dict[str, int] = {}

    def source(self, volume: Volume) -> str:
        return claim_name(volume)

    async def create(self, volume: Volume) -> None:
        """Create the claim; with `volume_bind_timeout_s` > 0 wait until it is Bound, so a volume
        that no provisioner serves fails now, with the reason, instead of at its first mount."""
        runtime = self.runtime
        kube, ns, name = runtime.kube, runtime.settings.namespace, claim_name(volume)
        await runtime._api("create the volume's PersistentVolumeClaim", kube.call(
            kube.core.create_namespaced_persistent_volume_claim, ns, m.claim_manifest(runtime.settings, name, volume)))
        timeout = runtime.settings.volume_bind_timeout_s
        if timeout <= 0:
            return
        try:
            await asyncio.wait_for(self._until_bound(name), timeout)
        except BaseException as exc:
            await asyncio.shield(self._delete_claim(name))
            if isinstance(exc, TimeoutError):
                storage_class = runtime.settings.storage_class or "the cluster's default"
                raise ProtocolError("unavailable", f"the volume's PersistentVolumeClaim {ns}/{name} stayed Pending "
                                                   f"for {timeout:g}s: does a provisioner serve storage class "
                                                   f"{storage_class}?") from None
            raise

    async def _until_bound(self, name: str) -> None:
        kube, ns = self.runtime.kube, self.runtime.settings.namespace
        while True:
            listing = await self.runtime._api("read the volume's PersistentVolumeClaim", kube.call(
                kube.core.list_namespaced_persistent_volume_claim, ns, field_selector=f"metadata.name={name}"))
            if any((c.get("status") or {}).get("phase") == "Bound" for c in listing.get("items") or []):
                return
            try:
                async for _kind, claim in kube.watch(kube.core.list_namespaced_persistent_volume_claim, ns,
                                                     resource_version=listing["metadata"]["resourceVersion"],
                                                     timeout_s=60, field_selector=f"metadata.name={name}"):
                    if (claim.get("status") or {}).get("phase") == "Bound":
                        return
            except self.runtime.kube_error:
                continue  # history compacted (410): list again

    async def delete(self, volume: Volume) -> None:
        self._used.pop(volume.id, None)
        await self._delete_claim(claim_name(volume))

    async def _delete_claim(self, name: str) -> None:
        kube = self.runtime.kube
        try:
            await kube.call(kube.core.delete_namespaced_persistent_volume_claim, name, self.runtime.settings.namespace)
        except self.runtime.kube_error as exc:
            if getattr(exc, "status", 0) != 404:
                raise ProtocolError("unavailable", f"Kubernetes: cannot delete PersistentVolumeClaim {name}: "
                                                   f"{exc}") from None
        except API_ERRORS as exc:
            raise ProtocolError("unavailable", f"Kubernetes: cannot delete PersistentVolumeClaim {name}: "
                                               f"{exc}") from None

    async def used_bytes(self, volume: Volume) -> int | None:
        return self._used.get(volume.id)

    @contextlib.asynccontextmanager
    async def _access(self, volume: Volume, *, readonly: bool) -> AsyncIterator[AgentClient]:
        """An access pod mounting the claim at ACCESS_MOUNT, and its agent; both gone after."""
        runtime = self.runtime
        mount = VolumeMount(path=ACCESS_MOUNT, name=volume.name, readonly=readonly, quota_mb=volume.quota_mb,
                            source=claim_name(volume), volume_id=volume.id)
        spec = SandboxSpec(sandbox_id=f"volume-access-{secrets.token_hex(6)}", tenant=volume.tenant,
                           memory_mb=ACCESS_MEMORY_MB, cpu_seconds=60.0, disk_mb=ACCESS_DISK_MB,
                           ttl_s=ACCESS_TTL_S, volumes=(mount,))
        backend: PodBackend = await runtime._start(spec, runtime.settings.agent_image, ACCESS_MEMORY_MB,
                                                   ACCESS_DISK_MB)
        agent: AgentClient | None = None
        try:
            agent = AgentClient(backend.channel(), request_timeout=runtime.settings.ready_timeout_s,
                                death_reason=backend.wait_exited)
            await agent.start()
            yield agent
            await self._measure(volume, agent)
        finally:
            if agent is not None:
                await asyncio.shield(agent.close())
            await asyncio.shield(backend.destroy())

    async def _measure(self, volume: Volume, agent: AgentClient) -> None:
        events = [e async for e in await agent.stream("exec.start", exec_id="used", language="python",
                                                      code=_USED.format(path=ACCESS_MOUNT))]
        out = b"".join(e["data"] for e in events if e.get("ev") == "data" and e.get("fd") == "stdout")
        with contextlib.suppress(ValueError):
            self._used[volume.id] = int(out.strip())

    async def read_file(self, volume: Volume, path: str) -> AsyncGenerator[bytes, None]:
        async with self._access(volume, readonly=True) as agent:
            stream = await agent.stream("fs.read", path=f"{ACCESS_MOUNT}/{path.lstrip('/')}")
            started = False
            try:
                async for event in stream:
                    if event["ev"] == "start":
                        started = True
                    elif event["ev"] == "data":
                        yield event["data"]
                    elif event["ev"] == "end":
                        if "error" in event:
                            error = ProtocolError.from_wire(event["error"])
                            raise error if not started else ConnectionResetError(error.message)
                        break
            finally:
                if not stream.finished:
                    stream.discard()

    async def write_file(self, volume: Volume, path: str, chunks: AsyncIterator[bytes]) -> int:
        target = f"{ACCESS_MOUNT}/{path.lstrip('/')}"
        head, _, name = target.rpartition("/")
        temp = f"{head}/.{name[:200]}.upload-{secrets.token_hex(4)}"
        async with self._access(volume, readonly=False) as agent:
            written = 0
            moved = False
            try:
                await agent.request("fs.mkdir", path=head, parents=True)
                await agent.request("fs.write", path=temp, data=b"", truncate=True)
                buffer = bytearray()
                async for chunk in chunks:
                    buffer += chunk
                    while len(buffer) >= MAX_WRITE_CHUNK:
                        await agent.request("fs.write", path=temp, data=bytes(buffer[:MAX_WRITE_CHUNK]), offset=written)
                        written += MAX_WRITE_CHUNK
                        del buffer[:MAX_WRITE_CHUNK]
                if buffer:
                    await agent.request("fs.write", path=temp, data=bytes(buffer), offset=written)
                    written += len(buffer)
                await agent.request("fs.move", src=temp, dst=target)
                moved = True
            finally:
                if not moved:
                    with contextlib.suppress(ProtocolError):
                        await agent.request("fs.remove", path=temp)
            return written
