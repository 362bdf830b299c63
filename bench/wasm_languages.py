"""The WASM runtime's languages: compiling each module once, fetching Ruby and PHP, and what a cold
exec costs per language.

    .venv/bin/python bench/wasm_languages.py [--n 20] [--skip-compile] [--skip-fetch] [--python]

1. Compile time of each module (`plugins.wasm.artifacts`' child, as `sandgate images build wasm`
   runs it, into a temporary file: the cache is not touched): wall time, the child's CPU and peak
   RSS, and the sizes of the .wasm and the compiled .cwasm. CPython's takes minutes and ~2.7 GB:
   only with --python.
2. Fetching Ruby and PHP with npm into an empty folder (plugins.wasm.runno.fetch: npm pack, the
   hashes, the extraction). npm's own cache is not emptied, so this is the setup of a second
   checkout on the same machine; the first download's time is in docs/benchmarks.md.
3. Cold exec latency per language through a real gateway (in this process, REST exec of a hello
   world in one sandbox): Python runs in the agent, already up; JavaScript, Ruby and PHP start a
   fresh launcher and instance per exec. Also the launcher alone (spawned directly with the run's
   folder, to its exit): the interpreter's own start, without the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    AUTH,
    PYTHON,
    ROOT,
    LoadMonitor,
    banner,
    fmt_stats,
    inprocess_gateway,
    interleaved,
    settings_dict,
    stats_ms,
    write_results,
)

from plugins.wasm import artifacts, interpreters, runno
from plugins.wasm.runtime import launcher_env

HELLO = {
    "python": "print('hello')",
    "javascript": "console.log('hello')",
    "ruby": "puts 'hello'",
    "php": "<?php echo \"hello\\n\";",
}


def compile_once(kind: artifacts.Kind, wasm: Path) -> dict[str, Any]:
    """One compile in the child `ensure_compiled` starts, into a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{kind}.cwasm"
        mon = LoadMonitor()
        start = time.perf_counter()
        proc = subprocess.Popen([PYTHON, "-m", "plugins.wasm.artifacts", "--compile-into", kind, str(out), str(wasm)],
                                env=artifacts.child_env(), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0, f"compiling {kind} failed"
        return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                "peak_rss_mb": round(usage.ru_maxrss / 1024), "wasm_mb": round(wasm.stat().st_size / 2**20, 1),
                "cwasm_mb": round(out.stat().st_size / 2**20, 1), "load": mon.read()}


def fetch_once() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        mon = LoadMonitor()
        start = time.perf_counter()
        runno.fetch(Path(tmp) / "runno")
        return {"wall_s": round(time.perf_counter() - start, 2), "load": mon.read()}


def launcher_alone(language: str, module: Path, work: Path, private: Path, cpu: list[float]) -> float:
    """Spawn the launcher for one hello world, as the runtime does, and wait for its exit; its CPU
    seconds (the machine is shared: CPU varies less than wall time with the load) go to `cpu`."""
    folder = Path(tempfile.mkdtemp(dir=private))
    interpreters.prepare(language, folder, HELLO[language], b"")
    args = [PYTHON, "-m", "plugins.wasm.launcher", "--mode", language, "--work", str(work),
            "--memory-bytes", str(256 << 20), "--cpu-seconds", "60", "--module", str(module),
            "--code-dir", str(folder)]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=launcher_env(private), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    assert proc.returncode == 0 and out == b"hello\n", (proc.returncode, out)
    cpu.append(usage.ru_utime + usage.ru_stime)
    for name in folder.iterdir():
        name.unlink()
    folder.rmdir()
    return elapsed


async def exec_latency(n: int, max_wall_s: float) -> dict[str, Any]:
    settings = settings_dict(1)
    async with inprocess_gateway(settings) as (app, url), aiohttp.ClientSession(url, headers=AUTH) as http:
        from gateway.web.app import MANAGER

        runtime = app[MANAGER].runtimes["wasm"]
        assert set(runtime.modules) == {"ruby", "php"}, runtime.unavailable_languages
        async with http.post("/v1/sandboxes", json={"runtime": "wasm"}) as resp:
            sid = (await resp.json())["id"]

        def through_gateway(language: str) -> Any:
            async def one() -> float:
                start = time.perf_counter()
                async with http.post(f"/v1/sandboxes/{sid}/exec",
                                     json={"language": language, "code": HELLO[language]}) as resp:
                    done = await resp.json()
                elapsed = time.perf_counter() - start
                assert done["stdout"] == "hello\n", done
                return elapsed
            return one

        with tempfile.TemporaryDirectory() as tmp:
            work, private = Path(tmp) / "work", Path(tmp) / "private"
            work.mkdir()
            private.mkdir()

            cpu: dict[str, list[float]] = {lang: [] for lang in interpreters.LANGUAGES}

            def alone(language: str) -> Any:
                async def one() -> float:
                    return await asyncio.to_thread(launcher_alone, language, runtime.modules[language], work,
                                                   private, cpu[language])
                return one

            variants = {f"gateway_{lang}": through_gateway(lang) for lang in HELLO}
            variants |= {f"launcher_{lang}": alone(lang) for lang in interpreters.LANGUAGES}
            out = await interleaved(variants, n, chunk=5, threshold_cores=0.5, max_wall_s=max_wall_s)
            for lang, seconds in cpu.items():
                out[f"launcher_{lang}"]["cpu_per_run"] = stats_ms(seconds)
            return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-fetch", action="store_true")
    parser.add_argument("--python", action="store_true", help="also compile CPython's module (minutes, ~2.7 GB)")
    parser.add_argument("--max-wall-s", type=float, default=900.0, help="stop sampling after this long")
    args = parser.parse_args()
    banner("WASM languages: compile, fetch, cold exec")
    results: dict[str, Any] = {}
    where = runno.fetch(runno.default_dir())  # the cached files (fetched now if missing)
    if not args.skip_compile:
        kinds: list[artifacts.Kind] = ["javascript", "ruby", "php"] + (["python"] if args.python else [])
        wasms = {"ruby": where[0], "php": where[1]}
        results["compile"] = {}
        for kind in kinds:
            results["compile"][kind] = figure = compile_once(kind, wasms.get(kind) or artifacts.wasm_path(kind))
            print(f"compile {kind:<11} {figure['wall_s']:6.1f} s wall, {figure['cpu_s']:6.1f} s CPU, peak RSS "
                  f"{figure['peak_rss_mb']} MB; {figure['wasm_mb']} MB wasm -> {figure['cwasm_mb']} MB cwasm "
                  f"(other processes: {figure['load']['foreign_cores']} cores)")
    if not args.skip_fetch:
        results["fetch_npm_cache_warm"] = figure = fetch_once()
        print(f"fetch ruby+php (npm cache warm) {figure['wall_s']} s")
    results["exec"] = asyncio.run(exec_latency(args.n, args.max_wall_s))
    for name, figure in results["exec"].items():
        # Other people's runs share this machine: with too few quiet chunks, every sample is shown.
        print(fmt_stats(name, figure if figure.get("n", 0) >= args.n else figure["all_samples"]))
        if "cpu_per_run" in figure:
            print(fmt_stats(f"  {name}: CPU per run", figure["cpu_per_run"]))
    write_results("wasm_languages", results)


if __name__ == "__main__":
    main()
