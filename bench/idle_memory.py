"""Figure 4: memory per idle sandbox.

    .venv/bin/python bench/idle_memory.py [--n 20] [--settle 3]

Creates `--n` WASM sandboxes (pool_size 0, so every one is a fresh launcher), waits `--settle`
seconds, and reads /proc/PID/smaps_rollup of each launcher (pid from the gateway:
app[MANAGER].get(tenant, id).backend.launcher.proc.pid, through the bench server's
/_bench/state): private = Private_Clean + Private_Dirty, Pss, Rss. Again after one small exec
in each sandbox. Also the gateway's own growth, and where one launcher's memory goes (by mapping,
from /proc/PID/smaps). Target: <= 25 MB private per idle sandbox (MB = 2^20 B here, as /proc counts).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections import defaultdict
from typing import Any

import aiohttp
from _common import AUTH, Gateway, banner, measured, proc_memory_mb, settings_dict, verdict, write_results

TARGET_PRIVATE_MB = 25.0


def smaps_breakdown(pid: int, top: int = 12) -> list[dict[str, Any]]:
    """One process's memory by mapping name (anonymous mappings together), largest private first."""
    acc: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    name = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and not head[0].endswith(":"):
                path = head[5] if len(head) > 5 else "[anon]"
                if path.endswith(".cwasm"):
                    path = "python module (.cwasm, mapped)"
                elif ".so" in path:
                    path = path.rsplit("/", 1)[-1]
                elif path.startswith("/") and "python3" in path:
                    path = "python executable"
                name = path
                acc[name]["mappings"] += 1
                continue
            key = head[0].rstrip(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous", "Swap"):
                acc[name][key] += int(head[1])
    rows: list[dict[str, Any]] = [
        {"mapping": k, "private_kb": v["Private_Clean"] + v["Private_Dirty"], "pss_kb": v["Pss"],
         "rss_kb": v["Rss"], "anonymous_kb": v["Anonymous"], "mappings": v["mappings"]} for k, v in acc.items()]
    rows.sort(key=lambda r: -r["private_kb"])
    return rows[:top]


def summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for key in ("private_mb", "private_dirty_mb", "pss_mb", "rss_mb"):
        values = [r[key] for r in rows]
        out[f"mean_{key}"] = round(statistics.mean(values), 2)
        out[f"max_{key}"] = round(max(values), 2)
    return out


async def run(n: int, settle: float) -> dict[str, Any]:
    async with Gateway(settings_dict(pool_size=0)) as gw, aiohttp.ClientSession(headers=AUTH) as s:
        gw_before = proc_memory_mb(gw.pid)
        ids = []
        for _ in range(n):
            async with s.post(f"{gw.url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
                assert r.status == 201
                ids.append((await r.json())["id"])
        await asyncio.sleep(settle)
        state = await gw.state(s)
        pids = [x["launcher_pid"] for x in state["sandboxes"]]
        idle = [proc_memory_mb(pid) for pid in pids]
        gw_after = proc_memory_mb(gw.pid)
        breakdown = smaps_breakdown(pids[0])
        for sid in ids:
            async with s.post(f"{gw.url}/v1/sandboxes/{sid}/exec", json={"language": "python", "code": "1"}) as r:
                assert (await r.json())["stdout"] == "1\n"
        await asyncio.sleep(settle)
        after_exec = [proc_memory_mb(pid) for pid in pids]
        breakdown_exec = smaps_breakdown(pids[0])
        gw_after_exec = proc_memory_mb(gw.pid)
    return {
        "n": n, "settle_s": settle,
        "idle": summary(idle), "after_one_exec": summary(after_exec),
        "per_sandbox_idle": idle,
        "gateway_before": gw_before, "gateway_with_sandboxes": gw_after, "gateway_after_execs": gw_after_exec,
        "gateway_private_growth_per_sandbox_mb": round((gw_after["private_mb"] - gw_before["private_mb"]) / n, 3),
        "launcher_breakdown_idle": breakdown, "launcher_breakdown_after_exec": breakdown_exec,
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--settle", type=float, default=3.0)
    args = p.parse_args()
    banner(f"idle memory, {args.n} sandboxes")
    r = await measured("idle memory", lambda: run(args.n, args.settle), tries=1)
    for label, key in (("idle (after create)", "idle"), ("after one small exec", "after_one_exec")):
        x = r[key]
        print(f"{label:<24} private mean {x['mean_private_mb']:6.2f} MB (max {x['max_private_mb']:.2f}; "
              f"dirty {x['mean_private_dirty_mb']:.2f})  PSS mean {x['mean_pss_mb']:6.2f} MB  "
              f"RSS mean {x['mean_rss_mb']:6.2f} MB")
    print(f"gateway: private {r['gateway_before']['private_mb']} -> {r['gateway_with_sandboxes']['private_mb']} MB "
          f"with {args.n} sandboxes ({r['gateway_private_growth_per_sandbox_mb']} MB each)")
    print("one idle launcher, by mapping (kB):")
    for row in r["launcher_breakdown_idle"][:8]:
        print(f"   {row['mapping'][:48]:<48} private {row['private_kb']:>7}  pss {row['pss_kb']:>7}  "
              f"rss {row['rss_kb']:>7}")
    mean = r["idle"]["mean_private_mb"]
    r["verdict"] = {"mean_private_mb": mean, "target_private_mb": TARGET_PRIVATE_MB,
                    "verdict": verdict(mean, TARGET_PRIVATE_MB)}
    print(f"   idle private {mean:.2f} MB vs <= {TARGET_PRIVATE_MB:.0f} MB: {r['verdict']['verdict']}")
    write_results("idle_memory", r)


if __name__ == "__main__":
    asyncio.run(main())
