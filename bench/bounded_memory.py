"""The gateway's memory under the output attacks of issue 9 (High 2 and 3).

    .venv/bin/python bench/bounded_memory.py [--mib 16] [--execs 16] [--lines 30000]

One real gateway (bench/_server.py, WASM runtime, no warm pool) in its own process; its RSS and
peak RSS (VmHWM) from /proc after each step:

- `rest`: 4 sandboxes, one REST exec each at once, each printing `--mib` MiB (64 KiB writes);
- `replay`: one sandbox runs `--execs` REST execs one after the other, each printing `--lines`
  short lines (one event per line), which the gateway keeps for replay after they finished.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from _common import AUTH, Gateway, banner, settings_dict, write_results


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}


async def run(mib: int, execs: int, lines: int) -> dict[str, Any]:
    out: dict[str, Any] = {"mib_per_rest_exec": mib, "replay_execs": execs, "lines_per_exec": lines}
    async with Gateway(settings_dict(pool_size=0, limits={"exec_timeout_s": 600.0})) as gw, aiohttp.ClientSession(
            headers=AUTH, timeout=aiohttp.ClientTimeout(total=900)) as s:

        async def create() -> str:
            async with s.post(f"{gw.url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
                assert r.status == 201, await r.text()
                return str((await r.json())["id"])

        async def run_exec(sid: str, code: str) -> dict[str, Any]:
            async with s.post(f"{gw.url}/v1/sandboxes/{sid}/exec", json={"code": code, "timeout": 600}) as r:
                assert r.status == 200, await r.text()
                return dict(await r.json())

        sandboxes = [await create() for _ in range(4)]
        for sid in sandboxes:
            await run_exec(sid, "1")
        out["start"] = memory_mb(gw.pid)
        print(f"start: {out['start']}")
        big = f"import sys\nblock = 'x' * 65536\nfor _ in range({mib * 16}):\n    sys.stdout.write(block)\n"
        answers = await asyncio.gather(*(run_exec(sid, big) for sid in sandboxes))
        out["rest"] = {**memory_mb(gw.pid), "stdout_kept": [len(a["stdout"]) for a in answers],
                       "dropped_bytes": [a.get("dropped_bytes") for a in answers]}
        print(f"after 4 concurrent REST execs of {mib} MiB: {out['rest']}")
        small = f"for i in range({lines}):\n    print(i)\n"
        for _ in range(execs):
            await run_exec(sandboxes[0], small)
        out["replay"] = memory_mb(gw.pid)
        print(f"after {execs} finished execs of {lines} lines in one sandbox: {out['replay']}")
    return out


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=16)
    p.add_argument("--execs", type=int, default=16)
    p.add_argument("--lines", type=int, default=30000)
    p.add_argument("--name", default="bounded_memory", help="results file name (bench/results/<name>.json)")
    args = p.parse_args()
    banner("gateway memory under output attacks")
    write_results(args.name, await run(args.mib, args.execs, args.lines))


if __name__ == "__main__":
    asyncio.run(main())
