"""Figure 1: create -> ready. `POST /v1/sandboxes {"runtime": "wasm"}` until its 201 arrives (the
gateway has had the agent's hello reply by then), warm (taken from the pool) and cold (pool 0).

    .venv/bin/python bench/create_latency.py [--n 50] [--pool 4] [--settle 0.3]

Warm: before every create the pool is waited on until it is full again (`pool.ready`, via the
bench server's /_bench/state) and `--settle` seconds more, so the take is a real warm hit; the
refill the take triggers runs concurrently with the create, as it does in production.
Cold: pool_size 0, so every create spawns a launcher. Each sandbox is deleted after its sample
(not timed). Targets: warm p50 <= 10 ms, cold p50 <= 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
from _common import AUTH, Gateway, banner, fmt_stats, measured, settings_dict, stats_ms, verdict, write_results

WARM_TARGET_MS = 10.0
COLD_TARGET_MS = 200.0


async def create_once(session: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
        body = await r.json()
        elapsed = time.perf_counter() - t0
        if r.status != 201:
            raise RuntimeError(f"create answered {r.status}: {body}")
    return elapsed, body["id"]


async def delete(session: aiohttp.ClientSession, url: str, sandbox_id: str) -> None:
    async with session.delete(f"{url}/v1/sandboxes/{sandbox_id}") as r:
        assert r.status == 204, r.status


async def warm(n: int, pool: int, settle: float) -> dict[str, Any]:
    samples, hits = [], 0
    async with Gateway(settings_dict(pool_size=pool)) as gw, aiohttp.ClientSession(headers=AUTH) as s:
        fill = await gw.wait_pool(s, pool, settle_s=1.0)
        print(f"   pool of {pool} filled {fill:.2f} s after the gateway started")
        for _ in range(3):  # warm the HTTP connection and the gateway's code paths
            await gw.wait_pool(s, pool, settle_s=settle)
            _, sid = await create_once(s, gw.url)
            await delete(s, gw.url, sid)
        for _ in range(n):
            await gw.wait_pool(s, pool, settle_s=settle)
            before = (await gw.state(s))["pool_pids"]
            elapsed, sid = await create_once(s, gw.url)
            state = await gw.state(s)
            pid = next(x["launcher_pid"] for x in state["sandboxes"] if x["id"] == sid)
            hits += pid in before
            samples.append(elapsed)
            await delete(s, gw.url, sid)
    return {"pool_size": pool, "settle_s": settle, "pool_hits": hits, **stats_ms(samples)}


async def cold(n: int) -> dict[str, Any]:
    samples = []
    async with Gateway(settings_dict(pool_size=0)) as gw, aiohttp.ClientSession(headers=AUTH) as s:
        for _ in range(3):
            _, sid = await create_once(s, gw.url)
            await delete(s, gw.url, sid)
        for _ in range(n):
            elapsed, sid = await create_once(s, gw.url)
            samples.append(elapsed)
            await delete(s, gw.url, sid)
            await asyncio.sleep(0.05)  # let the killed launcher's teardown finish off the clock
    return {"pool_size": 0, **stats_ms(samples)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--settle", type=float, default=0.3)
    args = p.parse_args()
    banner("create -> ready")
    w = await measured("warm create", lambda: warm(args.n, args.pool, args.settle))
    print(fmt_stats("warm create (pool hit)", w), f"[{w['pool_hits']}/{w['n']} from the pool]")
    c = await measured("cold create", lambda: cold(args.n))
    print(fmt_stats("cold create (pool_size 0)", c))
    w["target_p50_ms"], c["target_p50_ms"] = WARM_TARGET_MS, COLD_TARGET_MS
    w["verdict"] = verdict(w["p50_ms"], WARM_TARGET_MS)
    c["verdict"] = verdict(c["p50_ms"], COLD_TARGET_MS)
    print(f"   warm p50 {w['p50_ms']:.2f} ms vs <= {WARM_TARGET_MS} ms: {w['verdict']}; "
          f"cold p50 {c['p50_ms']:.1f} ms vs <= {COLD_TARGET_MS} ms: {c['verdict']}")
    write_results("create_latency", {"warm": w, "cold": c})


if __name__ == "__main__":
    asyncio.run(main())
