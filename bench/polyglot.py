"""Exec latency per language on the microVM `polyglot` template, through a real gateway.

    .venv/bin/python bench/polyglot.py [--n 5] [--languages python,go,...] [--memory-mb N]

For each language a fresh polyglot sandbox (of the template's memory size, a clone of its snapshot,
unless --memory-mb asks for another, which boots cold), then N REST execs of its hello world
(gateway/testing/languages.py's SAMPLES), each waiting for a quieter machine first (other users'
load under --quiet-cores, at most 60 s; the load seen is recorded with the figures): wall time of
`POST /v1/sandboxes/{id}/exec`, compile (where there is one) and run included, nothing cached
between runs (each exec writes and builds in a fresh private folder; the first also reads the
toolchain from the disk). Also the peak memory of the sandbox cgroup over the language's runs
(`memory.peak`, read in the guest): what a sandbox's memory size must hold for it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
from _common import AUTH, banner, fmt_stats, inprocess_gateway, settings_dict, stats_ms, wait_quiet, write_results

from gateway.testing.languages import SAMPLES
from guest_agent import languages
from plugins.microvm.images.templates import load_templates

PEAK = "print(open('/sys/fs/cgroup/sandbox/memory.peak').read().strip())"


async def measure(url: str, langs: list[str], n: int, memory_mb: int, quiet: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    body = {"runtime": "microvm", "template": "polyglot", "memory_mb": memory_mb}
    async with aiohttp.ClientSession(url, headers=AUTH) as http:

        async def run(sid: str, language: str, code: str) -> dict[str, Any]:
            async with http.post(f"/v1/sandboxes/{sid}/exec",
                                 json={"language": language, "code": code, "timeout": 300}) as resp:
                return await resp.json()  # type: ignore[no-any-return]

        for language in langs:
            async with http.post("/v1/sandboxes", json=body) as resp:
                assert resp.status == 201, await resp.text()
                sandbox = await resp.json()
            sid = sandbox["id"]
            samples, foreign = [], []
            for _ in range(n):
                foreign.append(wait_quiet(threshold_cores=quiet, max_wait_s=60)["foreign_cores_before"])
                start = time.perf_counter()
                done = await run(sid, language, SAMPLES[language].hello)
                samples.append(time.perf_counter() - start)
                assert done.get("stdout") == f"hello from {language}\n", done
            peak = int((await run(sid, "python", PEAK))["stdout"])
            await http.delete(f"/v1/sandboxes/{sid}")
            results[language] = {"exec": stats_ms(samples), "cgroup_peak_mb": round(peak / (1 << 20), 1),
                                 "memory_mb": sandbox.get("memory_mb"),
                                 "foreign_cores_max": round(max(foreign), 2)}
            print(fmt_stats(f"{language}: hello world exec", results[language]["exec"])
                  + f"  cgroup peak {results[language]['cgroup_peak_mb']} MB", flush=True)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--languages", default=",".join(lang.id for lang in languages.LANGUAGES))
    parser.add_argument("--memory-mb", type=int, default=load_templates()["polyglot"].memory_mb)
    parser.add_argument("--quiet-cores", type=float, default=0.5)
    args = parser.parse_args()
    banner("exec latency per language: microVM polyglot template")
    settings = settings_dict(0, runtimes={"microvm": {"pool_size": 1, "template": "polyglot"}}, blocked=("pod",))
    async with inprocess_gateway(settings) as (_, url):
        results = await measure(url, args.languages.split(","), args.n, args.memory_mb, args.quiet_cores)
    write_results("polyglot", results)


if __name__ == "__main__":
    asyncio.run(main())
