"""Where a small exec's round trip through the gateway goes, stage by stage.

    .venv/bin/python bench/exec_breakdown.py [--n 1000]

The bench server runs with the `trace` patch (bench/_patches.py: timestamps only, no behaviour
change, ~1 us per mark): when the WebSocket handler gets the message, when the request is
written to the agent's pipe, when each agent frame is decoded, and around each WebSocket send.
The client stamps its send and the arrival of `end`. time.perf_counter is CLOCK_MONOTONIC, one
clock for both processes. Medians over `--n` msgpack execs (`code: "1"`) and pings.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp
from _common import AUTH, Gateway, banner, settings_dict, wait_quiet, write_results
from exec_latency import WsClient

EXEC_STAGES = [
    ("client send -> gateway WS handler", "t0", "ws_in"),
    ("handler -> exec.start written to the agent pipe", "ws_in", "pipe_write"),
    ("pipe write -> agent's start frame decoded", "pipe_write", "agent_start"),
    ("start decoded -> start sent on the WS", "agent_start", "ws_sent_start"),
    ("agent start -> agent end decoded (the guest runs the code)", "agent_start", "agent_end"),
    ("end decoded -> handed to aiohttp", "agent_end", "ws_out_end"),
    ("aiohttp sends end", "ws_out_end", "ws_sent_end"),
    ("end sent -> client has it", "ws_sent_end", "t1"),
]
PING_STAGES = [
    ("client send -> gateway WS handler", "t0", "ws_in"),
    ("handler -> ping written to the agent pipe", "ws_in", "pipe_write"),
    ("pipe write -> agent's reply decoded", "pipe_write", "agent_reply"),
    ("reply decoded -> handed to aiohttp", "agent_reply", "ws_out_reply"),
    ("aiohttp sends reply", "ws_out_reply", "ws_sent_reply"),
    ("reply sent -> client has it", "ws_sent_reply", "t1"),
]
CRITICAL = ["t0", "ws_in", "pipe_write", "agent_start", "agent_end", "ws_out_end", "ws_sent_end", "t1"]


def segments(marks: list[list[Any]]) -> list[dict[str, float]]:
    out: list[dict[str, float]] = []
    for label, t in marks:
        if label == "ws_in":
            out.append({})
        if out and label not in out[-1]:
            out[-1][label] = t
    return out


def breakdown(client: list[tuple[float, float]], marks: list[list[Any]], stages: list[tuple[str, str, str]]
              ) -> dict[str, Any]:
    segs = segments(marks)
    assert len(segs) == len(client), (len(segs), len(client))
    rows = []
    for seg, (t0, t1) in zip(segs, client, strict=True):
        seg["t0"], seg["t1"] = t0, t1
        rows.append(seg)
    result = {label: round(statistics.median((r[b] - r[a]) * 1000 for r in rows), 3) for label, a, b in stages}
    result["total (median of round trips)"] = round(statistics.median((r["t1"] - r["t0"]) * 1000 for r in rows), 3)
    return result


async def run(n: int) -> dict[str, Any]:
    async with Gateway(settings_dict(pool_size=0), env={"BENCH_PATCH": "trace"}) as gw, \
            aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(f"{gw.url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
            sid = (await r.json())["id"]
        async with s.ws_connect(f"{gw.url}/v1/sandboxes/{sid}/ws", protocols=("sandgate.v1.msgpack",)) as ws:
            c = WsClient(ws, binary=True)
            for _ in range(200):
                await c.exec_s()
                await c.ping_rt()
            out = {}
            for kind, stages in (("exec", EXEC_STAGES), ("ping", PING_STAGES)):
                await asyncio.to_thread(wait_quiet)
                async with s.get(f"{gw.url}/_bench/trace") as r:
                    await r.json()  # drop the warm-up marks
                client = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    await (c.exec_s() if kind == "exec" else c.ping_rt())
                    client.append((t0, time.perf_counter()))
                async with s.get(f"{gw.url}/_bench/trace") as r:
                    marks = (await r.json())["marks"]
                out[kind] = breakdown(client, marks, stages)
    return out


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    banner("exec round trip through the gateway, stage by stage (medians, ms)")
    r = await run(args.n)
    for kind in ("exec", "ping"):
        print(f"{kind}:")
        for label, value in r[kind].items():
            print(f"   {label:<62} {value:7.3f}")
    write_results("exec_breakdown", r)


if __name__ == "__main__":
    asyncio.run(main())
