"""Published ports: a guest server's download through the gateway, and small-request latency.

    .venv/bin/python bench/ports_throughput.py [--runtime microvm|pod] [--mb 64] [--requests 50] [--window B]

An in-process gateway (the runtime's default settings; `--kubeconfig`/`--namespace` for pods)
creates a sandbox publishing a port, starts a stdlib server in the guest that answers `/big` with
`--mb` MiB and `/` with a few bytes, then measures, through `/v1/sandboxes/{id}/ports/{port}/`
with the tenant's key: the download's MB/s (MB = 10^6 B) and the gateway process's peak traced
Python memory while it runs (and, for comparison, a file download of as many bytes over the same
agent channel), and the latency of `--requests` small GETs (each a new guest
connection: net.connect, the request, the response, net.close). Prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import tracemalloc
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from gateway.config import Ports, Settings
from gateway.web.app import create_app

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PORT = 8000
SERVER = r"""
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        size = int(sys.argv[1]) << 20 if self.path == "/big" else 5
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"x" * 65536
        while size:
            n = min(size, len(block))
            self.wfile.write(block[:n])
            size -= n
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), H)
if os.fork():
    print("listening")
    sys.exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
server.serve_forever()
"""


async def main(args: argparse.Namespace) -> None:
    runtimes: dict[str, Any] = {args.runtime: {"pool_size": 0}}
    if args.runtime == "pod":
        runtimes["pod"] = {"kubeconfig": args.kubeconfig, "namespace": args.namespace}
    settings = Settings(api_keys={KEY: "bench"}, default_runtime=args.runtime, runtimes=runtimes,
                        blocked_plugins=tuple(r for r in ("wasm", "microvm", "pod") if r != args.runtime),
                        reap_interval_s=3600.0, ports=Ports(window_bytes=args.window))
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        created = await (await client.post("/v1/sandboxes", json={"ports": [args.port]}, headers=AUTH)).json()
        sid, url = created["id"], created["ports"][0]["url"]
        started = await (await client.post(f"/v1/sandboxes/{sid}/exec", headers=AUTH, json={
            "command": ["python3", "-c", SERVER, str(args.mb), str(args.port)]})).json()
        assert started["stdout"] == "listening\n", started
        tracemalloc.start()
        begin = time.perf_counter()
        resp = await client.get(f"{url}big", headers=AUTH)
        received = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            received += len(chunk)
        elapsed = time.perf_counter() - begin
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert received == args.mb << 20, received
        # For comparison, the same number of bytes over the same agent channel as a file download.
        await client.post(f"/v1/sandboxes/{sid}/exec", headers=AUTH, json={
            "command": ["sh", "-c", f"head -c {args.mb << 20} /dev/zero > /tmp/big"]})
        begin = time.perf_counter()
        download = await client.get(f"/v1/sandboxes/{sid}/files?path=/tmp/big", headers=AUTH)
        file_bytes = 0
        async for chunk in download.content.iter_chunked(1 << 16):
            file_bytes += len(chunk)
        file_elapsed = time.perf_counter() - begin
        latencies = []
        for _ in range(args.requests):
            begin = time.perf_counter()
            small = await client.get(url, headers=AUTH)
            await small.read()
            latencies.append(time.perf_counter() - begin)
        latencies.sort()
        mbps = received / elapsed / 1e6
        print(f"{args.runtime}, window {args.window >> 10} KiB: {args.mb} MiB through the port: {mbps:.1f} MB/s, "
              f"peak traced gateway memory {peak / 2**20:.1f} MiB")
        print(f"the same bytes as a file download (fs.read): {file_bytes / file_elapsed / 1e6:.1f} MB/s")
        print(f"small GET ({args.requests} requests, a guest connection each): p50 "
              f"{statistics.median(latencies) * 1000:.1f} ms, p90 {latencies[int(len(latencies) * 0.9)] * 1000:.1f} ms")
        await client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    finally:
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", default="microvm", choices=("microvm", "pod"))
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--window", type=int, default=Ports().window_bytes, help="[ports] window_bytes")
    parser.add_argument("--kubeconfig", default="")
    parser.add_argument("--namespace", default="default")
    asyncio.run(main(parser.parse_args()))
