"""Figure 2: small-exec and ping round trips, through the gateway and straight to the agent.

    .venv/bin/python bench/exec_latency.py [--n 2000] [--warmup 200]

Through the gateway (its own process, bench/_server.py): a WebSocket client (aiohttp) sends
`exec.start {"language": "python", "code": "1"}` and waits for that request's `end` event (start,
data "1\\n", end), over `sandgate.v1.msgpack` and `sandgate.v1.json`; and `ping` (forwarded to the
agent and answered). Also, for information: the REST exec, and the msgpack WebSocket with the
gateway in the client's own process and event loop.

Without the gateway: the launcher spawned directly (see bench/_agent.py) and spoken to with
guest_agent.wire over its pipes, from a blocking client (the floor), and from the gateway's own
asyncio AgentClient (the gateway's agent leg without HTTP/WebSocket).

Targets: small exec through the gateway p50 <= 1.5 ms, and <= 1.5x the agent's own round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import aiohttp
import msgpack
from _agent import DirectAgent, launcher_argv
from _common import (
    AUTH,
    ROOT,
    CpuPerOp,
    Gateway,
    QuietSampler,
    banner,
    fmt_stats,
    inprocess_gateway,
    settings_dict,
        verdict,
    write_results,
)

TARGET_P50_MS = 1.5
TARGET_RATIO = 1.5
EXEC = {"op": "exec.start", "language": "python", "code": "1"}


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
            if m.get("id") == rid and (m.get("ev") == "end" or "error" in m and "ev" not in m):
                return time.perf_counter() - t0, m

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


async def ws_round_trips(url: str, subprotocol: str, n: int, warmup: int, gw: Gateway | None = None
                         ) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(f"{url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
            sid = (await r.json())["id"]
        pids = {"client": os.getpid()}
        if gw is not None:
            launcher = next(x["launcher_pid"] for x in (await gw.state(s))["sandboxes"] if x["id"] == sid)
            pids.update(gateway=gw.pid, launcher=launcher)
        async with s.ws_connect(f"{url}/v1/sandboxes/{sid}/ws", protocols=(subprotocol,)) as ws:
            assert ws.protocol == subprotocol, ws.protocol
            client = WsClient(ws, binary=subprotocol.endswith("msgpack"))
            for _ in range(warmup):
                _, end = await client.exec_rt()
                assert end.get("exit_code") == 0, end
                await client.ping_rt()

            async def one_exec() -> float:
                return (await client.exec_rt())[0]

            cpu = CpuPerOp(pids)
            execs = await QuietSampler().collect(one_exec, n)
            execs["cpu_ms_per_op"] = cpu.per_op_ms(execs["all_samples"]["n"])
            cpu = CpuPerOp(pids)
            pings = await QuietSampler().collect(client.ping_rt, n)
            pings["cpu_ms_per_op"] = cpu.per_op_ms(pings["all_samples"]["n"])
        async with s.delete(f"{url}/v1/sandboxes/{sid}") as r:
            assert r.status == 204
    return {"exec": execs, "ping": pings}


async def rest_round_trips(url: str, n: int, warmup: int) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(f"{url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
            sid = (await r.json())["id"]

        async def one() -> float:
            t0 = time.perf_counter()
            async with s.post(f"{url}/v1/sandboxes/{sid}/exec", json={"language": "python", "code": "1"}) as r:
                body = await r.json()
            elapsed = time.perf_counter() - t0
            assert body["stdout"] == "1\n", body
            return elapsed

        for _ in range(warmup):
            await one()
        samples = await QuietSampler().collect(one, n)
        async with s.delete(f"{url}/v1/sandboxes/{sid}") as r:
            assert r.status == 204
    return {"exec": samples}


async def through_gateway(n: int, warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with Gateway(settings_dict(pool_size=0)) as gw:
        out["ws_msgpack"] = await ws_round_trips(gw.url, "sandgate.v1.msgpack", n, warmup, gw)
        out["ws_json"] = await ws_round_trips(gw.url, "sandgate.v1.json", n, warmup, gw)
        out["rest"] = await rest_round_trips(gw.url, max(n // 4, 100), warmup)
    return out


async def inprocess(n: int, warmup: int) -> dict[str, Any]:
    async with inprocess_gateway(settings_dict(pool_size=0)) as (_, url):
        return {"ws_msgpack": await ws_round_trips(url, "sandgate.v1.msgpack", n, warmup)}


def direct_sync(n: int, warmup: int) -> dict[str, Any]:
    with DirectAgent() as agent:
        hello = agent.request("hello", version=1)
        assert "result" in hello, hello
        for _ in range(warmup):
            assert agent.exec_python("1").get("exit_code") == 0
            agent.request("ping")

        def one_exec() -> float:
            t0 = time.perf_counter()
            agent.exec_python("1")
            return time.perf_counter() - t0

        def one_ping() -> float:
            t0 = time.perf_counter()
            agent.request("ping")
            return time.perf_counter() - t0

        pids = {"client": os.getpid(), "launcher": agent.proc.pid}
        cpu = CpuPerOp(pids)
        execs = QuietSampler().collect_sync(one_exec, n)
        execs["cpu_ms_per_op"] = cpu.per_op_ms(execs["all_samples"]["n"])
        cpu = CpuPerOp(pids)
        pings = QuietSampler().collect_sync(one_ping, n)
        pings["cpu_ms_per_op"] = cpu.per_op_ms(pings["all_samples"]["n"])
    return {"argv": agent.argv, "exec": execs, "ping": pings}


async def direct_agent_client(n: int, warmup: int) -> dict[str, Any]:
    """The gateway's AgentClient (asyncio, StreamChannel over the pipes) straight to a launcher."""
    from gateway.runtime.agent_client import AgentClient
    from gateway.runtime.base import StreamChannel

    work = tempfile.mkdtemp(prefix="sandgate-bench-")
    proc = await asyncio.create_subprocess_exec(*launcher_argv(work), stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stdin is not None
    client = AgentClient(StreamChannel(proc.stdout, proc.stdin))
    try:
        await client.start()

        async def one_exec(i: int) -> float:
            t0 = time.perf_counter()
            async for event in await client.stream("exec.start", exec_id=f"a{i}", language="python", code="1"):
                if event["ev"] == "end":
                    break
            return time.perf_counter() - t0

        async def one_ping() -> float:
            t0 = time.perf_counter()
            await client.request("ping")
            return time.perf_counter() - t0

        counter = iter(range(1 << 30))

        async def next_exec() -> float:
            return await one_exec(next(counter))

        for _ in range(warmup):
            await next_exec()
            await one_ping()
        execs = await QuietSampler().collect(next_exec, n)
        pings = await QuietSampler().collect(one_ping, n)
    finally:
        await client.close()
        await proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return {"exec": execs, "ping": pings}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    args = p.parse_args()
    n, warmup = args.n, args.warmup
    banner("exec and ping round trips")

    gw = await through_gateway(n, warmup)
    for name in ("ws_msgpack", "ws_json"):
        print(fmt_stats(f"gateway WS {name[3:]}: exec '1'", gw[name]["exec"]))
        print(f"{'':<47}CPU per exec, ms: {gw[name]['exec']['cpu_ms_per_op']}")
        print(fmt_stats(f"gateway WS {name[3:]}: ping", gw[name]["ping"]))
        print(f"{'':<47}CPU per ping, ms: {gw[name]['ping']['cpu_ms_per_op']}")
    print(fmt_stats("gateway REST: POST .../exec '1'", gw["rest"]["exec"]))

    direct = await asyncio.to_thread(direct_sync, n, warmup)
    print(fmt_stats("agent direct (blocking pipes): exec '1'", direct["exec"]))
    print(f"{'':<47}CPU per exec, ms: {direct['exec']['cpu_ms_per_op']}")
    print(fmt_stats("agent direct (blocking pipes): ping", direct["ping"]))
    print(f"{'':<47}CPU per ping, ms: {direct['ping']['cpu_ms_per_op']}")
    via_client = await direct_agent_client(n, warmup)
    print(fmt_stats("agent via gateway AgentClient: exec '1'", via_client["exec"]))
    print(fmt_stats("agent via gateway AgentClient: ping", via_client["ping"]))
    inproc = await inprocess(n, warmup)
    print(fmt_stats("in-process gateway WS msgpack: exec '1'", inproc["ws_msgpack"]["exec"]))
    print(fmt_stats("in-process gateway WS msgpack: ping", inproc["ws_msgpack"]["ping"]))

    verdicts = {}
    for name in ("ws_msgpack", "ws_json"):
        p50 = gw[name]["exec"]["p50_ms"]
        ratio = p50 / direct["exec"]["p50_ms"]
        verdicts[name] = {
            "exec_p50_ms": p50, "target_p50_ms": TARGET_P50_MS, "p50_verdict": verdict(p50, TARGET_P50_MS),
            "ratio_to_agent": round(ratio, 2), "target_ratio": TARGET_RATIO,
            "ratio_verdict": verdict(ratio, TARGET_RATIO),
        }
        print(f"   {name}: exec p50 {p50:.3f} ms vs <= {TARGET_P50_MS} ms: {verdicts[name]['p50_verdict']}; "
              f"{ratio:.2f}x the agent's own ({direct['exec']['p50_ms']:.3f} ms) vs <= {TARGET_RATIO}x: "
              f"{verdicts[name]['ratio_verdict']}")
    write_results("exec_latency", {"gateway": gw, "agent_direct": direct, "agent_via_agentclient": via_client,
                                   "inprocess_gateway": inproc, "verdicts": verdicts})


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
