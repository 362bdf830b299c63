"""Serverless figures (issue 10): deployed-function invokes warm, cold and 10 at once, ephemeral
`/v1/invoke`, and whether the guest's compiled-code cache helps repeated sandbox invokes.

    .venv/bin/python bench/functions.py [--n 1000] [--cold 20] [--bursts 20] [--ephemeral 50]
                                        [--code-n 200] [--stages-n 500] [--microvm-n 100]
                                        [--only warm,stages,cold,burst,ephemeral,code,microvm]

Each part runs against a real gateway in its own process (bench/_server.py) and measures with an
aiohttp client, on the WASM runtime unless said otherwise:

(a) `warm`: `POST /v1/functions/add/invoke` on a function whose one instance is loaded (the first
    call made it; every measured reply must say `cold: false`), back to back, in alternating
    chunks with a REST exec of `1` in a sandbox of the same gateway (the plainest round trip, for
    reference); CPU per call of the gateway, the client and the sandbox's launcher. Target p50
    and p99 <= 3 ms.
(a') `stages`: where a warm invoke's time goes, from timestamps the bench server takes
    (bench/_patches.py `trace_invoke`) at the registry, at every pipe write to the agent and at
    every agent event; medians.
(b) `cold`: the first call of a newly deployed function (`PUT /v1/functions/cold-N`, then the
    timed `POST .../invoke`, which must say `cold: true`): the call creates the instance, loads
    the module and calls it. With the warm pool full before each sample (the instance's sandbox is
    a pooled launcher: the usual case, the WASM pool_size defaults to 2) and with pool_size 0 (the
    launcher starts for the call). Target p50 <= 250 ms.
(c) `burst`: a function with max_instances 10, 10 invokes sent at once; the first burst makes the
    10 instances (cold), the next `--bursts` find them warm. Latency of every call, wall time of
    each burst, and the distinct instances that served them.
(d) `ephemeral`: `POST /v1/invoke` (a fresh sandbox from the warm pool for one call, destroyed
    before the reply), with the pool refilled before each sample; no sandbox may be left.
(e) `code`: `POST /v1/sandboxes/{id}/invoke` repeated in one sandbox, with a small module (3
    lines) and a large one (~1500 lines), each sent either unchanged every time (the guest's
    compiled-code cache hits: guest_agent/invoke.py `compiled()`) or with a unique trailing
    comment (new text: compiled afresh every call). The four variants are measured in
    alternating chunks; also the guest's own `duration_ms`.
(f) `microvm`: (a) on the microVM runtime, alone in its gateway, when it runs here (else skipped
    with the reason, e.g. no image built for this tree: `sandgate images build microvm`).

Latency samples are taken in chunks; a chunk during which other processes used more than
`--threshold` cores counts only in "all samples" (the machine is shared with other test runs).
Results: bench/results/functions.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time
from typing import Any

import aiohttp
from _common import (
    AUTH,
    Gateway,
    QuietSampler,
    banner,
    fmt_stats,
    interleaved,
    settings_dict,
    stats_ms,
    verdict,
    wait_quiet,
    write_results,
)

WARM_TARGET_MS = 3.0
COLD_TARGET_MS = 250.0
#: The longest a burst or the stage trace waits for the rest of the machine to be quiet.
QUIET_WAIT_S = 60.0
ADD = "def add(a, b=0):\n    return a + b\n"
PARTS = ("warm", "stages", "cold", "burst", "ephemeral", "code", "microvm")


def large_module(functions: int = 150) -> str:
    """A module of ~10 lines per function (~1500 lines): what a real handler with helpers is like."""
    out = ['"""A generated module, large enough that compiling it is measurable."""', "import math", ""]
    for i in range(functions):
        out += [f"def helper_{i}(values, scale={i + 1}):",
                f"    '''Helper {i}: a weighted sum with a branch and a comprehension.'''",
                "    total = 0.0",
                "    for index, value in enumerate(values):",
                f"        if index % {i % 7 + 2} == 0:",
                "            total += math.sqrt(abs(value)) * scale",
                "        else:",
                "            total -= value / (index + 1)",
                f"    return {{'name': 'helper_{i}', 'total': total, 'squares': [v * v for v in values[:3]]}}",
                ""]
    out += ["def add(a, b=0):", "    return a + b", ""]
    return "\n".join(out)


class Client:
    """The bench's REST client for one gateway."""

    def __init__(self, gw: Gateway, session: aiohttp.ClientSession) -> None:
        self.gw, self.s, self.url = gw, session, gw.url

    async def call(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        async with self.s.request(method, f"{self.url}{path}", json=body) as r:
            data = await r.json() if r.content_type == "application/json" else None
            if r.status != status:
                raise RuntimeError(f"{method} {path} answered {r.status}: {data}")
            return data

    async def timed(self, path: str, body: Any) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        async with self.s.post(f"{self.url}{path}", json=body) as r:
            data = await r.json()
        elapsed = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"POST {path} answered {r.status}: {data}")
        return elapsed, data

    async def deploy(self, name: str, **spec: Any) -> dict[str, Any]:
        async with self.s.put(f"{self.url}/v1/functions/{name}", json={"runtime": "wasm", **spec}) as r:
            data = await r.json()
            if r.status not in (200, 201):
                raise RuntimeError(f"deploy {name} answered {r.status}: {data}")
            return dict(data)

    async def launcher_of(self, sandbox_id: str) -> int | None:
        state = await self.gw.state(self.s)
        return next((x["launcher_pid"] for x in state["sandboxes"] if x["id"] == sandbox_id), None)


def expect(reply: dict[str, Any], result: Any, cold: bool | None = None) -> None:
    if reply.get("status") != "success" or reply.get("result") != result:
        raise RuntimeError(f"unexpected reply: {reply}")
    if cold is not None and reply.get("cold") is not cold:
        raise RuntimeError(f"expected cold={cold}: {reply}")


# -- (a) and (f): warm deployed invokes ---------------------------------------------------------------


async def warm_invokes(c: Client, runtime: str, n: int, warmup: int, threshold: float,
                       chunk: int) -> dict[str, Any]:
    """Warm invokes, and for reference the REST exec of `1` in a sandbox of the same runtime,
    measured in alternating chunks (the invoke's cost over the plainest round trip)."""
    await c.deploy(f"add-{runtime}", runtime=runtime, code=ADD, function="add")
    path = f"/v1/functions/add-{runtime}/invoke"
    first_s, first = await c.timed(path, {"args": [1], "kwargs": {"b": 2}})
    expect(first, 3, cold=True)
    sid = (await c.call("POST", "/v1/sandboxes", {"runtime": runtime}, status=201))["id"]
    durations: list[float] = []

    async def invoke() -> float:
        elapsed, reply = await c.timed(path, {"args": [1], "kwargs": {"b": 2}})
        expect(reply, 3, cold=False)
        if reply["instance"] != first["instance"]:
            raise RuntimeError("a warm call moved to another instance")
        durations.append(reply["duration_ms"] / 1000)
        return elapsed

    async def rest_exec() -> float:
        elapsed, reply = await c.timed(f"/v1/sandboxes/{sid}/exec", {"language": "python", "code": "1"})
        if reply.get("stdout") != "1\n":
            raise RuntimeError(f"unexpected exec reply: {reply}")
        return elapsed

    for _ in range(warmup):
        await invoke()
        await rest_exec()
    durations.clear()
    pids: dict[str, dict[str, int]] = {}
    for name, sandbox in (("invoke", first["instance"]), ("rest_exec", sid)):
        pids[name] = {"gateway": c.gw.pid, "client": os.getpid()}
        launcher = await c.launcher_of(sandbox)
        if launcher is not None:
            pids[name]["launcher"] = launcher
    results = await interleaved({"invoke": invoke, "rest_exec": rest_exec}, n, chunk=chunk,
                                threshold_cores=threshold, cpu_pids=pids)
    result = results["invoke"]
    result["guest_duration"] = stats_ms(durations)
    result["first_call_ms"] = round(first_s * 1000, 2)
    result["reference_rest_exec"] = results["rest_exec"]
    await c.call("DELETE", f"/v1/sandboxes/{sid}", status=204)
    await c.call("DELETE", f"/v1/functions/add-{runtime}", status=204)
    return result


# -- (b) cold: the first call of a new function ---------------------------------------------------


async def cold_invokes(n: int, pool: int, threshold: float) -> dict[str, Any]:
    settle = 0.3
    async with Gateway(settings_dict(pool_size=pool)) as gw, aiohttp.ClientSession(headers=AUTH) as s:
        c = Client(gw, s)
        if pool:
            await gw.wait_pool(s, pool, settle_s=1.0)
        counter = itertools.count()
        names: list[str] = []
        guest: list[float] = []

        async def before() -> None:
            if names:
                await c.call("DELETE", f"/v1/functions/{names.pop()}", status=204)
            if pool:
                await gw.wait_pool(s, pool, settle_s=settle)
            name = f"cold-{next(counter)}"
            await c.deploy(name, code=ADD, function="add")
            names.append(name)

        async def one() -> float:
            elapsed, reply = await c.timed(f"/v1/functions/{names[-1]}/invoke", {"args": [2, 3]})
            expect(reply, 5, cold=True)
            guest.append(reply["duration_ms"] / 1000)
            return elapsed

        result = await QuietSampler(threshold_cores=threshold, chunk_s=0.1).collect(one, n, between=before)
        result["guest_duration"] = stats_ms(guest)
        result["pool_size"] = pool
    return result


# -- (c) 10 at once --------------------------------------------------------------------------------


async def burst(c: Client, bursts: int, cold_bursts: int, pool: int) -> dict[str, Any]:
    """`cold_bursts` times: a new function (max_instances 10) and 10 calls at once, which make its
    10 instances (the pool full before each); then `bursts` warm bursts on the last one."""

    async def fire(name: str) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(c.timed(f"/v1/functions/{name}/invoke", {"args": [i, 1]}) for i in range(10)))
        for i, (_, reply) in enumerate(done):
            expect(reply, i + 1)
        return time.perf_counter() - t0, done

    cold_walls, cold_samples, cold_distinct, cold_calls, listed = [], [], [], 0, []
    for k in range(cold_bursts):
        name = f"burst-{k}"
        if k:
            await c.call("DELETE", f"/v1/functions/burst-{k - 1}", status=204)
        await c.deploy(name, code=ADD, function="add", max_instances=10)
        await c.gw.wait_pool(c.s, pool, settle_s=0.3)
        await asyncio.to_thread(wait_quiet, max_wait_s=QUIET_WAIT_S)
        wall, done = await fire(name)
        cold_walls.append(wall)
        cold_samples += [e for e, _ in done]
        cold_distinct.append(len({r["instance"] for _, r in done}))
        cold_calls += sum(r["cold"] for _, r in done)
        listed.append(len((await c.call("GET", f"/v1/functions/{name}"))["instances"]))
    out: dict[str, Any] = {"cold_bursts": {
        "bursts": cold_bursts, "pool_size": pool, "call_latency": stats_ms(cold_samples),
        "burst_wall": stats_ms(cold_walls), "distinct_instances_per_burst": cold_distinct,
        "instances_listed_after": listed, "cold_calls": cold_calls}}
    name = f"burst-{cold_bursts - 1}"
    walls, samples, distinct, cold = [], [], [], 0
    for _ in range(bursts):
        await asyncio.to_thread(wait_quiet, max_wait_s=QUIET_WAIT_S)
        wall, done = await fire(name)
        walls.append(wall)
        samples += [e for e, _ in done]
        distinct.append(len({r["instance"] for _, r in done}))
        cold += sum(r["cold"] for _, r in done)
    out["warm_bursts"] = {"bursts": bursts, "call_latency": stats_ms(samples), "burst_wall": stats_ms(walls),
                          "distinct_instances_per_burst": {"min": min(distinct), "max": max(distinct),
                                                           "mean": round(sum(distinct) / len(distinct), 2)},
                          "cold_calls": cold}
    out["instances_at_end"] = len((await c.call("GET", f"/v1/functions/{name}"))["instances"])
    await c.call("DELETE", f"/v1/functions/{name}", status=204)
    return out


# -- (d) ephemeral invokes from the warm pool -------------------------------------------------------


async def ephemeral(n: int, pool: int, threshold: float) -> dict[str, Any]:
    """Ephemeral invokes, each split by the bench server's `trace_invoke` marks into taking the
    sandbox (create), the call (invoke) and destroying it before the reply (destroy)."""
    parts: dict[str, list[float]] = {"create": [], "sandbox_invoke": [], "destroy": []}
    async with Gateway(settings_dict(pool_size=pool), env={"BENCH_PATCH": "trace_invoke"}) as gw, \
            aiohttp.ClientSession(headers=AUTH) as s:
        c = Client(gw, s)
        await gw.wait_pool(s, pool, settle_s=1.0)

        async def refilled() -> None:
            await gw.wait_pool(s, pool, settle_s=0.3)
            await c.call("GET", "/_bench/trace")  # drop the marks of what came before

        async def one() -> float:
            elapsed, reply = await c.timed("/v1/invoke", {"runtime": "wasm", "code": ADD, "function": "add",
                                                          "args": [20, 22]})
            expect(reply, 42)
            marks = dict((label, t) for label, t in (await c.call("GET", "/_bench/trace"))["marks"])
            for part, values in parts.items():
                values.append(marks[f"{part}_out"] - marks[f"{part}_in"])
            return elapsed

        result = await QuietSampler(threshold_cores=threshold, chunk_s=0.1).collect(one, n, between=refilled)
        result["split"] = {part: stats_ms(values) for part, values in parts.items()}
        listed = await c.call("GET", "/v1/sandboxes")
        result["sandboxes_left"] = len(listed["sandboxes"])
        state = await gw.state(s)
        result["gateway_sandboxes_left"] = len(state["sandboxes"])
        result["pool_size"] = pool
    return result


# -- (e) the guest's compiled-code cache -------------------------------------------------------------


async def code_cache(c: Client, n: int, chunk: int, threshold: float) -> dict[str, Any]:
    sid = (await c.call("POST", "/v1/sandboxes", {"runtime": "wasm"}, status=201))["id"]
    modules = {"small": ADD, "large": large_module()}
    counter = itertools.count()
    guest: dict[str, list[float]] = {}
    variants = {}
    for size, code in modules.items():
        for mode in ("same", "unique"):
            name = f"{size}_{mode}"
            guest[name] = []

            def make(name: str = name, code: str = code, unique: bool = mode == "unique") -> Any:
                async def one() -> float:
                    body = code + (f"\n# call {next(counter)}\n" if unique else "")
                    elapsed, reply = await c.timed(f"/v1/sandboxes/{sid}/invoke",
                                                   {"code": body, "function": "add", "args": [1, 2]})
                    expect(reply, 3)
                    guest[name].append(reply["duration_ms"] / 1000)
                    return elapsed
                return one

            variants[name] = make()
    for one in variants.values():
        for _ in range(20):
            await one()
    for values in guest.values():
        values.clear()
    launcher = await c.launcher_of(sid)
    pids = {"gateway": c.gw.pid, **({"launcher": launcher} if launcher else {})}
    results = await interleaved(variants, n, chunk=chunk, threshold_cores=threshold,
                                cpu_pids={name: pids for name in variants})
    for name, r in results.items():
        r["guest_duration"] = stats_ms(guest[name])
    await c.call("DELETE", f"/v1/sandboxes/{sid}", status=204)
    return {"lines": {size: code.count("\n") + 1 for size, code in modules.items()},
            "bytes": {size: len(code.encode()) for size, code in modules.items()}, "variants": results}


# -- (f) microVM --------------------------------------------------------------------------------------


async def microvm(n: int, warmup: int, threshold: float) -> dict[str, Any]:
    # Only the microVM runtime: a WASM warm pool would share the CPU being measured.
    settings = settings_dict(runtimes={"microvm": {"pool_size": 1}}, blocked=["pod", "wasm"],
                             settings={"default_runtime": "microvm"})
    async with Gateway(settings) as gw, aiohttp.ClientSession(headers=AUTH) as s:
        c = Client(gw, s)
        runtimes = await c.call("GET", "/v1/runtimes")
        if "microvm" not in [r["id"] for r in runtimes["runtimes"]]:
            why = runtimes.get("unavailable", {}).get("microvm", "not registered")
            return {"skipped": f"the microVM runtime is unavailable here: {why}"}
        result = await warm_invokes(c, "microvm", n, warmup, threshold, chunk=10)
    return result


# -- where a warm invoke's time goes ----------------------------------------------------------------


STAGE_NAMES = {  # (from, to): what happens between; `.2` and `.3` are a label's 2nd and 3rd time in a call
    ("client_send", "invoke_in"): "client -> the route calls the registry (HTTP, JSON body)",
    ("invoke_in", "pipe_write"): "instance taken, exec source made, exec.start written",
    ("pipe_write", "agent_start"): "exec.start written -> the agent's start",
    ("agent_start", "agent_end"): "start -> end (the guest runs the call)",
    ("agent_end", "pipe_write.2"): "end -> the confirming ping written",
    ("pipe_write.2", "agent_reply"): "ping written -> its reply",
    ("agent_reply", "report_in"): "reply -> the exec taken as ended",
    ("report_in", "pipe_write.3"): "fs.read of the report written",
    ("pipe_write.3", "agent_start.2"): "fs.read written -> its start",
    ("agent_start.2", "agent_data"): "fs.read: start -> data",
    ("agent_data", "agent_end.2"): "fs.read: data -> end",
    ("agent_end.2", "report_out"): "report parsed",
    ("report_out", "invoke_out"): "invoke result built, instance released",
    ("invoke_out", "client_recv"): "response -> the client has it (JSON, HTTP)",
}


async def stages(n: int) -> dict[str, Any]:
    """Medians of the stages of `n` warm invokes (the bench server's `trace_invoke` patch: only
    timestamps; time.perf_counter is CLOCK_MONOTONIC, one clock for both processes)."""
    async with Gateway(settings_dict(pool_size=1), env={"BENCH_PATCH": "trace_invoke"}) as gw, \
            aiohttp.ClientSession(headers=AUTH) as s:
        c = Client(gw, s)
        await c.deploy("traced", code=ADD, function="add")
        for _ in range(100):
            await c.timed("/v1/functions/traced/invoke", {"args": [1]})
        await asyncio.to_thread(wait_quiet, max_wait_s=QUIET_WAIT_S)
        await c.call("GET", "/_bench/trace")  # drop the warm-up's marks
        client = []
        for _ in range(n):
            t0 = time.perf_counter()
            _, reply = await c.timed("/v1/functions/traced/invoke", {"args": [1]})
            client.append((t0, time.perf_counter()))
            expect(reply, 1, cold=False)
        marks = (await c.call("GET", "/_bench/trace"))["marks"]
    calls: list[list[tuple[str, float]]] = []
    seen: dict[str, int] = {}
    for label, t in marks:
        if label == "invoke_in":
            calls.append([])
            seen.clear()
        if calls:
            seen[label] = seen.get(label, 0) + 1
            calls[-1].append((label if seen[label] == 1 else f"{label}.{seen[label]}", t))
    if len(calls) != n:
        raise RuntimeError(f"{len(calls)} traced calls for {n} invokes")
    by_shape: dict[tuple[str, ...], list[list[float]]] = {}
    for (t0, t1), seq in zip(client, calls, strict=True):
        full = [("client_send", t0), *seq, ("client_recv", t1)]
        by_shape.setdefault(tuple(label for label, _ in full), []).append([t for _, t in full])
    shape, rows = max(by_shape.items(), key=lambda item: len(item[1]))
    out = []
    for i in range(1, len(shape)):
        ms = statistics.median((r[i] - r[i - 1]) * 1000 for r in rows)
        out.append({"from": shape[i - 1], "to": shape[i], "what": STAGE_NAMES.get((shape[i - 1], shape[i]), ""),
                    "median_ms": round(ms, 3)})
    return {"n": n, "calls_of_this_shape": len(rows), "stages": out,
            "total_median_ms": round(statistics.median((r[-1] - r[0]) * 1000 for r in rows), 3)}


# -- main ------------------------------------------------------------------------------------------------


def show_verdict(label: str, value: float, target: float) -> str:
    v = verdict(value, target)
    print(f"   {label}: {value:.3f} ms vs <= {target:g} ms: {v}")
    return v


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="warm invokes")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--cold", type=int, default=20, help="first calls of new functions, per pool setting")
    p.add_argument("--bursts", type=int, default=20)
    p.add_argument("--cold-bursts", type=int, default=3)
    p.add_argument("--ephemeral", type=int, default=50)
    p.add_argument("--pool", type=int, default=2, help="the WASM warm pool (the runtime's default: 2)")
    p.add_argument("--code-n", type=int, default=200, help="sandbox invokes per code-cache variant")
    p.add_argument("--chunk", type=int, default=20)
    p.add_argument("--microvm-n", type=int, default=100)
    p.add_argument("--stages-n", type=int, default=500, help="traced warm invokes")
    p.add_argument("--threshold", type=float, default=0.15, help="foreign CPU (cores) above which a chunk "
                                                                   "counts only in 'all samples'")
    p.add_argument("--only", default=",".join(PARTS))
    p.add_argument("--results", default="functions", help="bench/results/<this>.json")
    args = p.parse_args()
    parts = [x for x in args.only.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    banner("serverless: deployed, cold, burst, ephemeral invokes and the compiled-code cache")
    print(f"   load average at start: {os.getloadavg()}")
    out: dict[str, Any] = {"args": vars(args), "loadavg_at_start": os.getloadavg()}
    verdicts: dict[str, Any] = {}

    if {"warm", "burst", "code"} & set(parts):
        async with Gateway(settings_dict(pool_size=args.pool)) as gw, aiohttp.ClientSession(headers=AUTH) as s:
            c = Client(gw, s)
            await gw.wait_pool(s, args.pool, settle_s=1.0)
            if "warm" in parts:
                out["warm"] = w = await warm_invokes(c, "wasm", args.n, args.warmup, args.threshold,
                                                     args.chunk)
                print(fmt_stats("(a) warm deployed invoke, REST", w))
                print(f"{'':<47}guest exec duration p50 {w['guest_duration']['p50_ms']:.3f} ms; "
                      f"CPU per call, ms: {w.get('cpu_ms_per_op')}")
                ref = w["reference_rest_exec"]
                print(fmt_stats("    for reference: REST exec '1'", ref))
                print(f"{'':<47}CPU per exec, ms: {ref.get('cpu_ms_per_op')}")
                verdicts["warm_p50"] = show_verdict("warm p50", w["p50_ms"], WARM_TARGET_MS)
                verdicts["warm_p99"] = show_verdict("warm p99", w["p99_ms"], WARM_TARGET_MS)
            if "burst" in parts:
                out["burst"] = b = await burst(c, args.bursts, args.cold_bursts, args.pool)
                cb, wb = b["cold_bursts"], b["warm_bursts"]
                print(f"(c) 10 at once, max_instances 10: {cb['bursts']} first bursts of new functions (pool of "
                      f"{cb['pool_size']}): {cb['cold_calls']} cold calls, instances per burst "
                      f"{cb['distinct_instances_per_burst']}, listed {cb['instances_listed_after']}")
                print(fmt_stats("    cold bursts, per call", cb["call_latency"]))
                print(fmt_stats("    cold bursts, all 10 done", cb["burst_wall"]))
                print(fmt_stats(f"    then {wb['bursts']} warm bursts, per call", wb["call_latency"]))
                print(fmt_stats("    per burst (all 10 done)", wb["burst_wall"]))
                print(f"    instances per warm burst {wb['distinct_instances_per_burst']}, cold calls "
                      f"{wb['cold_calls']}, instances at the end {b['instances_at_end']}")
            if "code" in parts:
                out["code"] = cc = await code_cache(c, args.code_n, args.chunk, args.threshold)
                print(f"(e) sandbox invoke, repeated: small module {cc['lines']['small']} lines, large "
                      f"{cc['lines']['large']} lines ({cc['bytes']['large']} bytes)")
                for name, r in cc["variants"].items():
                    print(fmt_stats(f"    {name}", r))
                    print(f"{'':<47}guest exec p50 {r['guest_duration']['p50_ms']:.3f} ms; CPU per call, ms: "
                          f"{r.get('cpu_ms_per_op')}")
                for size in ("small", "large"):
                    same, unique = cc["variants"][f"{size}_same"], cc["variants"][f"{size}_unique"]
                    print(f"    {size}: the cache saves {unique['p50_ms'] - same['p50_ms']:.3f} ms at p50 "
                          f"({unique['p50_ms']:.3f} -> {same['p50_ms']:.3f} ms)")

    if "stages" in parts:
        out["stages"] = st = await stages(args.stages_n)
        print(f"(a') a warm invoke stage by stage, medians of {st['calls_of_this_shape']} of {st['n']} calls:")
        for row in st["stages"]:
            print(f"    {row['from'] + ' -> ' + row['to']:<30} {row['median_ms']:7.3f} ms  {row['what']}")
        print(f"    {'total (median of round trips)':<30} {st['total_median_ms']:7.3f} ms")

    if "cold" in parts:
        out["cold"] = {}
        for pool in (args.pool, 0):
            out["cold"][f"pool_{pool}"] = r = await cold_invokes(args.cold, pool, args.threshold)
            print(fmt_stats(f"(b) cold first call, pool_size {pool}", r))
            print(f"{'':<47}guest exec (load + call) p50 {r['guest_duration']['p50_ms']:.2f} ms")
        verdicts["cold_p50_pool"] = show_verdict("cold p50 (warm pool)", out["cold"][f"pool_{args.pool}"]["p50_ms"],
                                                 COLD_TARGET_MS)
        verdicts["cold_p50_no_pool"] = show_verdict("cold p50 (pool 0)", out["cold"]["pool_0"]["p50_ms"],
                                                    COLD_TARGET_MS)

    if "ephemeral" in parts:
        out["ephemeral"] = e = await ephemeral(args.ephemeral, args.pool, args.threshold)
        print(fmt_stats("(d) ephemeral POST /v1/invoke, pool hit", e))
        print(f"{'':<47}p50 of its parts, ms: " + ", ".join(f"{part} {v['p50_ms']:.2f}"
                                                         for part, v in e["split"].items()))
        print(f"{'':<47}sandboxes left: listed {e['sandboxes_left']}, in the gateway {e['gateway_sandboxes_left']}")

    if "microvm" in parts:
        out["microvm"] = m = await microvm(args.microvm_n, min(args.warmup, 20), args.threshold)
        if "skipped" in m:
            print(f"(f) microVM: skipped: {m['skipped']}")
        else:
            print(fmt_stats("(f) microVM warm deployed invoke, REST", m))
            print(f"{'':<47}guest exec duration p50 {m['guest_duration']['p50_ms']:.3f} ms; first call "
                  f"{m['first_call_ms']:.0f} ms; CPU per call, ms: {m.get('cpu_ms_per_op')}")
            print(fmt_stats("    for reference: REST exec '1'", m["reference_rest_exec"]))

    out["verdicts"] = verdicts
    out["loadavg_at_end"] = os.getloadavg()
    print(f"   load average at end: {out['loadavg_at_end']}")
    write_results(args.results, out)


if __name__ == "__main__":
    asyncio.run(main())
