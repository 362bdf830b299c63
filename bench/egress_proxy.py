"""What the policy proxy costs, without a VM: the proxy and its DNS server in this process, a client
in the same event loop (as the gateway's loop carries both sides of a sandbox's connection), and
the test upstream ("the internet" on 203.0.113.10 in a network namespace, with its own DNS server
and CA: tests/net/upstream.py; needs root).

    sudo .venv/bin/python bench/egress_proxy.py [--n 100] [--mb 100]

1. `CONNECT api:8080` until the proxy's 200 (policy check, resolution through the test DNS server,
   TCP connect), a fresh connection each time; and a DNS answer by the policy (`dns.answer`).
2. A fresh HTTPS `GET /hello`: straight to the upstream, through a tunnel (the proxy reads the
   ClientHello's server name, then relays), and intercepted for a secret (the proxy ends TLS with
   the sandbox CA's certificate, fills the secret into a header, speaks TLS to the upstream).
3. A `--mb` MB download: straight, through a tunnel (plain HTTP inside), and intercepted over TLS
   (the redactor scanning every byte for the secret's value).

Results: bench/results/egress_proxy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import h11
from _common import banner, fmt_stats, stats_ms, write_results
from dnslib import DNSRecord

from gateway.egress import dns, proxy
from gateway.egress.network import Egress, SandboxNetwork, upstream_context
from gateway.egress.policy import NetworkPolicy
from gateway.egress.resolver import Resolver, parse_nameservers
from gateway.egress.secrets import Secrets
from tests.net.upstream import ADDRESS, API, PORT, TLS_PORT, Upstream


async def _read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (any framing: an intercepted answer is chunked); its body's size."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(1 << 16))
        elif isinstance(event, h11.Data):
            size += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return size
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("the answer ended early")


async def _tunnel(port: int, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    status = await reader.readuntil(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), status
    return reader, writer


async def main(n: int, mb: int) -> None:
    banner("policy proxy (in-process)")
    upstream = Upstream(Path(tempfile.mkdtemp(prefix="sandgate-bench-upstream-")))
    upstream.start()
    assert upstream.ca is not None
    try:
        egress = Egress(resolver=Resolver(parse_nameservers([upstream.nameserver])),
                        upstream_tls=upstream_context(str(upstream.ca.ca_file)))
        network: SandboxNetwork = egress.attach("sb_bench", "bench", NetworkPolicy.parse({"allow": [API]}),
                                                Secrets.parse([{"env": "K", "value": "v" * 40, "hosts": [API]}]))
        plain: SandboxNetwork = egress.attach("sb_bench2", "bench", NetworkPolicy.parse({"allow": [API]}),
                                              Secrets())
        servers = {}
        handlers: set[asyncio.Task[Any]] = set()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, net: SandboxNetwork) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            with contextlib.suppress(asyncio.CancelledError):
                await proxy.handle(reader, writer, lambda _request: net)
            handlers.discard(task)

        for label, net in (("secrets", network), ("plain", plain)):
            servers[label] = await asyncio.start_server(lambda r, w, net=net: serve(r, w, net), "127.0.0.1", 0)
        port = {label: int(s.sockets[0].getsockname()[1]) for label, s in servers.items()}
        upstream_trust = ssl.create_default_context(cafile=str(upstream.ca.ca_file))
        sandbox_trust = ssl.create_default_context(cadata=network.ca.cert_pem.decode())
        key = network.secrets.env()["K"]
        figures: dict[str, Any] = {}

        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            _, writer = await _tunnel(port["plain"], f"{API}:{PORT}")
            samples.append(time.perf_counter() - t0)
            writer.close()
        figures["connect_200"] = stats_ms(samples)
        query = DNSRecord.question(API).pack()
        samples = []
        for _ in range(n * 5):
            t0 = time.perf_counter()
            await dns.answer(query, plain)
            samples.append(time.perf_counter() - t0)
        figures["dns_answer"] = stats_ms(samples)

        request = f"GET /hello HTTP/1.1\r\nHost: {API}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"

        async def https_get(how: str) -> float:
            t0 = time.perf_counter()
            if how == "direct":
                reader, writer = await asyncio.open_connection(ADDRESS, TLS_PORT, ssl=upstream_trust,
                                                               server_hostname=API)
            else:
                reader, writer = await _tunnel(port["secrets" if how == "intercepted" else "plain"],
                                               f"{API}:{TLS_PORT}")
                await writer.start_tls(sandbox_trust if how == "intercepted" else upstream_trust,
                                       server_hostname=API)
            writer.write(request.encode())
            await _read_answer(reader)
            elapsed = time.perf_counter() - t0
            writer.close()
            return elapsed

        hows = ("direct", "tunnel", "intercepted")
        by_how: dict[str, list[float]] = {h: [] for h in hows}
        for _ in range(n):
            for how in hows:  # interleaved, so drift hits each alike
                by_how[how].append(await https_get(how))
        for how in hows:
            figures[f"https_get_{how}"] = stats_ms(by_how[how])

        size = mb << 20

        async def download(how: str) -> float:
            t0 = time.perf_counter()
            if how == "direct":
                reader, writer = await asyncio.open_connection(ADDRESS, PORT, limit=1 << 20)
            elif how == "tunnel":
                reader, writer = await _tunnel(port["plain"], f"{API}:{PORT}")
            else:
                reader, writer = await _tunnel(port["secrets"], f"{API}:{TLS_PORT}")
                await writer.start_tls(sandbox_trust, server_hostname=API)
            writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: {API}\r\nConnection: close\r\n\r\n".encode())
            got = await _read_answer(reader)
            elapsed = time.perf_counter() - t0
            writer.close()
            assert got == size
            return elapsed

        for how in hows:
            seconds = min([await download(how) for _ in range(3)])
            figures[f"download_{how}_mb_s"] = round(mb / seconds, 1)

        print(fmt_stats("CONNECT -> 200 (resolve, check, connect)", figures["connect_200"]))
        print(fmt_stats("DNS answer by policy", figures["dns_answer"]))
        for how in hows:
            print(fmt_stats(f"HTTPS GET, fresh connection, {how}", figures[f"https_get_{how}"]))
        for how in hows:
            print(f"{mb} MB download, {how:<12} {figures[f'download_{how}_mb_s']:8.1f} MB/s (best of 3)")
        write_results("egress_proxy", {"n": n, "mb": mb, **figures})
        for server in servers.values():
            server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
    finally:
        upstream.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.mb))
