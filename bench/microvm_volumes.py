"""microVM volume figures: what a named volume costs at create and at destroy.

    SANDGATE_CACHE_DIR=... .venv/bin/python bench/microvm_volumes.py [--n 5]

Through an in-process gateway (aiohttp's test server, real QEMU, the "local" store in a temporary
folder; needs root for the store), each `POST /v1/sandboxes` until its 201 and each `DELETE`
until its 204:
1. no volume, from the warm pool (pool of 1, refilled before each create);
2. no volume, a clone restored per create (pool of 0 in a second gateway);
3. one read-write volume (a cold boot: no snapshot has the disk), destroy incl. the guest's flush
   after writing 4 MB;
4. one read-only volume (cold boot).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from gateway.config import Settings, Storage
from gateway.testing.conformance import AUTH, KEY
from gateway.web.app import MANAGER, create_app


def fmt(label: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    return f"{label:<44} n={len(ms):<3} p50={statistics.median(ms):8.1f} ms  min={ms[0]:8.1f}  max={ms[-1]:8.1f}"


async def timed(action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await action()
    return time.perf_counter() - start, result


async def gateway(pool_size: int, storage_dir: str) -> TestClient[Any, Any]:
    settings = Settings(api_keys={KEY: "tenant-a"}, reap_interval_s=3600.0,
                        blocked_plugins=("wasm", "pod"), runtimes={"microvm": {"pool_size": pool_size}},
                        storage=Storage(dir=storage_dir))
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client


async def create(client: TestClient[Any, Any], **body: Any) -> str:
    resp = await client.post("/v1/sandboxes", json={"runtime": "microvm", **body}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def delete(client: TestClient[Any, Any], sid: str) -> None:
    resp = await client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 204, await resp.text()


async def wait_pool(client: TestClient[Any, Any]) -> None:
    pool = client.app[MANAGER].runtimes["microvm"].pool
    await pool._full.wait()  # a bench may peek: it measures, it does not decide
    await asyncio.sleep(0.5)  # the refill's own work settles


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as storage:
        figures: dict[str, list[float]] = {k: [] for k in ("pool", "clone", "rw", "ro", "del", "del_rw")}
        client = await gateway(1, storage)
        try:
            resp = await client.post("/v1/volumes", json={"name": "bench", "quota_mb": 64, "runtime": "microvm"},
                                     headers=AUTH)
            assert resp.status == 201, await resp.text()
            for _ in range(n):
                await wait_pool(client)
                took, sid = await timed(lambda: create(client))
                figures["pool"].append(took)
                figures["del"].append((await timed(lambda sid=sid: delete(client, sid)))[0])
            for _ in range(n):
                took, sid = await timed(lambda: create(client, volumes={"/data": {"name": "bench"}}))
                figures["rw"].append(took)
                resp = await client.put(f"/v1/sandboxes/{sid}/files", params={"path": "/data/blob"},
                                        data=io.BytesIO(bytes(4 << 20)), headers=AUTH)
                assert resp.status in (200, 201), await resp.text()
                figures["del_rw"].append((await timed(lambda sid=sid: delete(client, sid)))[0])
            for _ in range(n):
                took, sid = await timed(lambda: create(client, volumes={"/data": {"name": "bench",
                                                                                  "readonly": True}}))
                figures["ro"].append(took)
                await delete(client, sid)
        finally:
            await client.close()
        client = await gateway(0, storage)
        try:
            for _ in range(n):
                took, sid = await timed(lambda: create(client))
                figures["clone"].append(took)
                await delete(client, sid)
        finally:
            await client.close()
    print(fmt("create, no volume, warm pool", figures["pool"]))
    print(fmt("create, no volume, clone per create (pool 0)", figures["clone"]))
    print(fmt("create, one read-write volume (cold boot)", figures["rw"]))
    print(fmt("create, one read-only volume (cold boot)", figures["ro"]))
    print(fmt("destroy, no volume", figures["del"]))
    print(fmt("destroy, rw volume after a 4 MB write (flush)", figures["del_rw"]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5)
    asyncio.run(main(parser.parse_args().n))
