"""What a named volume costs a WASM create: create -> first exec result, with one volume mounted
(always a cold start: a warm sandbox has its preopens already) against a warm pool hit and against
a cold start without a volume; and the volume API's own costs. (microVM: bench/microvm_volumes.py;
pod: bench/pod_volume_create.py.)

    .venv/bin/python bench/volume_attach.py [--n 10]

A real gateway in its own process (bench/_server.py), its volumes in a temporary folder (the
"local" store: ext4 images the sandbox's disk holder loop-mounts; needs root). The three kinds of
create are interleaved so drift in the machine's load hits each alike; the pool refills between
creates, outside the timing. Results: bench/results/volume_attach-wasm.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from typing import Any

import aiohttp
from _common import AUTH, Gateway, banner, fmt_stats, settings_dict, stats_ms, write_results


async def _first_result(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/sandboxes", json=body, headers=AUTH) as resp:
        assert resp.status == 201, await resp.text()
        sandbox = await resp.json()
    async with session.post(f"{url}/v1/sandboxes/{sandbox['id']}/exec", headers=AUTH,
                            json={"language": "python", "code": "print(1)"}) as resp:
        assert (await resp.json())["stdout"] == "1\n"
    elapsed = time.perf_counter() - t0
    async with session.delete(f"{url}/v1/sandboxes/{sandbox['id']}", headers=AUTH) as resp:
        assert resp.status == 204
    return elapsed


async def run(n: int) -> dict[str, Any]:
    options: dict[str, Any] = {"runtime": "wasm"}
    with tempfile.TemporaryDirectory(prefix="sandgate-bench-volumes-") as folder:
        settings = settings_dict(pool_size=1, storage={"dir": folder})
        async with Gateway(settings) as gateway, aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            async with session.post(f"{gateway.url}/v1/volumes", headers=AUTH,
                                    json={"name": "bench", "quota_mb": 256, "runtime": "wasm"}) as resp:
                assert resp.status == 201, await resp.text()
            volume_create = time.perf_counter() - t0
            t0 = time.perf_counter()
            async with session.put(f"{gateway.url}/v1/volumes/bench/files/seed.bin", headers=AUTH,
                                   data=io.BytesIO(b"x" * (1 << 20))) as resp:
                assert resp.status == 201, await resp.text()
            upload = time.perf_counter() - t0
            samples: dict[str, list[float]] = {"warm_pool": [], "cold": [], "cold_with_volume": []}
            for _ in range(n):
                await gateway.wait_pool(session, 1)
                samples["warm_pool"].append(await _first_result(session, gateway.url, options))
                # Another memory size than the pool's: a cold start, as a volume's is.
                samples["cold"].append(await _first_result(session, gateway.url, {**options, "memory_mb": 320}))
                samples["cold_with_volume"].append(await _first_result(
                    session, gateway.url, {**options, "memory_mb": 320, "volumes": {"/data": {"name": "bench"}}}))
    return {"runtime": "wasm", "n": n, "volume_create_ms": volume_create * 1000,
            "upload_1mb_ms": upload * 1000, **{k: stats_ms(v) for k, v in samples.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    banner("volume attach cost: wasm")
    result = asyncio.run(run(args.n))
    print(f"volume create (mkfs.ext4 of 256 MB): {result['volume_create_ms']:.0f} ms")
    print(f"1 MB upload into the unmounted volume: {result['upload_1mb_ms']:.0f} ms")
    for key in ("warm_pool", "cold", "cold_with_volume"):
        print(fmt_stats(f"create -> first result, {key}", result[key]))
    write_results("volume_attach-wasm", result)


if __name__ == "__main__":
    main()
