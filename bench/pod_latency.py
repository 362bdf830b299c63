"""Pod runtime: create -> agent ready, and exec round trips, against the local test cluster.

    .venv/bin/python bench/pod_latency.py [--n 20] [--rtt 300]

Starts the local test cluster (tests/kube: a real kube-apiserver 1.20 built from Debian's source,
etcd, the test kubelet running pods under bubblewrap; built on first use) and the pod runtime in
this process, then measures:

- create, cold, split into its steps (the runtime's own calls, one after another): the pod POST
  (API server + etcd), POST -> container running as the runtime's watch sees it (scheduling by the
  test kubelet, its bwrap start, its status PATCH, the watch event), the exec/attach WebSocket
  upgrade (API server -> kubelet proxy), and the agent's hello; then destroy (DELETE -> pod gone);
- create from the warm pool (a PATCH relabelling a ready pod);
- round trips over the agent's stream: `ping` and a small Python exec, with the stream going through
  the API server and the kubelet, against the same agent code on local pipes (no Kubernetes), and a
  plain GET of the pod (one API server round trip).

The difference between the stream round trip and the local one is what the API server's proxy and
the kubelet's stream server cost per message. The kubelet here is test scaffolding (a Python
process), so the "running" step is not what a real kubelet and container runtime take; the API
server and etcd parts are real.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import PYTHON, ROOT, banner, fmt_stats, stats_ms, write_results

from gateway.runtime.agent_client import AgentClient
from gateway.runtime.base import SandboxSpec, StreamChannel
from plugins.pod import manifests as m
from plugins.pod.runtime import PodBackend, PodRuntime
from tests.kube.build import ensure_built
from tests.kube.cluster import running_cluster


def spec(i: int) -> SandboxSpec:
    return SandboxSpec(sandbox_id=f"sb_bench_{i}_{secrets.token_hex(3)}", tenant="bench", memory_mb=256,
                       cpu_seconds=600, disk_mb=512)


async def cold_creates(runtime: PodRuntime, n: int) -> dict[str, Any]:
    """Each step of PodRuntime._start timed on its own, plus hello and destroy."""
    steps: dict[str, list[float]] = {k: [] for k in ("post", "running", "stream", "hello", "total", "destroy")}
    kube, ns = runtime.kube, runtime.settings.namespace
    for i in range(n):
        name = f"sandgate-bench-{secrets.token_hex(4)}"
        s = spec(i)
        t0 = time.perf_counter()
        await kube.call(kube.core.create_namespaced_pod, ns, m.pod_manifest(
            runtime.settings, name, s, datetime.datetime.now(datetime.UTC), image=runtime.settings.sandbox_image,
            memory_mb=256, disk_mb=512))
        t1 = time.perf_counter()
        await runtime._wait_ready(lambda w, name=name: w.find(name), name)
        t2 = time.perf_counter()
        backend = PodBackend(runtime, name, s, runtime.settings.sandbox_image)
        await backend.connect()
        t3 = time.perf_counter()
        agent = AgentClient(backend.channel())
        await agent.start()
        t4 = time.perf_counter()
        await agent.close()
        await backend.destroy()
        t5 = time.perf_counter()
        for key, value in (("post", t1 - t0), ("running", t2 - t1), ("stream", t3 - t2), ("hello", t4 - t3),
                           ("total", t4 - t0), ("destroy", t5 - t4)):
            steps[key].append(value)
    return {key: stats_ms(values) for key, values in steps.items()}


async def pooled_creates(config: dict[str, Any], n: int) -> dict[str, Any]:
    runtime = PodRuntime({**config, "pool_size": 1, "pool_refill_per_s": 100})
    await runtime.start()
    samples = []
    try:
        assert runtime.pool is not None
        for i in range(n):
            await asyncio.wait_for(runtime.pool.wait_full(), 60)
            t0 = time.perf_counter()
            backend = await runtime.create(spec(i))
            agent = AgentClient(backend.channel())
            await agent.start()
            samples.append(time.perf_counter() - t0)
            await agent.close()
            await backend.destroy()
    finally:
        await runtime.stop()
    return stats_ms(samples)


async def round_trips(agent: AgentClient, n: int) -> dict[str, Any]:
    async def ping() -> None:
        await agent.request("ping")

    counter = iter(range(1 << 30))

    async def small_exec() -> None:
        async for _ in await agent.stream("exec.start", exec_id=f"b{next(counter)}", language="python", code="1"):
            pass

    return {"ping": await timed(ping, n), "exec_python_1": await timed(small_exec, n)}


async def timed(call: Callable[[], Awaitable[None]], n: int) -> dict[str, Any]:
    for _ in range(min(20, n)):  # warm-up
        await call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    return stats_ms(samples)


async def local_agent(n: int) -> dict[str, Any]:
    """The same agent on pipes: python -m guest_agent, no Kubernetes in the path."""
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "guest_agent", "--root", work, cwd=ROOT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        agent = AgentClient(StreamChannel(proc.stdout, proc.stdin))
        await agent.start()
        try:
            return await round_trips(agent, n)
        finally:
            await agent.close()
            await proc.wait()


async def measure(args: argparse.Namespace) -> None:
    banner("pod runtime: create -> agent ready, exec round trips (local kube-apiserver 1.20)")
    binaries = ensure_built()
    results: dict[str, Any] = {}
    with running_cluster(binaries, log=lambda line: print("  ", line)) as cluster:
        results["apiserver_start_s"] = round(cluster.apiserver_start_seconds, 3)
        ns = cluster.create_namespace("bench")
        config = {"kubeconfig": str(cluster.kubeconfig), "namespace": ns, "ready_timeout_s": 60.0}
        for channel in ("exec", "attach"):
            runtime = PodRuntime({**config, "channel": channel})
            await runtime.start()
            try:
                cold = await cold_creates(runtime, args.n)
                backend = await runtime.create(spec(999))
                assert isinstance(backend, PodBackend)
                agent = AgentClient(backend.channel())
                await agent.start()
                rtt = await round_trips(agent, args.rtt)

                async def get_pod_once(runtime: PodRuntime = runtime, pod: str = backend.pod) -> None:
                    await runtime.kube.call(runtime.kube.core.read_namespaced_pod, pod, ns)

                get_pod = await timed(get_pod_once, args.rtt)
                await agent.close()
                await backend.destroy()
            finally:
                await runtime.stop()
            results[channel] = {"cold_create": cold, "round_trip": rtt, "api_get_pod": get_pod}
            print(f"-- channel = {channel}")
            for key, label in (("post", "pod POST (API server + etcd)"),
                               ("running", "POST -> running (test kubelet + watch)"),
                               ("stream", f"{channel} WebSocket upgrade (via API server)"),
                               ("hello", "agent hello over the stream"),
                               ("total", "cold create -> agent ready"), ("destroy", "destroy (DELETE -> gone)")):
                print(fmt_stats(key + ": " + label, cold[key]))
            print(fmt_stats("ping over the stream", rtt["ping"]))
            print(fmt_stats("exec python '1' over the stream", rtt["exec_python_1"]))
            print(fmt_stats("GET pod (one API server round trip)", get_pod))
        results["pooled_create"] = await pooled_creates(config, args.n)
        print(fmt_stats("create from the warm pool (PATCH) + hello", results["pooled_create"]))
    results["local_pipes"] = await local_agent(args.rtt)
    print(fmt_stats("ping, same agent on local pipes", results["local_pipes"]["ping"]))
    print(fmt_stats("exec python '1', local pipes", results["local_pipes"]["exec_python_1"]))
    stream_cost = results["exec"]["round_trip"]["ping"]["p50_ms"] - results["local_pipes"]["ping"]["p50_ms"]
    results["api_server_stream_cost_p50_ms"] = round(stream_cost, 3)
    print(f"   the API server + kubelet stream path adds ~{stream_cost:.2f} ms per round trip (p50, exec channel)")
    write_results("pod_latency", results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20, help="creates per variant")
    p.add_argument("--rtt", type=int, default=300, help="round trips per measurement")
    args = p.parse_args()
    if sys.platform != "linux":
        raise SystemExit("the local test cluster needs Linux")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
