"""C and C++ on the WASM runtime: what a compile costs, cold and warm, and what an exec costs.

    .venv/bin/python bench/wasm_c.py [--n 10] [--skip-cold]

1. zig's first compile (its global cache empty): `cprograms.warm` into a fresh cache folder (a
   temporary $SANDGATE_CACHE_DIR), the C then the C++ libraries, timed per language. This is also
   what a jailed compile with a private, empty zig cache would pay every time.
2. Later compiles (the shared read-only cache warm), each of a source never compiled before:
   `CPrograms.build` end to end (the jail, then wasmtime's compile of the module into the program
   cache), and the jail alone; for a C hello world and a C++ iostream hello world.
3. A cache hit: `CPrograms.build` of a source already compiled.
4. Exec latency through a real gateway (REST exec in one sandbox, programs cached): C and C++
   hello worlds beside JavaScript and Python, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from _common import AUTH, banner, fmt_stats, inprocess_gateway, settings_dict, stats_ms, write_results

from plugins.common import CACHE_ENV
from plugins.wasm import cprograms, jail

HELLO = {
    "c": '#include <stdio.h>\nint main(void) { printf("hello\\n"); return 0; }\n',
    "cpp": '#include <iostream>\nint main() { std::cout << "hello" << std::endl; }\n',
}
OTHERS = {"javascript": 'console.log("hello")', "python": 'print("hello")'}


def cold_cache() -> dict[str, Any]:
    """warm() into an empty cache folder, phase by phase."""
    marks: dict[str, float] = {}
    start = time.monotonic()

    def progress(elapsed: float, phase: str) -> None:
        for language in ("cpp", "c"):
            if f"the {language} library" in phase:
                marks.setdefault(language, elapsed)
                break

    folder = Path(tempfile.mkdtemp(prefix="sandgate-bench-zig-"))
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    try:
        cache = cprograms.warm(progress)
        total = time.monotonic() - start
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    finally:
        if old is None:
            del os.environ[CACHE_ENV]
        else:
            os.environ[CACHE_ENV] = old
        shutil.rmtree(folder, ignore_errors=True)
    c_s = marks.get("cpp", total) - marks.get("c", 0.0)
    return {"c_s": round(c_s, 1), "cpp_s": round(total - marks.get("cpp", total), 1), "total_s": round(total, 1),
            "cache_mb": round(size / (1 << 20), 1)}


async def compiles(n: int) -> dict[str, Any]:
    cprograms.warm()
    programs = cprograms.CPrograms(jail.JailLimits(), 1, 1 << 30, Path(tempfile.gettempdir()))
    results: dict[str, Any] = {}
    for language, code in HELLO.items():
        builds, jails, hits, cpu = [], [], [], []
        for _ in range(n):
            source = f"// {uuid.uuid4()}\n{code}"
            t = time.perf_counter()
            result = await jail.run(cprograms.compile_spec(language, jail.JailLimits()), source.encode(), programs.env)
            jails.append(time.perf_counter() - t)
            assert result.ok, result
            source = f"// {uuid.uuid4()}\n{code}"
            t = time.perf_counter()
            built = await programs.build(language, source, 60.0)
            builds.append(time.perf_counter() - t)
            assert built.module is not None, built
            cpu.append(built.cpu_s)
            for _ in range(4):
                t = time.perf_counter()
                hit = await programs.build(language, source, 60.0)
                hits.append(time.perf_counter() - t)
                assert hit.cached
            built.module.unlink()
        results[language] = {"jail_only": stats_ms(jails), "build": stats_ms(builds), "cache_hit": stats_ms(hits),
                             "compile_cpu_s_mean": round(sum(cpu) / len(cpu), 3),
                             "module_bytes": len(result.output)}
    return results


async def execs(n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with inprocess_gateway(settings_dict(1)) as (_, url), aiohttp.ClientSession(url, headers=AUTH) as http:
        async with http.post("/v1/sandboxes", json={"runtime": "wasm"}) as resp:
            sid = (await resp.json())["id"]
        for language, code in {**HELLO, **OTHERS}.items():
            samples = []
            for i in range(n + 1):
                t = time.perf_counter()
                async with http.post(f"/v1/sandboxes/{sid}/exec", json={"language": language, "code": code}) as resp:
                    done = await resp.json()
                assert done["exit_code"] == 0 and done["stdout"] == "hello\n", done
                if i:  # the first run compiles (C/C++) or warms up; the rest are what an exec costs
                    samples.append(time.perf_counter() - t)
            results[language] = stats_ms(samples)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    banner("C and C++ on WASM: compiles, the cache, execs")
    results: dict[str, Any] = {}
    if not args.skip_cold:
        results["cold_zig_cache"] = cold = await asyncio.to_thread(cold_cache)
        print(f"zig's first compile (empty cache): C {cold['c_s']} s, then C++ {cold['cpp_s']} s "
              f"(total {cold['total_s']} s, cache {cold['cache_mb']} MB)")
    results["compiles"] = await compiles(args.n)
    for language, figures in results["compiles"].items():
        for name in ("jail_only", "build", "cache_hit"):
            print(fmt_stats(f"{language}: {name}", figures[name]))
        print(f"{'':<44} compile CPU {figures['compile_cpu_s_mean']} s, module {figures['module_bytes']} bytes")
    results["exec"] = await execs(args.n * 2)
    for language, figure in results["exec"].items():
        print(fmt_stats(f"REST exec, {language} hello", figure))
    write_results("wasm_c", results)


if __name__ == "__main__":
    asyncio.run(main())
