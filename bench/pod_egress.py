"""Pod egress figures: what a pod sandbox's way out through its gateway's policy proxy costs.

    sudo .venv/bin/python bench/pod_egress.py [--n 30] [--mb 50] [--creates 10]

Starts the local test cluster (tests/kube: a real kube-apiserver 1.20 and etcd, the test kubelet
running pods under bubblewrap in the host's network namespace), the test upstream (tests/net: HTTP
and HTTPS servers on a TEST-NET-3 address in a network namespace, their DNS server and CA; needs
root) and a gateway in this process with the pod runtime (its egress listener on loopback, a warm
pool of one), then measures:

1. create -> agent ready through the gateway (`POST /v1/sandboxes`): without a network and with one
   (an allowlist and a secret: the claim's PATCH, the Secret's POST, `guest.env` with the proxy,
   the placeholder and the CA), each from the warm pool and cold;
2. in the pod (python3): `CONNECT other:8080` with its credentials until the proxy's 200, a fresh
   connection each time; `GET http://other/hello` through `http_proxy` (urllib); `GET https://api/echo`
   intercepted for the secret (the proxy ends TLS with the sandbox CA's certificate, fills the
   secret in, speaks TLS to the upstream); a `--mb` MB plain-HTTP download through the proxy,
   beside the same download straight from this process.

The test kubelet's pods share the host's network, so the pod-to-proxy hop is loopback here; on a
cluster it is the pod network. Results: bench/results/pod_egress.json.
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
from _common import AUTH, KEY, TENANT, banner, fmt_stats, stats_ms, write_results
from aiohttp import web

from gateway.config import Limits, NetworkAccess, Settings
from gateway.web.app import MANAGER, create_app
from plugins.pod.runtime import PodRuntime
from tests.kube.build import ensure_built
from tests.kube.cluster import running_cluster
from tests.net.upstream import API, OTHER, OTHER_ADDRESS, PORT, TLS_PORT, Upstream

GUEST = r"""
import json, os, socket, sys, time, urllib.request
from urllib.parse import urlsplit

n, size, api, other, port, tls_port = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:7]
proxy = urlsplit(os.environ["HTTPS_PROXY"])
import base64
auth = base64.b64encode(("%s:%s" % (proxy.username, proxy.password)).encode()).decode()
connects = []
for _ in range(n):
    start = time.perf_counter()
    with socket.create_connection((proxy.hostname, proxy.port)) as s:
        s.sendall(("CONNECT %s:%s HTTP/1.1\r\nHost: %s:%s\r\nProxy-Authorization: Basic %s\r\n\r\n"
                   % (other, port, other, port, auth)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1000)
        connects.append(time.perf_counter() - start)
    assert head.startswith(b"HTTP/1.1 200"), head

def timed(url, headers=None):
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as resp:
            resp.read()
        samples.append(time.perf_counter() - start)
    return samples

gets = timed("http://%s:%s/hello" % (other, port))
secret = timed("https://%s:%s/echo" % (api, tls_port), {"Authorization": "Bearer " + os.environ["API_TOKEN"]})
start = time.perf_counter()
total = 0
with urllib.request.urlopen("http://%s:%s/bytes/%d" % (other, port, size)) as resp:
    while chunk := resp.read(1 << 16):
        total += len(chunk)
download = time.perf_counter() - start
print(json.dumps({"connect_s": connects, "get_s": gets, "secret_s": secret, "download_s": download, "bytes": total}))
"""


def host_download(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url) as resp:
        while resp.read(1 << 16):
            pass
    return time.perf_counter() - start


async def creates(session: aiohttp.ClientSession, url: str, runtime: PodRuntime, body: dict[str, Any], n: int,
                  *, pooled: bool) -> dict[str, Any]:
    samples = []
    for _ in range(n):
        if pooled:
            assert runtime.pool is not None
            await asyncio.wait_for(runtime.pool.wait_full(), 120)
        start = time.perf_counter()
        async with session.post(f"{url}/v1/sandboxes", headers=AUTH, json={"runtime": "pod", **body}) as resp:
            assert resp.status == 201, await resp.text()
            sid = (await resp.json())["id"]
        samples.append(time.perf_counter() - start)
        async with session.delete(f"{url}/v1/sandboxes/{sid}", headers=AUTH) as resp:
            assert resp.status == 204
    return stats_ms(samples)


async def main(n: int, mb: int, n_creates: int) -> dict[str, Any]:
    size = mb << 20
    upstream = Upstream(Path(tempfile.mkdtemp(prefix="sandgate-bench-upstream-")))
    upstream.start()
    assert upstream.ca is not None
    network = {"allow": [API, OTHER]}
    secrets = [{"env": "API_TOKEN", "value": "bench-secret-value", "hosts": [API]}]
    try:
        with running_cluster(ensure_built()) as cluster:
            namespace = cluster.create_namespace()
            settings = Settings(
                api_keys={KEY: TENANT}, limits=Limits(exec_timeout_s=600.0, max_exec_timeout_s=600.0),
                blocked_plugins=("wasm", "microvm"), default_runtime="pod",
                network=NetworkAccess(nameservers=(upstream.nameserver,), upstream_ca_file=str(upstream.ca.ca_file)),
                runtimes={"pod": {"kubeconfig": str(cluster.kubeconfig), "namespace": namespace,
                                  "egress_listen": "127.0.0.1:0", "pool_size": 1, "pool_refill_per_s": 100}})
            app = create_app(settings)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            try:
                url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
                runtime = app[MANAGER].runtimes["pod"]
                assert isinstance(runtime, PodRuntime)
                async with aiohttp.ClientSession() as session:
                    figures: dict[str, Any] = {
                        "create_no_network_pooled": await creates(session, url, runtime, {}, n_creates, pooled=True),
                        "create_network_pooled": await creates(session, url, runtime,
                                                               {"network": network, "secrets": secrets}, n_creates,
                                                               pooled=True),
                        "create_network_cold": await creates(session, url, runtime,
                                                             {"network": network, "secrets": secrets,
                                                              "memory_mb": 300}, n_creates, pooled=False),
                    }
                    async with session.post(f"{url}/v1/sandboxes", headers=AUTH,
                                            json={"runtime": "pod", "network": network, "secrets": secrets}) as resp:
                        assert resp.status == 201, await resp.text()
                        sid = (await resp.json())["id"]
                    argv = ["python3", "-c", GUEST, str(n), str(size), API, OTHER, str(PORT), str(TLS_PORT)]
                    async with session.post(f"{url}/v1/sandboxes/{sid}/exec", headers=AUTH,
                                            json={"command": argv, "timeout": 600}) as resp:
                        done = await resp.json()
                    assert done.get("exit_code") == 0, done
                    guest = json.loads(done["stdout"])
                    assert guest["bytes"] == size
            finally:
                await runner.cleanup()
        host_s = await asyncio.to_thread(host_download, f"http://{OTHER_ADDRESS}:{PORT}/bytes/{size}")
    finally:
        upstream.stop()
    return {
        **figures,
        "connect_via_proxy": stats_ms(guest["connect_s"]),
        "get_hello_via_proxy": stats_ms(guest["get_s"]),
        "https_intercepted_with_secret": stats_ms(guest["secret_s"]),
        "download_mb": mb,
        "pod_download_s": round(guest["download_s"], 3),
        "pod_download_mb_s": round(mb / guest["download_s"], 1),
        "host_direct_download_s": round(host_s, 3),
        "host_direct_download_mb_s": round(mb / host_s, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--creates", type=int, default=10)
    args = parser.parse_args()
    banner("pod egress through the gateway's policy proxy")
    figures = asyncio.run(main(args.n, args.mb, args.creates))
    print(fmt_stats("create, no network, warm pool", figures["create_no_network_pooled"]))
    print(fmt_stats("create, network + secret, warm pool", figures["create_network_pooled"]))
    print(fmt_stats("create, network + secret, cold", figures["create_network_cold"]))
    print(fmt_stats("CONNECT -> 200 (pod)", figures["connect_via_proxy"]))
    print(fmt_stats("GET /hello via http_proxy (pod)", figures["get_hello_via_proxy"]))
    print(fmt_stats("HTTPS /echo, intercepted, secret (pod)", figures["https_intercepted_with_secret"]))
    print(f"   {args.mb} MB download: pod via proxy {figures['pod_download_s']} s "
          f"({figures['pod_download_mb_s']} MB/s); host direct {figures['host_direct_download_s']} s "
          f"({figures['host_direct_download_mb_s']} MB/s)")
    print(f"   results: {write_results('pod_egress', figures)}")
