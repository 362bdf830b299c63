"""Event-loop fairness: another tenant's small-exec latency while 3 sandboxes flood the gateway.

    .venv/bin/python bench/flood_fairness.py [--execs 60] [--lines 300000] [--chunks 4096]

One real gateway (bench/_server.py, WASM runtime, no warm pool) in its own process. A victim
sandbox runs small REST execs (`POST .../exec {"code": "1"}`) one after the other and the bench
takes each one's round trip; first with the gateway idle, then while 3 other sandboxes each run one
exec that floods the gateway:

- `tiny`: `print(i)` for `--lines` lines: one tiny data frame per line (the issue's attack);
- `big`: `--chunks` writes of 64 KiB (the largest data event the protocol allows);
- `cpu`: a control with no output: the 3 sandboxes spin for as long as the tiny flood took, so
  what the guests' own CPU use costs the victim (2 cores shared) is seen apart from the gateway's.

The floods run as REST execs (their output is capped per stream, the rest counted and dropped).
Target (issue 9): the victim's p50 and p99 during a flood within 2x of idle.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
from _common import AUTH, Gateway, banner, fmt_stats, proc_memory_mb, settings_dict, stats_ms, write_results

FLOODERS = 3


def tiny_code(lines: int) -> str:
    return f"for i in range({lines}):\n    print(i)\n"


def big_code(chunks: int) -> str:
    return f"import sys\nblock = 'x' * 65536\nfor _ in range({chunks}):\n    sys.stdout.write(block)\n"


def spin_code(seconds: float) -> str:
    return f"import time\nend = time.monotonic() + {seconds:.3f}\nwhile time.monotonic() < end:\n    pass\n"


async def run(execs: int, lines: int, chunks: int, limits: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"flooders": FLOODERS, "lines": lines, "chunks_64k": chunks, "victim_execs": execs,
                           "limits": limits}
    settings = settings_dict(pool_size=0, limits={"exec_timeout_s": 600.0, **limits})
    async with Gateway(settings) as gw, aiohttp.ClientSession(
            headers=AUTH, timeout=aiohttp.ClientTimeout(total=900)) as s:

        async def create() -> str:
            async with s.post(f"{gw.url}/v1/sandboxes", json={"runtime": "wasm", "cpu_seconds": 3600}) as r:
                assert r.status == 201, await r.text()
                return str((await r.json())["id"])

        async def run_exec(sid: str, code: str) -> dict[str, Any]:
            async with s.post(f"{gw.url}/v1/sandboxes/{sid}/exec", json={"code": code, "timeout": 600}) as r:
                return dict(await r.json())

        victim = await create()
        flooders = [await create() for _ in range(FLOODERS)]
        for sid in (victim, *flooders):  # warm each interpreter once
            await run_exec(sid, "1")

        async def victim_once() -> float:
            t0 = time.perf_counter()
            done = await run_exec(victim, "1")
            assert done.get("exit_code") == 0, done
            return time.perf_counter() - t0

        idle = [await victim_once() for _ in range(execs)]
        out["idle"] = stats_ms(idle)
        print(fmt_stats("victim exec, gateway idle", out["idle"]))

        async def during(name: str, code: str) -> float:
            """Victim execs while the flooders run `code`; returns how long the flood took."""
            t0 = time.perf_counter()
            floods = [asyncio.ensure_future(run_exec(sid, code)) for sid in flooders]
            samples: list[float] = []
            while not all(f.done() for f in floods) or len(samples) < 5:
                samples.append(await victim_once())
            results = await asyncio.gather(*floods)
            took = time.perf_counter() - t0
            errors = [r.get("error") for r in results if r.get("error")]
            out[name] = {**stats_ms(samples), "flood_s": round(took, 3), "flood_errors": errors,
                         "flood_dropped_bytes": [r.get("dropped_bytes") for r in results],
                         "gateway_memory_after": proc_memory_mb(gw.pid)}
            ratio = out[name]["p50_ms"] / out["idle"]["p50_ms"], out[name]["p99_ms"] / out["idle"]["p99_ms"]
            out[name]["p50_vs_idle"], out[name]["p99_vs_idle"] = round(ratio[0], 2), round(ratio[1], 2)
            print(fmt_stats(f"victim exec, {name} flood ({took:.1f} s)", out[name])
                  + f"\n{'':<44}   p50 {ratio[0]:.2f}x idle, p99 {ratio[1]:.2f}x idle"
                  + (f"; flood errors: {errors}" if errors else ""))
            return took

        tiny_s = await during("tiny", tiny_code(lines))
        await during("big", big_code(chunks))
        await during("cpu", spin_code(tiny_s))
        out["gateway_memory_end"] = proc_memory_mb(gw.pid)
    return out


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--execs", type=int, default=60, help="victim execs with the gateway idle")
    p.add_argument("--lines", type=int, default=300_000, help="tiny frames per flooder")
    p.add_argument("--chunks", type=int, default=4096, help="64 KiB chunks per flooder (4096: 256 MiB)")
    p.add_argument("--turn-events", type=int, default=None, help="[limits] agent_turn_events (default: the gateway's)")
    p.add_argument("--name", default="flood_fairness", help="results file name (bench/results/<name>.json)")
    args = p.parse_args()
    banner(f"fairness: a victim's small execs while {FLOODERS} sandboxes flood the gateway")
    limits = {} if args.turn_events is None else {"agent_turn_events": args.turn_events}
    result = await run(args.execs, args.lines, args.chunks, limits)
    write_results(args.name, result)


if __name__ == "__main__":
    asyncio.run(main())
