"""fs.watch: the latency of one change and the events per second a watch delivers, per runtime.

    .venv/bin/python bench/fs_watch.py [--runtime wasm|microvm|pod ...] [--n 50] [--burst 2000]

A gateway (in this process, on a loopback port) and one sandbox per runtime; the client is the
Python SDK (`sandbox.files.watch`, msgpack WebSocket).
- latency: one file written with one `fs.write` over the WebSocket, timed from the request's send
  to the `created` change arriving at the client; `--n` times, one at a time. On WASM (polling,
  `--poll-interval`, default 0.05 s) it is bounded below by the wait for the next poll; with inotify
  (microVM, pod) by the agent's coalescing window (guest_agent/watch.py SETTLE_S).
- throughput: one exec creates `--burst` files in a loop; events per second from the first change
  to the last arriving at the client (all of them, in order, checked).
The pod runtime runs against the local test cluster (tests/kube, built on first use); the microVM
runtime needs its `default` image (`sandgate images build microvm`; SANDGATE_CACHE_DIR is honoured).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.client import AsyncSandbox
from gateway.config import Limits, Settings
from gateway.web.app import create_app

KEY = "bench-watch-key"


@contextlib.asynccontextmanager
async def gateway(runtime: str, config: dict[str, Any]) -> AsyncIterator[str]:
    settings = Settings(api_keys={KEY: "bench"}, default_runtime=runtime, reap_interval_s=3600.0,
                        limits=Limits(exec_timeout_s=300.0), runtimes={runtime: {"pool_size": 0, **config}},
                        blocked_plugins=tuple(r for r in ("wasm", "microvm", "pod") if r != runtime))
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def measure(url: str, runtime: str, n: int, burst: int, poll_interval: float) -> dict[str, Any]:
    async with AsyncSandbox.create(runtime=runtime, url=url, api_key=KEY) as sb:
        await sb.files.mkdir("watched")
        async with sb.files.watch("watched", poll_interval=poll_interval) as watch:
            changes = aiter(watch)
            latencies = []
            for i in range(n):
                sent = time.perf_counter()
                await sb.connection.request("fs.write", {"path": f"watched/l{i}", "data": b"x", "truncate": True})
                change = await anext(changes)
                latencies.append((time.perf_counter() - sent) * 1000)
                assert (change.kind, change.path) == ("created", f"l{i}"), change
            code = (f"import os\nfor i in range({burst}):\n"
                    f"    open(os.path.join('watched', 'b%06d' % i), 'w').close()\n")
            execution = await sb.start(code=code)
            first = await anext(changes)
            t0 = time.perf_counter()
            got, events, kinds = [first.path], 1, {first.kind: 1}
            while len(got) < burst:
                change = await anext(changes)
                events += 1
                kinds[change.kind] = kinds.get(change.kind, 0) + 1
                if change.kind == "created":
                    got.append(change.path)
            elapsed = time.perf_counter() - t0
            await execution.wait()
            # (a file's open and close may fall in two coalescing windows: created, then modified)
            assert got == [f"b{i:06d}" for i in range(burst)], "every creation, in order"
            backend = watch.backend
    latencies.sort()
    return {"runtime": runtime, "backend": backend,
            "latency_ms_median": round(statistics.median(latencies), 2),
            "latency_ms_p90": round(latencies[int(len(latencies) * 0.9) - 1], 2),
            "latency_ms_min": round(latencies[0], 2),
            "events_per_s": round((events - 1) / elapsed) if elapsed > 0 else None, "burst_events": kinds}


async def run(args: argparse.Namespace) -> None:
    for runtime in args.runtime:
        if runtime == "pod":
            from tests.kube.build import ensure_built
            from tests.kube.cluster import running_cluster

            with running_cluster(ensure_built(), log=lambda line: None) as cluster:
                config = {"kubeconfig": str(cluster.kubeconfig), "namespace": cluster.create_namespace("bench"),
                          "ready_timeout_s": 60.0}
                async with gateway(runtime, config) as url:
                    print(await measure(url, runtime, args.n, args.burst, args.poll_interval))
        else:
            async with gateway(runtime, {}) as url:
                print(await measure(url, runtime, args.n, args.burst, args.poll_interval))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", action="append", choices=("wasm", "microvm", "pod"))
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--poll-interval", type=float, default=0.05)
    args = parser.parse_args()
    args.runtime = args.runtime or ["wasm"]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
