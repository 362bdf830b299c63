"""WASM network figures: what `"network"` costs a WASM sandbox's create, and what one
`sandgate.fetch` costs (guest -> launcher's door -> handoff socket -> the gateway's policy proxy ->
the upstream), against the test upstream ("the internet" on 203.0.113.x in a network namespace
this script makes, with its DNS server and CA: tests/net/upstream.py; needs root).

    sudo .venv/bin/python bench/wasm_fetch.py [--n 30] [--mb 32]

1. create -> 201 with `{"network": {"allow": [api]}}` and without, warm (a pooled launcher: the
   network is attached at take) and cold (pool_size 0). The pool is full again before each warm
   sample; each sandbox is deleted off the clock.
2. In one guest, `--n` times each: a fetch the policy refuses by name (the path's own cost:
   door, handoff, the proxy reading the request and answering; no DNS, no upstream),
   `sandgate.fetch` of http://api/hello and https://api/hello
   (the proxy resolves, checks, connects and, for https, does the TLS), and `urllib.request.urlopen`
   of the https one; then a `--mb` MB download read 1 MiB at a time (stream=True).

Results: bench/results/wasm_fetch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import AUTH, Gateway, QuietSampler, banner, fmt_stats, settings_dict, stats_ms, write_results

from tests.net.upstream import API, PORT, TLS_PORT, Upstream

GUEST = r"""
import json, time, sandgate, urllib.request

n, size = N, SIZE
def timed(f):
    out = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        out.append(time.perf_counter() - start)
    return out

def refused():
    try:
        sandgate.fetch("http://denied.invalid/")
    except sandgate.Refused:
        pass

results = {
    "refused": timed(refused),
    "http": timed(lambda: sandgate.fetch("http://API:PORT/hello").body),
    "https": timed(lambda: sandgate.fetch("https://API:TLS_PORT/hello").body),
    "urllib_https": timed(lambda: urllib.request.urlopen("https://API:TLS_PORT/hello").read()),
}
start = time.perf_counter()
total = 0
with sandgate.fetch("http://API:PORT/bytes/%d" % size, stream=True) as r:
    while chunk := r.read(1 << 20):
        total += len(chunk)
results["download_s"] = time.perf_counter() - start
results["bytes"] = total
print(json.dumps(results))
"""


async def creates(upstream: Upstream, n: int, pool: int, network: bool) -> dict[str, Any]:
    assert upstream.ca is not None
    settings = settings_dict(pool_size=pool, network={"nameservers": [upstream.nameserver],
                                                      "upstream_ca_file": str(upstream.ca.ca_file)})
    body: dict[str, Any] = {"runtime": "wasm", **({"network": {"allow": [API]}} if network else {})}
    async with Gateway(settings) as gw, aiohttp.ClientSession(headers=AUTH) as s:
        async def refilled() -> None:
            if pool:
                await gw.wait_pool(s, pool, settle_s=0.3)

        async def one() -> float:
            start = time.perf_counter()
            async with s.post(f"{gw.url}/v1/sandboxes", json=body) as r:
                answer = await r.json()
                elapsed = time.perf_counter() - start
                assert r.status == 201, answer
            async with s.delete(f"{gw.url}/v1/sandboxes/{answer['id']}") as r:
                assert r.status == 204
            if not pool:
                await asyncio.sleep(0.05)  # the killed launcher's teardown, off the clock
            return elapsed

        for _ in range(3):
            await refilled()
            await one()
        return await QuietSampler(threshold_cores=0.25, chunk_s=0.1).collect(one, n, between=refilled)


async def fetches(upstream: Upstream, n: int, mb: int) -> dict[str, Any]:
    assert upstream.ca is not None
    settings = settings_dict(pool_size=0, network={"nameservers": [upstream.nameserver],
                                                   "upstream_ca_file": str(upstream.ca.ca_file)},
                             runtimes={"wasm": {"pool_size": 0, "fetch_max_response_mb": mb + 1}},
                             limits={"exec_timeout_s": 600.0, "max_exec_timeout_s": 600.0})
    code = GUEST
    for name, value in (("TLS_PORT", TLS_PORT), ("PORT", PORT), ("API", API), ("SIZE", mb << 20), ("N", n)):
        code = code.replace(name, str(value))
    async with Gateway(settings) as gw, aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(f"{gw.url}/v1/sandboxes", json={"runtime": "wasm", "network": {"allow": [API]}}) as r:
            assert r.status == 201, await r.text()
            sid = (await r.json())["id"]
        async with s.post(f"{gw.url}/v1/sandboxes/{sid}/exec",
                          json={"language": "python", "code": code, "timeout": 600}) as r:
            done = await r.json()
    assert done.get("exit_code") == 0, done
    guest = json.loads(done["stdout"])
    assert guest["bytes"] == mb << 20
    return {"fetch_refused": stats_ms(guest["refused"]), "fetch_http_hello": stats_ms(guest["http"]),
            "fetch_https_hello": stats_ms(guest["https"]),
            "urlopen_https_hello": stats_ms(guest["urllib_https"]), "download_mb": mb,
            "download_s": round(guest["download_s"], 3), "download_mb_s": round(mb / guest["download_s"], 1)}


async def main(n: int, mb: int, skip_creates: bool) -> None:
    banner("WASM fetch through the gateway's policy proxy")
    upstream = Upstream(Path(tempfile.mkdtemp(prefix="sandgate-bench-upstream-")))
    upstream.start()
    figures: dict[str, Any] = {}
    try:
        for label, pool, network in () if skip_creates else (
                ("warm, network", 2, True), ("warm, no network", 2, False), ("cold, network", 0, True),
                ("cold, no network", 0, False)):
            figures[f"create {label}"] = result = await creates(upstream, n, pool, network)
            print(fmt_stats(f"create -> 201 ({label})", result))
        figures.update(await fetches(upstream, n, mb))
    finally:
        upstream.stop()
    for key in ("fetch_refused", "fetch_http_hello", "fetch_https_hello", "urlopen_https_hello"):
        print(fmt_stats(key, figures[key]))
    print(f"   {mb} MB download (stream=True, 1 MiB reads): {figures['download_s']} s "
          f"({figures['download_mb_s']} MB/s)")
    write_results("wasm_fetch", figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--mb", type=int, default=32)
    parser.add_argument("--skip-creates", action="store_true", help="only the fetch figures")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.mb, args.skip_creates))
