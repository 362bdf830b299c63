"""What change tracking adds to a small exec and an invoke on WASM (issue 17).

    .venv/bin/python bench/change_tracking.py [--n 100]

Every exec's agent takes a snapshot of /work (and the tracked roots) when it starts and one when
it ends, and diffs them (guest_agent/changes.py): its cost grows with the number of entries. One
WASM sandbox with an empty /work and one with 1,000 files in 10 folders are measured side by side
in alternating rounds (REST exec of `pass`, REST invoke of a function returning 1, and
`GET .../changes`, which is exactly one snapshot and diff), through a gateway in this process.
The difference empty -> 1,000 files is what tracking those files costs per call.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aiohttp
from _common import AUTH, banner, fmt_stats, inprocess_gateway, settings_dict, stats_ms

MAKE_FILES = ("import os\nfor d in range(10):\n    os.makedirs(f'tree/d{d}', exist_ok=True)\n"
              "    for f in range(100): open(f'tree/d{d}/f{f}.txt', 'w').write('x')\n")


async def timed(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> float:
    start = time.perf_counter()
    async with session.request(method, url, headers=AUTH, **kw) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return time.perf_counter() - start


async def main(n: int) -> None:
    banner("change tracking on WASM: exec, invoke and fs.changes with an empty /work and with 1,000 files")
    async with inprocess_gateway(settings_dict()) as (_app, url), aiohttp.ClientSession() as session:
        sandboxes = {}
        for label in ("empty", "1000 files"):
            async with session.post(f"{url}/v1/sandboxes", headers=AUTH, json={"runtime": "wasm"}) as resp:
                sandboxes[label] = (await resp.json())["id"]
        async with session.post(f"{url}/v1/sandboxes/{sandboxes['1000 files']}/exec", headers=AUTH,
                                json={"code": MAKE_FILES}) as resp:
            assert (await resp.json())["exit_code"] == 0
        calls = {
            "exec pass": ("POST", "exec", {"json": {"code": "pass"}}),
            "invoke f() -> 1": ("POST", "invoke", {"json": {"code": "def f():\n    return 1\n", "function": "f"}}),
            "GET changes (one snapshot+diff)": ("GET", "changes", {}),
        }
        samples: dict[tuple[str, str], list[float]] = {(c, s): [] for c in calls for s in sandboxes}
        for round_ in range(n + 5):
            for call, (method, path, kw) in calls.items():
                for label, sid in sandboxes.items():
                    took = await timed(session, method, f"{url}/v1/sandboxes/{sid}/{path}", **kw)
                    if round_ >= 5:  # warm-up
                        samples[(call, label)].append(took)
        for call in calls:
            figures = {label: stats_ms(samples[(call, label)]) for label in sandboxes}
            for label in sandboxes:
                print(fmt_stats(f"{call} [{label}]", figures[label]))
            added = figures["1000 files"]["p50_ms"] - figures["empty"]["p50_ms"]
            print(f"{'':<44}   1,000 files add {added:.2f} ms at p50")
        for sid in sandboxes.values():
            await session.delete(f"{url}/v1/sandboxes/{sid}", headers=AUTH)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    asyncio.run(main(parser.parse_args().n))
