"""Pod runtime: create latency of a sandbox with one named volume (a cold pod mounting a
PersistentVolumeClaim) against one from the warm pool, on the local test cluster.

    .venv/bin/python bench/pod_volume_create.py [--n 10]

Starts the local test cluster (tests/kube) and the pod runtime in this process. Measures
`PodRuntime.create` plus the agent's hello, as the gateway's create does: (a) from a warm pool of
one pod (refilled between creates, outside the timing), (b) cold with one read-write volume (a
claim of the test kubelet's ext4-image class, made once before). Also the volume's own create
(PVC POST until Bound: the test kubelet's mkfs + loop mount) and one file upload through an access
pod. The kubelet is test scaffolding, so absolute figures are not a real node's; the ratio is the
point (a volume costs a cold pod).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from _common import stats_ms

from gateway.runtime.agent_client import AgentClient
from gateway.runtime.base import SandboxSpec
from gateway.storage.volumes import Volume, VolumeMount
from plugins.pod.runtime import PodBackend, PodRuntime
from plugins.pod.volumes import PodVolumes
from tests.kube.build import ensure_built
from tests.kube.cluster import running_cluster
from tests.kube.kubelet import TEST_STORAGE_CLASS


def spec(volumes: tuple[VolumeMount, ...] = ()) -> SandboxSpec:
    return SandboxSpec(sandbox_id=f"sb_bench_{secrets.token_hex(4)}", tenant="bench", memory_mb=256,
                       cpu_seconds=600, disk_mb=512, volumes=volumes)


async def timed_create(runtime: PodRuntime, s: SandboxSpec) -> float:
    t0 = time.perf_counter()
    backend = await runtime.create(s)
    assert isinstance(backend, PodBackend)
    agent = AgentClient(backend.channel())
    await agent.start()
    elapsed = time.perf_counter() - t0
    await agent.close()
    await backend.destroy()
    return elapsed


async def run(config: dict[str, Any], n: int) -> dict[str, Any]:
    runtime = PodRuntime({**config, "pool_size": 1, "pool_refill_per_s": 100,
                          "storage_class": TEST_STORAGE_CLASS})
    await runtime.start()
    try:
        assert runtime.pool is not None
        volumes = PodVolumes(runtime)
        volume = Volume(id=f"vol_{secrets.token_hex(10)}", tenant="bench", name="bench", quota_mb=64,
                        store="kubernetes", created_at=time.time())
        t0 = time.perf_counter()
        await volumes.create(volume)
        volume_create = time.perf_counter() - t0

        async def body() -> AsyncIterator[bytes]:
            yield b"x" * 4096

        t0 = time.perf_counter()
        await volumes.write_file(volume, "f", body())
        upload = time.perf_counter() - t0
        mount = VolumeMount(path="/data", name="bench", readonly=False, quota_mb=64, source=volumes.source(volume),
                            volume_id=volume.id)
        warm, cold = [], []
        for _ in range(n):
            await runtime.pool.wait_full()
            warm.append(await timed_create(runtime, spec()))
            cold.append(await timed_create(runtime, spec((mount,))))
        await volumes.delete(volume)
        return {"volume_create_s": volume_create, "upload_via_access_pod_s": upload,
                "warm_pool": stats_ms(warm), "cold_with_volume": stats_ms(cold)}
    finally:
        await runtime.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    with running_cluster(ensure_built(), log=lambda line: print(line, file=sys.stderr)) as cluster:
        ns = cluster.create_namespace()
        result = asyncio.run(run({"kubeconfig": str(cluster.kubeconfig), "namespace": ns,
                                  "ready_timeout_s": 60.0}, args.n))
    print(f"volume create (PVC until Bound): {result['volume_create_s'] * 1000:.0f} ms")
    print(f"upload through an access pod:    {result['upload_via_access_pod_s'] * 1000:.0f} ms")
    for key in ("warm_pool", "cold_with_volume"):
        print(f"create + hello, {key:17s} {result[key]}")


if __name__ == "__main__":
    main()
