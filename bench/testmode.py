"""Test mode's guest side: what pytest costs in a sandbox of each runtime, through a real gateway.

    .venv/bin/python bench/testmode.py [--n 5] [--runtimes wasm,microvm,pod]

For each runtime, in N fresh sandboxes one after another (no warm pool: each sandbox's agent has
never imported pytest), through the gateway's REST exec:

1. `import pytest` alone, timed inside the guest (the staged folder put on sys.path as
   guest_agent.testrun does), in a fresh sandbox;
2. in another fresh sandbox, the first `run_tests` of 5 small tests (what the gateway's first test
   request in a sandbox costs: pytest's import, its configuration, collection, the run, the report),
   wall time of the REST exec;
3. the second `run_tests` in that same sandbox (pytest already imported).

The pod runtime runs against the local test cluster (tests/kube, built on first use), whose test
kubelet stages the agent's sources without bytecode and runs pods with PYTHONDONTWRITEBYTECODE=1: its
first import compiles pytest from source. The production agent image ships bytecode
(helm/Dockerfile.agent), as the microVM image does; the WASM folder is precompiled when staged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
from _common import AUTH, banner, fmt_stats, inprocess_gateway, settings_dict, stats_ms, write_results

CODE = "def add(a, b):\n    return a + b\n"
TESTS = """\
import pytest

def test_add():
    assert add(1, 2) == 3

def test_wrong():
    assert add(1, 2) == 4

@pytest.mark.skip(reason="no")
def test_skip():
    pass

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    assert add(x, 0) == x
"""
IMPORT = ("import sys, time\nfrom guest_agent.testrun import _pytest_dir\nt = time.perf_counter()\n"
          "libs = _pytest_dir()\nif libs: sys.path.insert(0, libs)\nimport pytest\n"
          "print(time.perf_counter() - t)")


def run_source(report: str) -> str:
    return (f'__import__("guest_agent.testrun", fromlist=["run_tests"]).run_tests('
            f"code={CODE!r}, tests={TESTS!r}, report={report!r})")


async def one_runtime(url: str, runtime: str, n: int) -> dict[str, Any]:
    imports, firsts, seconds = [], [], []
    async with aiohttp.ClientSession(url, headers=AUTH) as http:

        async def create() -> str:
            async with http.post("/v1/sandboxes", json={"runtime": runtime}) as resp:
                assert resp.status == 201, await resp.text()
                return str((await resp.json())["id"])

        async def run(sid: str, code: str) -> tuple[float, dict[str, Any]]:
            start = time.perf_counter()
            async with http.post(f"/v1/sandboxes/{sid}/exec", json={"language": "python", "code": code,
                                                                     "timeout": 120}) as resp:
                done = await resp.json()
            elapsed = time.perf_counter() - start
            assert done.get("exit_code") == 0, done
            return elapsed, done

        for i in range(n):
            sid = await create()
            _, done = await run(sid, IMPORT)
            imports.append(float(done["stdout"].split()[-1]))
            await http.delete(f"/v1/sandboxes/{sid}")
            sid = await create()
            for label, samples in (("first", firsts), ("second", seconds)):
                elapsed, _ = await run(sid, run_source(f".sandgate/run/{label}{i}.json"))
                async with http.get(f"/v1/sandboxes/{sid}/files/.sandgate/run/{label}{i}.json") as resp:
                    report = json.loads(await resp.read())
                assert report["summary"] == {"total": 5, "passed": 3, "failed": 1, "skipped": 1}, report
                samples.append(elapsed)
            await http.delete(f"/v1/sandboxes/{sid}")
    return {"import_pytest_in_guest": stats_ms(imports), "first_run_tests_exec": stats_ms(firsts),
            "second_run_tests_exec": stats_ms(seconds)}


@contextlib.contextmanager
def pod_settings() -> Iterator[dict[str, Any]]:
    from tests.kube.build import ensure_built
    from tests.kube.cluster import running_cluster

    with running_cluster(ensure_built(), log=lambda line: None) as cluster:
        ns = cluster.create_namespace("bench")
        yield {"kubeconfig": str(cluster.kubeconfig), "namespace": ns, "ready_timeout_s": 60.0, "pool_size": 0}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--runtimes", default="wasm,microvm,pod")
    args = parser.parse_args()
    banner("test mode: pytest in a sandbox")
    results: dict[str, Any] = {}
    for runtime in args.runtimes.split(","):
        with contextlib.ExitStack() as stack:
            config = stack.enter_context(pod_settings()) if runtime == "pod" else {"pool_size": 0}
            others = tuple(r for r in ("microvm", "pod") if r != runtime)
            settings = settings_dict(0, runtimes={runtime: config}, blocked=others)
            async with inprocess_gateway(settings) as (_, url):
                results[runtime] = figures = await one_runtime(url, runtime, args.n)
        for name, figure in figures.items():
            print(fmt_stats(f"{runtime}: {name}", figure))
    write_results("testmode", results)


if __name__ == "__main__":
    asyncio.run(main())
