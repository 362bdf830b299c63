"""microVM egress figures: what the path out of a `"network": true` sandbox costs.

    sudo .venv/bin/python bench/microvm_egress.py [--n 30] [--mb 50]

The path: guest TCP to 10.0.2.100:3128 -> QEMU's restricted slirp -> `guestfwd.py` (one process per
connection, hands the socket to the gateway) -> the gateway's egress proxy (resolve, check,
connect) -> the upstream, an HTTP server at 203.0.113.10 in a network namespace this script makes
(needs root; tests/net/upstream.py).

1. Connection setup through the forwarder, measured in the guest: connect to the proxy, send
   `CONNECT upstream`, until the proxy's `200` arrives (includes the helper process's start), `--n`
   times one after another; and a whole `GET /hello` through the proxy by the guest's environment
   (urllib with http_proxy), connection setup included.
2. A `--mb` MB download through the proxy by the guest (urllib, read in 64 KiB pieces and dropped).
3. The same download by the host straight from the upstream, for scale (no guest, no proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from _common import AUTH, Gateway, banner, fmt_stats, settings_dict, stats_ms, write_results

from tests.net.upstream import Upstream

GUEST = r"""
import json, socket, sys, time, urllib.request

target, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
connects = []
for _ in range(n):
    start = time.perf_counter()
    with socket.create_connection(("10.0.2.100", 3128)) as s:
        s.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target.encode(), target.encode()))
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1000)
        connects.append(time.perf_counter() - start)
    assert head.startswith(b"HTTP/1.1 200"), head
gets = []
for _ in range(n):
    start = time.perf_counter()
    with urllib.request.urlopen("http://%s/hello" % target) as resp:
        resp.read()
    gets.append(time.perf_counter() - start)
start = time.perf_counter()
total = 0
with urllib.request.urlopen("http://%s/bytes/%d" % (target, size)) as resp:
    while chunk := resp.read(1 << 16):
        total += len(chunk)
download = time.perf_counter() - start
print(json.dumps({"connect_s": connects, "get_s": gets, "download_s": download, "bytes": total}))
"""


def host_download(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url) as resp:
        while resp.read(1 << 16):
            pass
    return time.perf_counter() - start


async def main(n: int, mb: int) -> dict[str, Any]:
    size = mb << 20
    upstream = Upstream(Path(tempfile.mkdtemp(prefix="sandgate-bench-upstream-")))
    upstream.start()
    try:
        settings = settings_dict(runtimes={"microvm": {"pool_size": 0}}, blocked=("wasm", "pod"),
                                 limits={"exec_timeout_s": 600.0, "max_exec_timeout_s": 600.0})
        async with Gateway(settings) as gateway, aiohttp.ClientSession() as session:
            async with session.post(f"{gateway.url}/v1/sandboxes", headers=AUTH,
                                    json={"runtime": "microvm", "network": True}) as resp:
                assert resp.status == 201, await resp.text()
                sid = (await resp.json())["id"]
            target = upstream.url.removeprefix("http://")
            async with session.post(f"{gateway.url}/v1/sandboxes/{sid}/exec", headers=AUTH, json={
                    "command": ["python3", "-c", GUEST, target, str(n), str(size)], "timeout": 600}) as resp:
                done = await resp.json()
            assert done.get("exit_code") == 0, done
            guest = json.loads(done["stdout"])
            assert guest["bytes"] == size
        host_s = await asyncio.to_thread(host_download, f"{upstream.url}/bytes/{size}")
    finally:
        upstream.stop()
    return {
        "connect_via_proxy": stats_ms(guest["connect_s"]),
        "get_hello_via_proxy": stats_ms(guest["get_s"]),
        "download_mb": mb,
        "guest_download_s": round(guest["download_s"], 3),
        "guest_download_mb_s": round(mb / guest["download_s"], 1),
        "host_direct_download_s": round(host_s, 3),
        "host_direct_download_mb_s": round(mb / host_s, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    banner("microVM egress through the gateway's proxy")
    figures = asyncio.run(main(args.n, args.mb))
    print(fmt_stats("CONNECT -> 200 (guest)", figures["connect_via_proxy"]))
    print(fmt_stats("GET /hello via http_proxy (guest)", figures["get_hello_via_proxy"]))
    print(f"   {args.mb} MB download: guest via proxy {figures['guest_download_s']} s "
          f"({figures['guest_download_mb_s']} MB/s); host direct {figures['host_direct_download_s']} s "
          f"({figures['host_direct_download_mb_s']} MB/s)")
    print(f"   results: {write_results('microvm_egress', figures)}")
