"""Figure 5: 100 concurrent sandboxes.

    .venv/bin/python bench/concurrency.py [--n 100] [--pool 2]

Against a gateway with quotas raised (Quotas(max_sandboxes=200, creates_per_minute=10000)) and the
default warm pool (pool_size 2, refill 4/s): `--n` creates sent at once (one aiohttp session, no
connection limit), then one small exec (`POST .../exec {"code": "1"}`) in every sandbox at once,
then memory (the gateway's and every launcher's smaps_rollup, and the machine's MemAvailable),
then every sandbox deleted at once, and a check that no launcher process of this gateway is left
(before and after the gateway itself stops).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    AUTH,
    Gateway,
    banner,
    children_of,
    fmt_stats,
    launcher_pids,
    measured,
    proc_memory_mb,
    settings_dict,
    stats_ms,
    write_results,
)


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def timed(coro: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = await coro
    return time.perf_counter() - t0, result


async def run(n: int, pool: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n, "pool_size": pool}
    settings = settings_dict(pool_size=pool, max_sandboxes=200, creates_per_minute=10_000)
    avail_before = mem_available_mb()
    async with Gateway(settings) as gw:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(headers=AUTH, connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=300)) as s:
            if pool:
                await gw.wait_pool(s, pool, settle_s=1.0)
            gw_idle = proc_memory_mb(gw.pid)

            async def create() -> tuple[int, dict[str, Any]]:
                async with s.post(f"{gw.url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
                    return r.status, await r.json()

            t0 = time.perf_counter()
            creates = await asyncio.gather(*(timed(create()) for _ in range(n)))
            out["create_burst_total_s"] = round(time.perf_counter() - t0, 3)
            ok = [body["id"] for _, (status, body) in creates if status == 201]
            failed = [body for _, (status, body) in creates if status != 201]
            out["creates_ok"], out["creates_failed"] = len(ok), len(failed)
            out["create_errors"] = failed[:3]
            out["create_latency"] = stats_ms(t for t, (status, _) in creates if status == 201)

            async def run_exec(sid: str) -> dict[str, Any]:
                async with s.post(f"{gw.url}/v1/sandboxes/{sid}/exec", json={"language": "python", "code": "1"}) as r:
                    return dict(await r.json())

            t0 = time.perf_counter()
            execs = await asyncio.gather(*(timed(run_exec(sid)) for sid in ok))
            out["exec_burst_total_s"] = round(time.perf_counter() - t0, 3)
            out["execs_ok"] = sum(1 for _, body in execs if body.get("stdout") == "1\n")
            out["exec_latency"] = stats_ms(t for t, _ in execs)

            await asyncio.sleep(2.0)
            state = await gw.state(s)
            pids = [x["launcher_pid"] for x in state["sandboxes"] if x["launcher_pid"]]
            pool_pids = state["pool_pids"]
            launchers = [proc_memory_mb(pid) for pid in pids]
            pooled = [proc_memory_mb(pid) for pid in pool_pids]
            gw_mem = proc_memory_mb(gw.pid)
            out["memory"] = {
                "gateway_idle": gw_idle,
                "gateway_with_sandboxes": gw_mem,
                "launchers": len(launchers),
                "launchers_private_total_mb": round(sum(x["private_mb"] for x in launchers), 1),
                "launchers_pss_total_mb": round(sum(x["pss_mb"] for x in launchers), 1),
                "launchers_rss_total_mb": round(sum(x["rss_mb"] for x in launchers), 1),
                "pool_launchers": len(pooled),
                "pool_pss_total_mb": round(sum(x["pss_mb"] for x in pooled), 1),
                "gateway_plus_launchers_pss_mb": round(gw_mem["pss_mb"] + sum(x["pss_mb"] for x in launchers)
                                                       + sum(x["pss_mb"] for x in pooled), 1),
                "mem_available_drop_mb": round(avail_before - mem_available_mb(), 1),
            }

            async def delete(sid: str) -> int:
                async with s.delete(f"{gw.url}/v1/sandboxes/{sid}") as r:
                    return r.status

            t0 = time.perf_counter()
            statuses = await asyncio.gather(*(delete(sid) for sid in ok))
            out["destroy_total_s"] = round(time.perf_counter() - t0, 3)
            out["deletes_ok"] = sum(1 for st in statuses if st == 204)
            await asyncio.sleep(0.5)
            state = await gw.state(s)
            left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]  # noqa: ASYNC240
            out["after_destroy"] = {
                "sandboxes_listed": len(state["sandboxes"]),
                "sandbox_launchers_still_running": len(left),
                "gateway_children": len(children_of(gw.pid)),
                "pool_launchers": len(state["pool_pids"]),
                "gateway_memory": proc_memory_mb(gw.pid),
            }
        gw_pid = gw.pid
    await asyncio.sleep(0.5)
    out["after_gateway_stop"] = {
        "launchers_of_this_gateway": [p for p in launcher_pids() if _parent(p) == gw_pid],
        "orphaned_launchers_from_this_run": [p for p in pids + pool_pids
                                             if Path(f"/proc/{p}").exists()],  # noqa: ASYNC240
    }
    return out


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--pool", type=int, default=2)
    args = p.parse_args()
    banner(f"{args.n} concurrent sandboxes")
    r = await measured("concurrency", lambda: run(args.n, args.pool), tries=2, threshold_cores=0.3)
    print(f"create burst: {r['creates_ok']}/{args.n} ok in {r['create_burst_total_s']:.2f} s")
    print(fmt_stats("   create latency under the burst", r["create_latency"]))
    print(f"exec burst: {r['execs_ok']}/{r['creates_ok']} ok in {r['exec_burst_total_s']:.3f} s")
    print(fmt_stats("   exec latency under the burst", r["exec_latency"]))
    m = r["memory"]
    print(f"memory: gateway private {m['gateway_idle']['private_mb']} -> "
          f"{m['gateway_with_sandboxes']['private_mb']} MB "
          f"(PSS {m['gateway_with_sandboxes']['pss_mb']} MB); {m['launchers']} launchers: private total "
          f"{m['launchers_private_total_mb']} MB, PSS total {m['launchers_pss_total_mb']} MB; "
          f"gateway + all launchers PSS {m['gateway_plus_launchers_pss_mb']} MB; MemAvailable dropped "
          f"{m['mem_available_drop_mb']} MB")
    a = r["after_destroy"]
    print(f"destroy: {r['deletes_ok']} deleted in {r['destroy_total_s']:.2f} s; launchers still running: "
          f"{a['sandbox_launchers_still_running']}; gateway children: {a['gateway_children']} "
          f"(pool: {a['pool_launchers']}); after the gateway stopped: "
          f"{len(r['after_gateway_stop']['orphaned_launchers_from_this_run'])} left")
    write_results("concurrency", r)


if __name__ == "__main__":
    asyncio.run(main())
