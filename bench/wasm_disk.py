"""What the WASM disk holder costs (issue 9): each sandbox's /work is a tmpfs of `disk_mb` in a mount
namespace of its own (plugins/wasm/disk.py).

    .venv/bin/python bench/wasm_disk.py [--n 30] [--mb 64]

1. Holder start -> ready -> stop, alone (unshare + setpriv + mount + the ready line), n times.
2. Cold create -> ready through a real gateway (pool 0): the whole create, holder included.
3. Guest write throughput: a guest writing `--mb` MiB in 1 MiB writes into /work, on the tmpfs
   (through /proc/<holder>/root) and on a plain host folder, the same launcher otherwise.
Prints figures; no targets (the holder's share of a cold create is what to read).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from _common import AUTH, Gateway, fmt_stats, settings_dict, stats_ms

from plugins.wasm.artifacts import child_env
from plugins.wasm.disk import DiskHolder


async def holder_alone(n: int) -> list[float]:
    root = Path(tempfile.mkdtemp(prefix="sandgate-bench-disk-"))
    samples = []
    try:
        for i in range(n):
            work = root / str(i)
            work.mkdir()
            t0 = time.perf_counter()
            holder = await DiskHolder.start(work, 512, root)
            samples.append(time.perf_counter() - t0)
            await holder.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return samples


async def cold_creates(n: int) -> list[float]:
    samples = []
    async with Gateway(settings_dict(pool_size=0)) as gw, aiohttp.ClientSession(headers=AUTH) as s:
        for _ in range(n):
            t0 = time.perf_counter()
            async with s.post(f"{gw.url}/v1/sandboxes", json={"runtime": "wasm"}) as r:
                body = await r.json()
                samples.append(time.perf_counter() - t0)
                assert r.status == 201, body
            async with s.delete(f"{gw.url}/v1/sandboxes/{body['id']}") as r:
                assert r.status == 204
    return samples


WRITE = ("import time\nb = b'x' * (1 << 20)\nt = time.perf_counter()\n"
         "with open('/work/f', 'wb') as f:\n    for _ in range({mb}):\n        f.write(b)\n"
         "print(round({mb} / (time.perf_counter() - t)))")


def guest_write(work: str, mb: int) -> float:
    proc = subprocess.run([sys.executable, "-m", "plugins.wasm.launcher", "--work", work, "--", "python", "-c",
                           WRITE.format(mb=mb)], env=child_env(), capture_output=True, text=True, check=True)
    return float(proc.stdout.strip())


async def throughput(mb: int, runs: int = 3) -> tuple[list[float], list[float]]:
    root = Path(tempfile.mkdtemp(prefix="sandgate-bench-disk-"))
    try:
        (root / "plain").mkdir()
        (root / "tmpfs").mkdir()
        holder = await DiskHolder.start(root / "tmpfs", mb * 2, root)
        on_tmpfs, on_disk = [], []
        try:
            for _ in range(runs):  # alternating, so the machine's load changes hit both alike
                on_tmpfs.append(await asyncio.to_thread(guest_write, str(holder.path), mb))
                on_disk.append(await asyncio.to_thread(guest_write, str(root / "plain"), mb))
        finally:
            await holder.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return on_tmpfs, on_disk


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--mb", type=int, default=64)
    args = parser.parse_args()
    alone = await holder_alone(args.n)
    print(fmt_stats("holder start -> ready", stats_ms(alone)))
    creates = await cold_creates(args.n)
    print(fmt_stats("cold create -> ready (holder included)", stats_ms(creates)))
    tmpfs, disk = await throughput(args.mb)
    print(f"guest writes {args.mb} MiB into /work (MiB/s): tmpfs {sorted(tmpfs)}, plain host folder {sorted(disk)}")


if __name__ == "__main__":
    asyncio.run(main())
