"""What a named volume costs a create, per runtime: create -> first exec result, with one volume
mounted (always a cold start: a warm sandbox has its devices and preopens already) against a warm
pool hit and against a cold start without a volume; and the volume API's own costs.

    .venv/bin/python bench/volume_attach.py [--runtime wasm|microvm] [--n 10] [--template NAME]

A real gateway in its own process (bench/_server.py), its volumes in a temporary folder (the
"local" store: ext4 images, loop-mounted on WASM, virtio-blk on microVM; needs root). The three
kinds of create are interleaved so drift in the machine's load hits each alike; the pool refills
between creates, outside the timing. Results: bench/results/volume_attach-<runtime>.json.
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


async def run(runtime: str, n: int, template: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {"runtime": runtime, **({"template": template} if template else {})}
    runtimes: dict[str, Any] = {}
    if runtime != "wasm":
        runtimes[runtime] = {"pool_size": 1, **({"template": template} if template else {})}
    blocked = tuple(r for r in ("wasm", "microvm", "pod") if r != runtime)
    with tempfile.TemporaryDirectory(prefix="sandgate-bench-volumes-") as folder:
        settings = settings_dict(pool_size=1 if runtime == "wasm" else 0, blocked=blocked, runtimes=runtimes,
                                 storage={"dir": folder})
        async with Gateway(settings) as gateway, aiohttp.ClientSession() as session:
            t0 = time.perf_counter()
            async with session.post(f"{gateway.url}/v1/volumes", headers=AUTH,
                                    json={"name": "bench", "quota_mb": 256, "runtime": runtime}) as resp:
                assert resp.status == 201, await resp.text()
            volume_create = time.perf_counter() - t0
            t0 = time.perf_counter()
            async with session.put(f"{gateway.url}/v1/volumes/bench/files/seed.bin", headers=AUTH,
                                   data=io.BytesIO(b"x" * (1 << 20))) as resp:
                assert resp.status == 201, await resp.text()
            upload = time.perf_counter() - t0
            samples: dict[str, list[float]] = {"warm_pool": [], "cold": [], "cold_with_volume": []}
            for _ in range(n):
                if runtime == "wasm":
                    await gateway.wait_pool(session, 1)
                samples["warm_pool"].append(await _first_result(session, gateway.url, options))
                # Another memory size than the pool's: a cold start, as a volume's is.
                samples["cold"].append(await _first_result(session, gateway.url, {**options, "memory_mb": 320}))
                samples["cold_with_volume"].append(await _first_result(
                    session, gateway.url, {**options, "memory_mb": 320, "volumes": {"/data": {"name": "bench"}}}))
    return {"runtime": runtime, "template": template, "n": n, "volume_create_ms": volume_create * 1000,
            "upload_1mb_ms": upload * 1000, **{k: stats_ms(v) for k, v in samples.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="wasm", choices=("wasm", "microvm"))
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--template")
    args = parser.parse_args()
    banner(f"volume attach cost: {args.runtime}")
    result = asyncio.run(run(args.runtime, args.n, args.template))
    print(f"volume create (mkfs.ext4 of 256 MB): {result['volume_create_ms']:.0f} ms")
    print(f"1 MB upload into the unmounted volume: {result['upload_1mb_ms']:.0f} ms")
    for key in ("warm_pool", "cold", "cold_with_volume"):
        print(fmt_stats(f"create -> first result, {key}", result[key]))
    write_results(f"volume_attach-{args.runtime}", result)


if __name__ == "__main__":
    main()
