"""A microVM's network, attacked from inside a real guest (`"network": true`): the gateway's host,
its loopback services and private ranges are out of reach; public addresses are reachable through
the gateway's egress proxy, and only through it; an operator can forbid the network per tenant.

"Public" is an HTTP server the test starts on 203.0.113.0/24 in a network namespace of its own
(upstream.py, needs root): nothing leaves the machine. Each network sandbox boots cold (a network
VM does not fit the template's snapshot), so these tests are few and each asks many questions.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ConfigError, Limits, NetworkAccess, Settings, load_settings
from gateway.testing.conformance import AUTH, KEY, MSGPACK, OTHER_AUTH, OTHER_KEY, Gateway, WsClient
from gateway.web.app import MANAGER, create_app
from plugins.microvm import egress
from tests.net.upstream import ADDRESS, HOST_SIDE, Upstream

pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_image")]

#: Run in the guest: each probe's outcome, as JSON. Direct connections go to the address itself;
#: proxied ones ask the egress proxy for `CONNECT target` and report its status line; fetches go
#: through the proxy the guest's environment names (as curl or pip would).
PROBE = r"""
import json, os, socket, sys, threading, urllib.request

PROXY = ("10.0.2.100", 3128)
direct, proxied, fetches = json.loads(sys.argv[1])
results = {"env": os.environ.get("http_proxy"), "direct": {}, "proxied": {}, "fetched": {}}

def connect(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        results["direct"][target] = "connected"
    except OSError as exc:
        results["direct"][target] = "failed: " + repr(exc)

def ask_proxy(target):
    try:
        with socket.create_connection(PROXY, timeout=30) as s:
            s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)).encode())
            results["proxied"][target] = s.makefile("rb").readline().decode().strip()
    except OSError as exc:
        results["proxied"][target] = "failed: " + repr(exc)

def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = resp.read()
        results["fetched"][url] = body.decode() if len(body) < 100 else len(body)
    except Exception as exc:
        results["fetched"][url] = "failed: " + repr(exc)

threads = [threading.Thread(target=f, args=(a,)) for f, args in ((connect, direct), (ask_proxy, proxied),
                                                                  (fetch, fetches)) for a in args]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
"""


@pytest.fixture
def upstream(egress_upstream: Upstream) -> Upstream:
    return egress_upstream


class Listener:
    """A host server that counts the connections it gets (a sandbox must get none)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.servers: list[asyncio.Server] = []

    async def listen(self, host: str) -> int:
        server = await asyncio.start_server(self._accept, host, 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def host_services() -> AsyncIterator[Listener]:
    listener = Listener()
    yield listener
    await listener.close()


@pytest.fixture
async def gateway(aiohttp_client: Any) -> Gateway:
    # tenant-b may not have a network; tenant-a may (the default).
    settings = Settings(api_keys={KEY: "tenant-a", OTHER_KEY: "tenant-b"}, limits=Limits(exec_timeout_s=90.0),
                        reap_interval_s=3600.0, blocked_plugins=("wasm", "pod"), default_runtime="microvm",
                        network=NetworkAccess(tenants={"tenant-b": False}), runtimes={"microvm": {"pool_size": 0}})
    client = await aiohttp_client(create_app(settings))
    return Gateway(client, "microvm", {})


#: Run in the guest: CONNECT through the proxy, print the status line, then wait for what the
#: connection reads next.
HOLD = r"""
import socket, sys
s = socket.create_connection(("10.0.2.100", 3128), timeout=60)
s.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (sys.argv[1].encode(), sys.argv[1].encode()))
try:
    head = s.recv(1000)
    if head:
        print(head.split(b"\r\n")[0].decode(), flush=True)
    print("then " + repr(s.recv(100)))
except ConnectionResetError:
    print("then reset")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """The pids of `pid`'s child processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _helpers_running() -> list[int]:
    """The pids of `guestfwd.py` processes (one runs per guest connection, for milliseconds)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(egress.HELPER).encode() in cmdline:
            found.append(int(proc.name))
    return found


async def _probe(gateway: Gateway, sid: str, direct: list[str], proxied: list[str],
                 fetches: list[str]) -> dict[str, Any]:
    done = await gateway.exec(sid, command=["python3", "-c", PROBE, json.dumps([direct, proxied, fetches])],
                              timeout=90)
    assert done["exit_code"] == 0, done
    return json.loads(done["stdout"])  # type: ignore[no-any-return]


async def test_a_guest_reaches_public_addresses_through_the_proxy_and_nothing_else(
    gateway: Gateway, upstream: Upstream, host_services: Listener
) -> None:
    gateway_port = gateway.client.server.port
    assert gateway_port is not None
    loopback_port = await host_services.listen("127.0.0.1")
    # The host's end of the upstream's link: a public-looking address that is the host's own.
    host_public_port = await host_services.listen(HOST_SIDE)
    sandbox = await gateway.create(network=True)
    sid = sandbox["id"]
    upstream_host = upstream.url.removeprefix("http://")

    net = await gateway.exec(sid, command="ls /sys/class/net")
    assert net["stdout"].split() == ["eth0", "lo"], net
    results = await _probe(
        gateway, sid,
        direct=[f"10.0.2.2:{gateway_port}", f"10.0.2.2:{loopback_port}", "10.0.2.3:53", "192.168.1.1:80",
                f"[fec0::2]:{gateway_port}", upstream_host],
        proxied=[f"127.0.0.1:{loopback_port}", f"localhost:{gateway_port}", f"10.0.2.2:{gateway_port}",
                 "192.168.1.1:80", "169.254.169.254:80", "[fd00::1]:80", f"[::ffff:127.0.0.1]:{loopback_port}",
                 f"{HOST_SIDE}:{host_public_port}", upstream_host],
        fetches=[f"{upstream.url}/hello", f"{upstream.url}/bytes/3000000", "http://169.254.169.254/latest/meta-data/"],
    )
    # (a, b) Nothing but the proxy's address is reachable directly: not the gateway through
    # 10.0.2.2 (or slirp's IPv6 alias of the host), not a host loopback service, not slirp's DNS,
    # not a private or a public address.
    for target, outcome in results["direct"].items():
        assert outcome.startswith("failed"), f"the guest connected to {target} directly: {results}"
    # The proxy refuses the gateway's host (by loopback, name, slirp's alias, or its own public
    # address), private, link-local (the metadata address), ULA and IPv4-mapped loopback (every
    # refused range: tests/gateway/test_egress.py).
    refused = {t: s for t, s in results["proxied"].items() if t != upstream_host}
    for target, status in refused.items():
        assert status.startswith("HTTP/1.1 403"), f"the proxy let {target} through: {status}"
    assert host_services.accepted == 0, "a host service got a connection from the sandbox"
    assert results["env"] == f"http://{egress.PROXY_ADDRESS}:{egress.PROXY_PORT}", "processes get the proxy"
    # (c) A public address is reachable through the proxy: CONNECT, and plain HTTP as the guest's
    # tools send it, several connections at once.
    assert results["proxied"][upstream_host] == "HTTP/1.1 200 Connection established"
    fetched = results["fetched"]
    assert fetched[f"{upstream.url}/hello"] == f"hello from {ADDRESS}\n"
    assert fetched[f"{upstream.url}/bytes/3000000"] == 3000000
    assert "403" in fetched["http://169.254.169.254/latest/meta-data/"], fetched
    # A tool that is not Python finds the proxy in its environment too (busybox wget, as curl would).
    wget = await gateway.exec(sid, command=["wget", "-q", "-O", "-", f"{upstream.url}/hello"])
    assert wget["stdout"] == f"hello from {ADDRESS}\n", wget
    vm = gateway.client.app[MANAGER]._sandboxes[sid].backend.vm
    resp = await gateway.client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 204
    assert not vm.workdir.exists(), "the VM's folder, its egress socket with it, is gone"
    assert _helpers_running() == [], "a guestfwd helper outlived its connection"


async def test_a_gateway_sigkill_leaves_nothing_running(tmp_path: Path, upstream: Upstream) -> None:
    """A real gateway (`sandgate serve`) with a network sandbox holding a connection through the
    proxy is SIGKILLed: QEMU dies with it (its parent-death signal) and no helper is left."""
    port = _free_port()
    config = tmp_path / "sandgate.toml"
    config.write_text(f'api_keys = "{KEY}:tenant-a"\ndefault_runtime = "microvm"\n'
                      '[plugins]\nblocked = ["wasm", "pod"]\n[runtimes.microvm]\npool_size = 0\n')
    # Its own state folder (what a dead gateway leaves goes there), short: a Unix socket's path is.
    state = Path(tempfile.mkdtemp(prefix="sg-"))
    env = {**os.environ, "SANDGATE_STATE_DIR": str(state)}
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), "--port", str(port),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        assert gateway.stdout is not None
        line = await gateway.stdout.readline()
        assert b"Running on" in line, line
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v1/sandboxes", json={"network": True}, headers=AUTH) as resp:
                assert resp.status == 201, await resp.text()
                sid = (await resp.json())["id"]
            ws = WsClient(await session.ws_connect(f"{url}/v1/sandboxes/{sid}/ws", protocols=(MSGPACK,),
                                                   headers=AUTH), MSGPACK)
            rid = await ws.send("exec.start", command=["python3", "-c", HOLD, upstream.url.removeprefix("http://")])
            stdout = b""
            while b"\n" not in stdout:
                message = await ws.receive_for(rid)
                assert message.get("ev") != "end" and "error" not in message, message
                if message.get("ev") == "data":
                    stdout += message["data"]
            assert stdout == b"HTTP/1.1 200 Connection established\n", "a connection is held through the proxy"
            (qemu,) = _children(gateway.pid)
            qemu_exit = os.pidfd_open(qemu)
            gateway.kill()
            await gateway.wait()
            await ws.ws.close()
        readable, _, _ = await asyncio.to_thread(select.select, [qemu_exit], [], [], 60)
        os.close(qemu_exit)
        assert readable, "QEMU outlived the gateway"
        assert _helpers_running() == [], "a guestfwd helper outlived the gateway"
    finally:
        if gateway.returncode is None:
            gateway.kill()
            await gateway.wait()
        shutil.rmtree(state, ignore_errors=True)


def test_a_helper_with_no_gateway_exits_and_closes_the_connection(tmp_path: Path) -> None:
    """What a guest connection meets after a gateway SIGKILL: the listener's socket file, bound by
    no one. The helper must not hang or write anything into the connection."""
    stale = tmp_path / "egress.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound:
        bound.bind(str(stale))
    guest, helper_end = socket.socketpair()
    with guest, helper_end:
        done = subprocess.run([sys.executable, "-I", "-S", str(egress.HELPER), str(stale)], stdin=helper_end,
                              stdout=helper_end, stderr=helper_end, timeout=60, check=False)
        helper_end.close()
        assert done.returncode == 1
        guest.settimeout(60)
        assert guest.recv(100) == b"", "the guest's connection ends, with nothing written into it"


async def test_an_operator_can_forbid_a_tenant_the_network(gateway: Gateway) -> None:
    for _ in range(2):
        resp = await gateway.client.post("/v1/sandboxes", json={"network": True}, headers=OTHER_AUTH)
        assert resp.status == 403
        error = (await resp.json())["error"]
        assert error["code"] == "forbidden" and "network" in error["message"], error
    listed = await (await gateway.client.get("/v1/sandboxes", headers=OTHER_AUTH)).json()
    assert listed["sandboxes"] == [], "a refused create made no sandbox"
    # The same tenant may still have a sandbox without a network.
    sandbox = await gateway.create(headers=OTHER_AUTH)
    assert sandbox["network"] == "none"


def test_the_network_setting_is_checked_at_start(tmp_path: Path) -> None:
    config = tmp_path / "sandgate.toml"
    config.write_text('[network]\nallowed = false\ntenants = { trusted = true }\n')
    network = load_settings(config, env={}).network
    assert (network.allows("trusted"), network.allows("anyone")) == (True, False)
    for bad, message in (('[network]\nalowed = false\n', "did you mean 'allowed'"),
                         ('[network]\ntenants = { a = "no" }\n', "tenants.a must be true or false")):
        config.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_settings(config, env={})
