"""microVM figures: how fast a sandbox is ready each way, what a round trip costs, what a VM weighs.

    .venv/bin/python bench/microvm.py [--n 20] [--cold 5] [--pss 10,50]

1. create -> ready by way of starting, on the runtime itself (no HTTP): cold boot (kernel + init +
   agent), full restore (RAM from the migration stream), clone (the template's RAM mapped
   copy-on-write), each until the agent answers a ping; then through the gateway, `POST
   /v1/sandboxes {"runtime": "microvm"}` until its 201 (includes `guest.setup` and the gateway's
   hello), with no pool (a clone per create) and from the warm pool.
2. Round trips through the gateway's WebSocket (msgpack): `exec.start ["true"]` to its end, and
   `fs.stat`.
3. PSS per idle clone with N clones running (each QEMU's smaps_rollup Pss; the template's RAM
   file pages are shared between clones and counted fairly).
4. 10 concurrent creates through the gateway, with no pool and with the default pool of 2: time
   until all are ready.

Targets under TCG (issue 3): clone create->ready p50 <= 120 ms, 10 concurrent creates all ready
<= 1 s, <= 50 MB PSS per idle clone.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import AUTH, Gateway, banner, fmt_stats, settings_dict, stats_ms, verdict, wait_quiet, write_results

CLONE_TARGET_MS = 120.0
BURST_TARGET_S = 1.0
PSS_TARGET_MB = 50.0


async def runtime_starts(n: int, cold: int) -> dict[str, Any]:
    from plugins.microvm.runtime import MicrovmRuntime
    from plugins.microvm.snapshot import find_snapshot
    from plugins.microvm.vm import Boot, Vm

    runtime = MicrovmRuntime({"pool_size": 0})
    await runtime.start()
    machine = runtime.pool_machine
    assert machine is not None
    snapshot = find_snapshot(machine)
    assert snapshot is not None
    work = Path(tempfile.mkdtemp(prefix="sandgate-bench-"))
    out: dict[str, Any] = {"accel": machine.accel.name, "memory_mb": machine.memory_mb}
    try:
        for name, boot, count, timeout in (
            ("cold", Boot(), cold, 120.0),
            ("restore", snapshot.restore_boot(), n, 30.0),
            ("clone", snapshot.clone_boot(), n, 30.0),
        ):
            samples = []
            for _ in range(count):
                wait_quiet(0.3, 0.5, 60)
                t0 = time.perf_counter()
                vm = await Vm.start(machine, work / secrets.token_hex(4), boot)
                await vm.wait_agent(timeout)
                samples.append(time.perf_counter() - t0)
                await runtime.discard(vm)
            out[name] = stats_ms(samples)
            print(fmt_stats(f"{name} start -> agent answers", out[name]))
    finally:
        await runtime.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


async def gateway_figures(n: int, pss_counts: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pool in (0, 2):
        settings = settings_dict(runtimes={"microvm": {"pool_size": pool}}, blocked=["pod"])
        async with Gateway(settings) as gw, aiohttp.ClientSession(headers=AUTH) as s:
            samples = []
            for _ in range(n + 2):
                if pool:
                    await _wait_pool(s, gw, pool)
                wait_quiet(0.3, 0.5, 60)
                t0 = time.perf_counter()
                sid = await _create(s, gw.url)
                samples.append(time.perf_counter() - t0)
                await _delete(s, gw.url, sid)
            key = "gateway_create_pool" if pool else "gateway_create_clone"
            out[key] = stats_ms(samples[2:])  # the first two warm the HTTP connection and code paths
            print(fmt_stats(f"POST /v1/sandboxes (pool {pool})", out[key]))
            if pool:
                await _wait_pool(s, gw, pool)
            burst = f"burst_10_pool{pool}"
            out[burst] = await _burst(s, gw.url, 10)
            print(f"   10 concurrent creates (pool {pool}): all ready after {out[burst]['all_ready_s']:.2f} s "
                  f"(p50 {out[burst]['p50_s']:.2f} s)")
            if not pool:
                out.update(await _round_trips(s, gw.url, n))
                for count in pss_counts:
                    out[f"pss_{count}"] = await _pss(s, gw, count)
                    print(f"   {count} idle clones: PSS {out[f'pss_{count}']['mean_pss_mb']:.1f} MB each "
                          f"(RSS {out[f'pss_{count}']['mean_rss_mb']:.1f} MB)")
    return out


async def _wait_pool(s: aiohttp.ClientSession, gw: Gateway, size: int) -> None:
    deadline = time.monotonic() + 60
    while (await gw.state(s)).get("pools", {}).get("microvm", 0) < size:
        if time.monotonic() > deadline:
            raise TimeoutError("the microvm pool did not fill")
        await asyncio.sleep(0.05)


async def _create(s: aiohttp.ClientSession, url: str) -> str:
    async with s.post(f"{url}/v1/sandboxes", json={"runtime": "microvm"}) as r:
        body = await r.json()
        if r.status != 201:
            raise RuntimeError(f"create answered {r.status}: {body}")
        return str(body["id"])


async def _delete(s: aiohttp.ClientSession, url: str, sid: str) -> None:
    async with s.delete(f"{url}/v1/sandboxes/{sid}") as r:
        assert r.status == 204, r.status


async def _round_trips(s: aiohttp.ClientSession, url: str, n: int) -> dict[str, Any]:
    from gateway.protocol.client import MSGPACK, ClientCodec

    sid = await _create(s, url)
    codec = ClientCodec(MSGPACK)
    execs, stats = [], []
    async with s.ws_connect(f"{url}/v1/sandboxes/{sid}/ws", protocols=(MSGPACK,)) as ws:
        for i in range(n * 5 + 5):
            t0 = time.perf_counter()
            await ws.send_bytes(codec.encode({"id": i * 2 + 1, "op": "exec.start", "command": ["true"]}))
            while codec.decode((await ws.receive()).data).get("ev") != "end":
                pass
            t1 = time.perf_counter()
            await ws.send_bytes(codec.encode({"id": i * 2 + 2, "op": "fs.stat", "path": "."}))
            codec.decode((await ws.receive()).data)
            t2 = time.perf_counter()
            if i >= 5:
                execs.append(t1 - t0)
                stats.append(t2 - t1)
    await _delete(s, url, sid)
    result = {"exec_true": stats_ms(execs), "fs_stat": stats_ms(stats)}
    print(fmt_stats("exec ['true'] round trip", result["exec_true"]))
    print(fmt_stats("fs.stat round trip", result["fs_stat"]))
    return result


async def _burst(s: aiohttp.ClientSession, url: str, count: int) -> dict[str, Any]:
    wait_quiet(0.3, 0.5, 60)
    t0 = time.perf_counter()

    async def one() -> tuple[float, str]:
        sid = await _create(s, url)
        return time.perf_counter() - t0, sid

    done = await asyncio.gather(*(one() for _ in range(count)))
    times = sorted(t for t, _ in done)
    await asyncio.gather(*(_delete(s, url, sid) for _, sid in done))
    return {"count": count, "all_ready_s": round(times[-1], 3), "p50_s": round(times[len(times) // 2], 3)}


async def _pss(s: aiohttp.ClientSession, gw: Gateway, count: int) -> dict[str, Any]:
    ids = [await _create(s, gw.url) for _ in range(count)]
    await asyncio.sleep(2.0)  # let the guests go idle: what is measured is a resting VM
    state = await gw.state(s)
    figures = [x["memory"] for x in state["sandboxes"] if x["id"] in ids and x.get("memory")]
    await asyncio.gather(*(_delete(s, gw.url, sid) for sid in ids))
    pss = [f["pss_bytes"] / 2**20 for f in figures]
    rss = [f["rss_bytes"] / 2**20 for f in figures]
    return {"clones": count, "measured": len(pss), "mean_pss_mb": round(sum(pss) / len(pss), 1),
            "mean_rss_mb": round(sum(rss) / len(rss), 1), "total_pss_mb": round(sum(pss), 1)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--cold", type=int, default=5)
    p.add_argument("--pss", default="10,50", help="clone counts for the PSS figure")
    args = p.parse_args()
    banner("microVM")
    results = await runtime_starts(args.n, args.cold)
    results.update(await gateway_figures(args.n, [int(x) for x in args.pss.split(",") if x]))
    clone = results["clone"]["p50_ms"]
    results["verdicts"] = {
        "clone_p50": verdict(clone, CLONE_TARGET_MS),
        "burst_10": {k: verdict(v["all_ready_s"], BURST_TARGET_S) for k, v in results.items()
                     if k.startswith("burst_10")},
        "pss": {k: verdict(v["mean_pss_mb"], PSS_TARGET_MB) for k, v in results.items() if k.startswith("pss_")},
    }
    print(f"   clone p50 {clone:.0f} ms vs <= {CLONE_TARGET_MS:.0f} ms: {results['verdicts']['clone_p50']}; "
          f"10 creates vs <= {BURST_TARGET_S} s: {results['verdicts']['burst_10']}; "
          f"PSS {results['verdicts']['pss']}")
    write_results("microvm", results)


if __name__ == "__main__":
    asyncio.run(main())
