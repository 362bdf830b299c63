"""Figure 2: small-exec and ping round trips, through the gateway and straight to the agent.

    .venv/bin/python bench/exec_latency.py [--n 2000] [--warmup 200] [--chunk 50]

Through the gateway (its own process, bench/_server.py): a WebSocket client (aiohttp) sends
`exec.start {"language": "python", "code": "1"}` and waits for that request's `end` event (start,
data "1\\n", end), over `sandgate.v1.msgpack` and `sandgate.v1.json`; and `ping` (forwarded to the
agent, answered by it). For information: the REST exec, and the msgpack WebSocket with the gateway
in the client's own process and event loop.

Without the gateway: the launcher spawned directly (bench/_agent.py) and spoken to with
guest_agent.wire over its pipes, from a blocking client (the agent's own round trip), and from the
gateway's asyncio AgentClient (the gateway's agent leg without HTTP/WebSocket).

Both are also measured with 1 ms of client think time before each request (the agent's round trip
depends on how long it idled before the request: back-to-back it is fastest).

All variants stay open side by side and are measured in alternating chunks (`--chunk` samples
each), so the ratio gateway/agent compares like with like on this shared VM; chunks during which
other processes used > 0.1 cores count only in "all samples". CPU per op of each process is read
from /proc/PID/stat.

Targets: small exec through the gateway p50 <= 1.5 ms, and <= 1.5x the agent's own round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgpack
from _agent import DirectAgent, launcher_argv
from _common import (
    AUTH,
    ROOT,
    Gateway,
    banner,
    fmt_stats,
    inprocess_gateway,
    interleaved,
    settings_dict,
    verdict,
    write_results,
)

TARGET_P50_MS = 1.5
TARGET_RATIO = 1.5
EXEC = {"op": "exec.start", "language": "python", "code": "1"}
One = Callable[[], Awaitable[float]]


class WsClient:
    """A sandgate WebSocket client (aiohttp) for one subprotocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self.next_id = 1

    async def send(self, message: dict[str, Any]) -> None:
        if self.binary:
            await self.ws.send_bytes(msgpack.packb(message, use_bin_type=True))
        else:
            await self.ws.send_str(json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        msg = await self.ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return dict(msgpack.unpackb(msg.data, raw=False))
        if msg.type == aiohttp.WSMsgType.TEXT:
            return dict(json.loads(msg.data))
        raise RuntimeError(f"websocket: {msg.type} {msg.data!r} {msg.extra!r}")

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def exec_rt(self, body: dict[str, Any] = EXEC) -> tuple[float, dict[str, Any]]:
        rid = self.new_id()
        t0 = time.perf_counter()
        await self.send({"id": rid, **body})
        while True:
            m = await self.receive()
            if m.get("id") == rid and (m.get("ev") == "end" or ("error" in m and "ev" not in m)):
                return time.perf_counter() - t0, m

    async def exec_s(self) -> float:
        elapsed, end = await self.exec_rt()
        assert end.get("exit_code") == 0, end
        return elapsed

    async def ping_rt(self) -> float:
        rid = self.new_id()
        t0 = time.perf_counter()
        await self.send({"id": rid, "op": "ping"})
        while True:
            m = await self.receive()
            if m.get("id") == rid:
                elapsed = time.perf_counter() - t0
                assert "result" in m, m
                return elapsed


@contextlib.asynccontextmanager
async def gateway_variants(url: str, s: aiohttp.ClientSession, prefix: str, gw: Gateway | None
                           ) -> AsyncIterator[tuple[dict[str, One], dict[str, dict[str, int]]]]:
    """One sandbox, a msgpack and a JSON WebSocket session on it, and the REST exec."""
    async with s.post(f"{url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
        sid = (await r.json())["id"]
    pids = {"client": os.getpid()}
    if gw is not None:
        launcher = next(x["launcher_pid"] for x in (await gw.state(s))["sandboxes"] if x["id"] == sid)
        pids.update(gateway=gw.pid, launcher=launcher)
    async with s.ws_connect(f"{url}/v1/sandboxes/{sid}/ws", protocols=("sandgate.v1.msgpack",)) as wm, \
            s.ws_connect(f"{url}/v1/sandboxes/{sid}/ws", protocols=("sandgate.v1.json",)) as wj:
        assert wm.protocol == "sandgate.v1.msgpack" and wj.protocol == "sandgate.v1.json"
        m, j = WsClient(wm, binary=True), WsClient(wj, binary=False)

        async def rest() -> float:
            t0 = time.perf_counter()
            async with s.post(f"{url}/v1/sandboxes/{sid}/exec", json={"language": "python", "code": "1"}) as r:
                body = await r.json()
            elapsed = time.perf_counter() - t0
            assert body["stdout"] == "1\n", body
            return elapsed

        variants: dict[str, One] = {f"{prefix}ws_msgpack_exec": m.exec_s, f"{prefix}ws_msgpack_ping": m.ping_rt}
        if gw is not None:
            variants.update({"ws_json_exec": j.exec_s, "ws_json_ping": j.ping_rt, "rest_exec": rest})
        yield variants, {name: pids for name in variants}
    async with s.delete(f"{url}/v1/sandboxes/{sid}") as r:
        assert r.status == 204


@contextlib.asynccontextmanager
async def agent_client_variants() -> AsyncIterator[dict[str, One]]:
    """The gateway's AgentClient (asyncio, StreamChannel over the pipes) straight to a launcher."""
    from gateway.runtime.agent_client import AgentClient
    from gateway.runtime.base import StreamChannel

    work = tempfile.mkdtemp(prefix="sandgate-bench-")
    proc = await asyncio.create_subprocess_exec(*launcher_argv(work), stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stdin is not None
    client = AgentClient(StreamChannel(proc.stdout, proc.stdin))
    counter = iter(range(1 << 30))
    try:
        await client.start()

        async def one_exec() -> float:
            t0 = time.perf_counter()
            async for event in await client.stream("exec.start", exec_id=f"a{next(counter)}", language="python",
                                                   code="1"):
                if event["ev"] == "end":
                    break
            return time.perf_counter() - t0

        async def one_ping() -> float:
            t0 = time.perf_counter()
            await client.request("ping")
            return time.perf_counter() - t0

        yield {"agentclient_exec": one_exec, "agentclient_ping": one_ping}
    finally:
        await client.close()
        await proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def direct_variants(agent: DirectAgent) -> dict[str, One]:
    """The blocking client: it blocks this event loop while it measures, which is fine, since
    nothing else is being measured meanwhile."""

    async def one_exec() -> float:
        t0 = time.perf_counter()
        end = agent.exec_python("1")
        elapsed = time.perf_counter() - t0
        assert end.get("exit_code") == 0, end
        return elapsed

    async def one_ping() -> float:
        t0 = time.perf_counter()
        agent.request("ping")
        return time.perf_counter() - t0

    return {"direct_exec": one_exec, "direct_ping": one_ping}


LABELS = {
    "ws_msgpack_exec": "gateway WS msgpack: exec '1'",
    "ws_msgpack_ping": "gateway WS msgpack: ping",
    "ws_json_exec": "gateway WS json: exec '1'",
    "ws_json_ping": "gateway WS json: ping",
    "rest_exec": "gateway REST: POST .../exec '1'",
    "direct_exec": "agent direct (blocking pipes): exec '1'",
    "direct_ping": "agent direct (blocking pipes): ping",
    "agentclient_exec": "agent via gateway AgentClient: exec '1'",
    "agentclient_ping": "agent via gateway AgentClient: ping",
    "inproc_ws_msgpack_exec": "in-process gateway, WS msgpack: exec '1'",
    "inproc_ws_msgpack_ping": "in-process gateway, WS msgpack: ping",
    "think_ws_msgpack_exec": "1 ms think time: gateway WS msgpack exec",
    "think_direct_exec": "1 ms think time: agent direct exec",
}
THINK_S = 0.001


def with_think_time(one: One) -> One:
    """The client idles THINK_S (time.sleep, off the clock) before each request, as an
    interactive client would; the agent's vCPU then idles too, and wakes slower."""

    async def thinking() -> float:
        time.sleep(THINK_S)  # noqa: ASYNC251 (deliberate: the whole client idles)
        return await one()

    return thinking


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--chunk", type=int, default=50)
    args = p.parse_args()
    banner("exec and ping round trips")

    async with Gateway(settings_dict(pool_size=0)) as gw, \
            inprocess_gateway(settings_dict(pool_size=0)) as (_, inproc_url), \
            aiohttp.ClientSession(headers=AUTH) as s, \
            gateway_variants(gw.url, s, "", gw) as (gw_variants, gw_pids), \
            gateway_variants(inproc_url, s, "inproc_", None) as (inproc_variants, _), \
            agent_client_variants() as ac_variants:
        with DirectAgent() as agent:
            assert "result" in agent.request("hello", version=1)
            direct = direct_variants(agent)
            variants = {**gw_variants, **direct, **ac_variants, **inproc_variants,
                        "think_ws_msgpack_exec": with_think_time(gw_variants["ws_msgpack_exec"]),
                        "think_direct_exec": with_think_time(direct["direct_exec"])}
            pids = {**gw_pids, "direct_exec": {"client": os.getpid(), "launcher": agent.proc.pid},
                    "direct_ping": {"client": os.getpid(), "launcher": agent.proc.pid}}
            for one in variants.values():  # warm every path
                for _ in range(args.warmup):
                    await one()
            results: dict[str, Any] = await interleaved(variants, args.n, chunk=args.chunk, cpu_pids=pids)
            argv = agent.argv

    for name, label in LABELS.items():
        print(fmt_stats(label, results[name]))
        if "cpu_ms_per_op" in results[name]:
            print(f"{'':<47}CPU per op, ms: {results[name]['cpu_ms_per_op']}")

    verdicts = {}
    direct = results["direct_exec"]["p50_ms"]
    for name in ("ws_msgpack_exec", "ws_json_exec"):
        p50 = results[name]["p50_ms"]
        ratio = p50 / direct
        verdicts[name] = {
            "exec_p50_ms": p50, "target_p50_ms": TARGET_P50_MS, "p50_verdict": verdict(p50, TARGET_P50_MS),
            "agent_exec_p50_ms": direct, "ratio_to_agent": round(ratio, 2), "target_ratio": TARGET_RATIO,
            "ratio_verdict": verdict(ratio, TARGET_RATIO),
        }
        print(f"   {name}: p50 {p50:.3f} ms vs <= {TARGET_P50_MS} ms: {verdicts[name]['p50_verdict']}; "
              f"{ratio:.2f}x the agent's own ({direct:.3f} ms) vs <= {TARGET_RATIO}x: "
              f"{verdicts[name]['ratio_verdict']}")
    think = results["think_ws_msgpack_exec"]["p50_ms"] / results["think_direct_exec"]["p50_ms"]
    verdicts["with_think_time"] = {"think_ms": THINK_S * 1000, "ratio_to_agent": round(think, 2)}
    print(f"   (with {THINK_S * 1000:g} ms of client think time before each request: gateway "
          f"{results['think_ws_msgpack_exec']['p50_ms']:.3f} ms vs agent "
          f"{results['think_direct_exec']['p50_ms']:.3f} ms = {think:.2f}x; informative, the verdicts use the "
          "back-to-back figures)")
    write_results("exec_latency", {"results": results, "agent_argv": argv, "verdicts": verdicts,
                                   "n": args.n, "warmup": args.warmup, "chunk": args.chunk})


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
