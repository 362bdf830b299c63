"""Before and after: the same invoke figures from two source trees side by side.

    git archive <commit> | tar -x -C /tmp/before
    .venv/bin/python bench/functions_compare.py --before /tmp/before [--n 400] [--cold 20]

One gateway per tree (each tree's own bench/_server.py, with PYTHONPATH set to that tree), both
running at once. Warm deployed invokes and sandbox invokes (a 3-line module) of both are measured
in alternating chunks of 20, so both see the same machine; then first calls of new functions
(pool hit) and ephemeral `/v1/invoke`, one sample of each tree in turn, the warm pool full before
each. Chunks during which other processes used more than `--threshold` cores count only in "all
samples". Results: bench/results/functions_compare.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import AUTH, PYTHON, ROOT, Gateway, banner, fmt_stats, interleaved, settings_dict, stats_ms, write_results

ADD = "def add(a, b=0):\n    return a + b\n"
POOL = 2


class TreeGateway(Gateway):
    """The bench server of another source tree, importing only that tree."""

    def __init__(self, tree: Path) -> None:
        super().__init__(settings_dict(pool_size=POOL), env={"PYTHONPATH": str(tree)})
        self.tree = tree

    async def __aenter__(self) -> TreeGateway:
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (a long-lived server; spawning it is instant)
            [PYTHON, str(self.tree / "bench" / "_server.py"), json.dumps(self.settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self.tree, env=self.env)
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line.startswith(b"READY "):
            self.proc.kill()
            raise RuntimeError(f"the bench server of {self.tree} did not start: {line!r}")
        _, port, pid = line.split()
        self.port, self.pid, self.url = int(port), int(pid), f"http://127.0.0.1:{int(port)}"
        return self


async def post(s: aiohttp.ClientSession, url: str, body: Any, method: str = "POST") -> tuple[float, Any]:
    t0 = time.perf_counter()
    async with s.request(method, url, json=body) as r:
        data = await r.json() if r.content_type == "application/json" else None
        if r.status >= 300:
            raise RuntimeError(f"{method} {url} answered {r.status}: {data}")
    return time.perf_counter() - t0, data


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, type=Path, help="the source tree to compare with")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--cold", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.3)
    args = p.parse_args()
    banner("invoke figures, before and after")
    trees = {"before": args.before.resolve(), "after": ROOT}
    out: dict[str, Any] = {"trees": {k: str(v) for k, v in trees.items()}}
    async with aiohttp.ClientSession(headers=AUTH) as s:
        gws = {name: await TreeGateway(tree).__aenter__() for name, tree in trees.items()}
        try:
            variants = {}
            for name, gw in gws.items():
                await gw.wait_pool(s, POOL)
                await post(s, f"{gw.url}/v1/functions/add", {"runtime": "wasm", "code": ADD, "function": "add"}, "PUT")
                sid = (await post(s, f"{gw.url}/v1/sandboxes", {"runtime": "wasm"}))[1]["id"]

                def make(url: str, path: str, body: dict[str, Any]) -> Any:
                    async def one() -> float:
                        elapsed, reply = await post(s, f"{url}{path}", body)
                        assert reply["status"] == "success" and reply["result"] == 3, reply
                        return elapsed
                    return one

                variants[f"warm_{name}"] = make(gw.url, "/v1/functions/add/invoke", {"args": [1], "kwargs": {"b": 2}})
                variants[f"sandbox_{name}"] = make(gw.url, f"/v1/sandboxes/{sid}/invoke",
                                                   {"code": ADD, "function": "add", "args": [1, 2]})
            for one in variants.values():
                for _ in range(30):
                    await one()
            out["interleaved"] = await interleaved(variants, args.n, chunk=20, threshold_cores=args.threshold)
            cold: dict[str, list[float]] = {name: [] for name in gws}
            ephemeral: dict[str, list[float]] = {name: [] for name in gws}
            counter = itertools.count()
            for _ in range(args.cold):
                for name, gw in gws.items():
                    await gw.wait_pool(s, POOL, settle_s=0.3)
                    fn = f"cold-{next(counter)}"
                    await post(s, f"{gw.url}/v1/functions/{fn}", {"runtime": "wasm", "code": ADD, "function": "add"},
                               "PUT")
                    elapsed, reply = await post(s, f"{gw.url}/v1/functions/{fn}/invoke", {"args": [1]})
                    assert reply["cold"] is True and reply["result"] == 1, reply
                    cold[name].append(elapsed)
                    await post(s, f"{gw.url}/v1/functions/{fn}", None, "DELETE")
                    await gw.wait_pool(s, POOL, settle_s=0.3)
                    elapsed, reply = await post(s, f"{gw.url}/v1/invoke", {"runtime": "wasm", "code": ADD,
                                                                           "function": "add", "args": [1, 2]})
                    assert reply["result"] == 3, reply
                    ephemeral[name].append(elapsed)
            out["cold"] = {name: stats_ms(v) for name, v in cold.items()}
            out["ephemeral"] = {name: stats_ms(v) for name, v in ephemeral.items()}
        finally:
            for gw in gws.values():
                await gw.stop()
    for name, r in out["interleaved"].items():
        print(fmt_stats(name, r))
    for kind in ("cold", "ephemeral"):
        for name, r in out[kind].items():
            print(fmt_stats(f"{kind}_{name}", r))
    write_results("functions_compare", out)


if __name__ == "__main__":
    asyncio.run(main())
