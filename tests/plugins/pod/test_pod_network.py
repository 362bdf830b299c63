"""A pod sandbox's network, for real: pods of the local test cluster (a real kube-apiserver, the test
kubelet) fetch through the gateway's policy proxy with python3's urllib, the way pip or requests
would, from the HTTPS_PROXY their agent was given.

The test kubelet runs pods in the host's network namespace and enforces no NetworkPolicy
(tests/kube/kubelet.py), so what keeps a real pod from going around the proxy is checked as the
API server stores it (the deny-all and the egress policy: the gateway pods' port and nothing else),
and what the proxy does is checked end to end: the allowlisted name answers, another name and a raw
address are refused, a secret's placeholder is filled in for its host only (the upstream records
the value, the pod never sees it), credentials that are not the sandbox's get 407, a policy change
applies at once and is kept on the pod; a replica that adopts the sandbox serves it with the same
policy and secrets, and a replica that does not hold it says so.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.config import Limits, NetworkAccess, Settings
from gateway.egress import proxy
from gateway.egress.network import Egress
from gateway.egress.policy import NetworkPolicy
from gateway.egress.secrets import Secrets
from gateway.runtime.base import SandboxSpec
from gateway.testing.conformance import AUTH, KEY, Gateway
from gateway.web.app import MANAGER, create_app
from plugins.pod import egress
from plugins.pod import manifests as m
from plugins.pod.runtime import PodBackend, PodRuntime
from tests.kube.cluster import KubeCluster
from tests.net.upstream import ADDRESS, API, OTHER, OTHER_ADDRESS, PORT, TLS_PORT, Upstream
from tests.plugins.pod.test_pod_lifecycle import KEY as PROCESS_KEY
from tests.plugins.pod.test_pod_lifecycle import gateway_process, kill, pods

pytestmark = pytest.mark.pod

VALUE = "sk-the-real-value-4f1d"
SECRETS = [{"env": "API_TOKEN", "value": VALUE, "hosts": [API]}]

#: Run in the pod: each fetch's outcome through the proxy in the environment (urllib, as pip and
#: requests do it: CONNECT for https://, an absolute URI for http://), with or without the secret's
#: placeholder in an Authorization header; then CONNECTs with no, wrong and right credentials.
PROBE = r"""
import base64, json, os, socket, sys, urllib.error, urllib.request
from urllib.parse import urlsplit

out = {"env": {k: os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                                              "NO_PROXY", "no_proxy", "API_TOKEN")},
       "fetched": {}, "connect": {}}
for name, url, with_secret in json.loads(sys.argv[1]):
    headers = {"Authorization": "Bearer " + os.environ["API_TOKEN"]} if with_secret else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            out["fetched"][name] = resp.read().decode()
    except urllib.error.HTTPError as exc:
        out["fetched"][name] = "HTTP %d %s" % (exc.code, exc.read().decode())
    except Exception as exc:
        out["fetched"][name] = "failed: %r" % (exc,)

proxy = urlsplit(os.environ["HTTPS_PROXY"])
for name, user_password in (("none", None), ("wrong", proxy.username + ":not-the-token"),
                            ("right", proxy.username + ":" + proxy.password)):
    head = "CONNECT api.sgtest.example:8443 HTTP/1.1\r\nHost: api.sgtest.example:8443\r\n"
    if user_password:
        head += "Proxy-Authorization: Basic %s\r\n" % base64.b64encode(user_password.encode()).decode()
    with socket.create_connection((proxy.hostname, proxy.port), timeout=30) as s:
        s.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    out["connect"][name] = answer.decode("latin-1").split("\r\n\r\n")[0].split("\r\n")
print(json.dumps(out))
"""

API_HTTPS = f"https://{API}:{TLS_PORT}"
API_HTTP = f"http://{API}:{PORT}"


def gateway_settings(pod_config: dict[str, Any], upstream: Upstream, **pod: Any) -> Settings:
    assert upstream.ca is not None
    return Settings(api_keys={KEY: "tenant-a"}, limits=Limits(exec_timeout_s=90.0), reap_interval_s=3600.0,
                    blocked_plugins=("wasm", "microvm"), default_runtime="pod",
                    network=NetworkAccess(nameservers=(upstream.nameserver,),
                                          upstream_ca_file=str(upstream.ca.ca_file)),
                    runtimes={"pod": {**pod_config, **pod}})


async def probe(gateway: Gateway, sid: str, fetches: list[tuple[str, str, bool]]) -> dict[str, Any]:
    done = await gateway.exec(sid, command=["python3", "-c", PROBE, json.dumps(fetches)], timeout=90)
    assert done["exit_code"] == 0, done
    return json.loads(done["stdout"])  # type: ignore[no-any-return]


def echoed(body: str) -> dict[str, Any]:
    """What the upstream's /echo says it received (as the pod saw the answer)."""
    return json.loads(body)  # type: ignore[no-any-return]


def secret_of(kube_cluster: KubeCluster, ns: str, name: str) -> dict[str, Any]:
    return kube_cluster.api("GET", f"/api/v1/namespaces/{ns}/secrets/{name}")  # type: ignore[no-any-return]


def secret_gone(kube_cluster: KubeCluster, ns: str, name: str) -> bool:
    import urllib.error

    try:
        secret_of(kube_cluster, ns, name)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code == 404
    return False


async def test_a_pod_reaches_its_allowlist_through_the_proxy_with_its_secret_filled_in(
    aiohttp_client: Callable[..., Awaitable[Any]], pod_config: dict[str, Any], egress_upstream: Upstream,
    kube_cluster: KubeCluster, kube_namespace: str,
) -> None:
    ns, upstream = kube_namespace, egress_upstream
    seen = len(upstream.received())  # (the upstream serves the whole test session)
    client = await aiohttp_client(create_app(gateway_settings(pod_config, upstream, pool_size=1)))
    gateway = Gateway(client, "pod", {})
    manager = client.app[MANAGER]
    runtime = manager.runtimes["pod"]
    assert isinstance(runtime, PodRuntime) and runtime.pool is not None and runtime.listener is not None
    await asyncio.wait_for(runtime.pool.wait_full(), 60)
    [pooled] = pods(kube_cluster, ns)
    assert pooled["metadata"]["labels"][m.POOL] == "true" and m.NETWORK not in pooled["metadata"]["labels"], \
        "a warm pod is not selected by the egress policy"

    sandbox = await gateway.create(network={"allow": [API]}, secrets=SECRETS)
    sid = sandbox["id"]
    [pod] = pods(kube_cluster, ns, f"{m.SANDBOX_ID}={m.label_value(sid)}")
    assert pod["metadata"]["name"] == pooled["metadata"]["name"], "a network sandbox is handed out from the pool"
    backend = manager.get("tenant-a", sid).backend
    assert isinstance(backend, PodBackend)

    # What keeps a real pod on this path, as the API server stores it: every sandbox pod isolated
    # both ways, and network sandboxes let out to the gateway pods' egress port only, no DNS.
    stored = {p["metadata"]["name"]: p["spec"] for p in kube_cluster.api(
        "GET", f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies")["items"]}
    assert sorted(stored) == [m.DENY_POLICY, m.EGRESS_POLICY]
    assert stored[m.DENY_POLICY]["policyTypes"] == ["Ingress", "Egress"]
    assert stored[m.DENY_POLICY]["podSelector"]["matchLabels"] == {m.MANAGED_BY: "sandgate", m.COMPONENT: "sandbox"}
    assert stored[m.EGRESS_POLICY] == {
        "podSelector": {"matchLabels": {m.MANAGED_BY: "sandgate", m.COMPONENT: "sandbox", m.NETWORK: "true"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"podSelector": {"matchLabels": dict(runtime.settings.egress_gateway_labels)}}],
                    "ports": [{"protocol": "TCP", "port": runtime.listener.port}]}]}
    meta = pod["metadata"]
    assert meta["labels"][m.NETWORK] == "true", "the claim's labels put the pod under the egress policy"
    assert json.loads(meta["annotations"][m.NETWORK_POLICY]) == {"allow": [API], "deny": []}
    assert pod["spec"]["dnsPolicy"] == "None" and pod["spec"]["dnsConfig"]["nameservers"] == ["127.0.0.1"]
    assert VALUE not in json.dumps(pod), "no secret value in the pod's labels, annotations or spec"
    secret = secret_of(kube_cluster, ns, meta["annotations"][m.SECRETS])
    assert secret["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                                      "uid": meta["uid"]}]
    assert VALUE.encode() in base64.b64decode(secret["data"][egress.SECRETS_KEY])

    results = await probe(gateway, sid, [
        ("raw api address", f"http://{ADDRESS}:{PORT}/hello", False),  # before the name was resolved
        ("echo", f"{API_HTTPS}/echo", True),
        ("hello", f"{API_HTTP}/hello", False),
        ("other", f"https://{OTHER}:{TLS_PORT}/hello", False),
        ("other plain", f"http://{OTHER}:{PORT}/hello", False),
        ("raw other address", f"https://{OTHER_ADDRESS}:{TLS_PORT}/hello", False),
    ])
    env, fetched, connect = results["env"], results["fetched"], results["connect"]
    url = f"http://{sid}:{backend.proxy_token}@127.0.0.1:{runtime.listener.port}"
    assert {env[k] for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")} == {url}, env
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1"
    placeholder = env["API_TOKEN"]
    assert placeholder.startswith("sandgate-secret-")
    # The allowlisted name answers, over TLS the proxy intercepts for the secret's host: the pod
    # trusts the sandbox's CA, the upstream gets the value, the pod sees its placeholder echoed back.
    assert echoed(fetched["echo"])["headers"]["Authorization"] == f"Bearer {placeholder}", fetched
    [received] = [r for r in upstream.received()[seen:] if r["headers"].get("Authorization") == f"Bearer {VALUE}"]
    assert received["tls"] and received["address"] == ADDRESS
    assert fetched["hello"] == f"hello from {ADDRESS}\n"
    # Another name, and addresses the sandbox did not resolve from an allowed name, are refused.
    assert fetched["raw api address"].startswith("HTTP 403") and "not in the allow list" in fetched["raw api address"]
    assert fetched["other plain"].startswith("HTTP 403") and "not in the allow list" in fetched["other plain"]
    for name in ("other", "raw other address"):
        assert "Tunnel connection failed: 403" in fetched[name], fetched
    assert VALUE not in json.dumps(results), "the pod never sees the value"
    # Credentials that are not the sandbox's reach nothing: 407, with the challenge a client needs.
    for name in ("none", "wrong"):
        assert connect[name][0].startswith("HTTP/1.1 407"), connect
        assert 'proxy-authenticate: Basic realm="sandgate egress"' in connect[name], connect
    assert connect["right"][0] == "HTTP/1.1 200 Connection established"

    described = await (await client.get(f"/v1/sandboxes/{sid}/network", headers=AUTH)).json()
    # (Four fetches above, and the CONNECT with the right credentials that sent no TLS after it.)
    assert described["metrics"]["refusals"] == 5 and VALUE not in json.dumps(described), described
    assert {r["target"] for r in described["recent_refusals"]} >= {f"{OTHER}:{TLS_PORT}", f"{OTHER_ADDRESS}:{TLS_PORT}"}

    # A policy change applies at once, and is kept on the pod for a replica that adopts it later.
    resp = await client.patch(f"/v1/sandboxes/{sid}", json={"network": {"allow": [API, OTHER]}}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    changed = kube_cluster.api("GET", f"/api/v1/namespaces/{ns}/pods/{meta['name']}")
    assert json.loads(changed["metadata"]["annotations"][m.NETWORK_POLICY]) == {"allow": [API, OTHER], "deny": []}
    after = await probe(gateway, sid, [
        ("other", f"http://{OTHER}:{PORT}/hello", False),
        ("placeholder to other", f"http://{OTHER}:{PORT}/echo", True),
    ])
    assert after["fetched"]["other"] == f"hello from {OTHER_ADDRESS}\n", after
    leak = after["fetched"]["placeholder to other"]
    assert leak.startswith("HTTP 403") and "API_TOKEN" in leak and "bound to" in leak, leak
    assert not [r for r in upstream.received()[seen:] if r["address"] == OTHER_ADDRESS], "the placeholder went nowhere"

    resp = await client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 204
    assert secret_gone(kube_cluster, ns, meta["annotations"][m.SECRETS]), "the secrets went with the sandbox"


async def test_a_replica_that_adopts_the_sandbox_serves_its_network_and_another_says_it_does_not_hold_it(
    aiohttp_client: Callable[..., Awaitable[Any]], pod_config: dict[str, Any], egress_upstream: Upstream,
    kube_cluster: KubeCluster, kube_namespace: str, tmp_path: Path,
) -> None:
    """Gateway A (its own process) makes a network sandbox with a secret, cold; gateway B, up at the
    same time, refuses the sandbox's proxy credentials (407: it does not hold the sandbox); A dies;
    B adopts the sandbox on its next request and serves it with the policy and the secret kept on
    the pod, at B's own address and with a new token."""
    upstream = egress_upstream
    assert upstream.ca is not None
    ns = kube_namespace
    seen = len(upstream.received())  # (the upstream serves the whole test session)
    network = {"nameservers": [upstream.nameserver], "upstream_ca_file": str(upstream.ca.ca_file)}
    with gateway_process(tmp_path, pod_config, network) as a:
        sandbox = a.call(PROCESS_KEY, "POST", "/v1/sandboxes",
                         {"runtime": "pod", "network": {"allow": [API]}, "secrets": SECRETS})
        sid = sandbox["id"]
        done = a.call(PROCESS_KEY, "POST", f"/v1/sandboxes/{sid}/exec",
                      {"command": ["python3", "-c", PROBE, json.dumps([("echo", f"{API_HTTPS}/echo", True)])],
                       "timeout": 90})
        before = json.loads(done["stdout"])
        placeholder = before["env"]["API_TOKEN"]
        assert echoed(before["fetched"]["echo"])["headers"]["Authorization"] == f"Bearer {placeholder}", before
        a_url = urlsplit(before["env"]["HTTPS_PROXY"])

        client = await aiohttp_client(create_app(gateway_settings(pod_config, upstream)))
        b = Gateway(client, "pod", {})
        b_runtime = client.app[MANAGER].runtimes["pod"]
        assert isinstance(b_runtime, PodRuntime) and b_runtime.listener is not None
        assert a_url.port != b_runtime.listener.port
        # The sandbox's credentials at B, which does not hold it: refused, saying why.
        reader, writer = await asyncio.open_connection("127.0.0.1", b_runtime.listener.port)
        auth = base64.b64encode(f"{a_url.username}:{a_url.password}".encode()).decode()
        writer.write(f"CONNECT {API}:{TLS_PORT} HTTP/1.1\r\nHost: {API}:{TLS_PORT}\r\n"
                     f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        answer = (await reader.read()).decode()
        writer.close()
        await writer.wait_closed()
        assert answer.startswith("HTTP/1.1 407") and egress.NOT_HERE in answer, answer
        kill(a)

    [pod] = pods(kube_cluster, ns)
    secret = pod["metadata"]["annotations"][m.SECRETS]
    # B's first request for the sandbox adopts it (SandboxManager.lookup -> PodRuntime.load_state),
    # and guest.env gives the new agent B's proxy, with the same placeholder.
    after = await probe(b, sid, [("echo", f"{API_HTTPS}/echo", True), ("other", f"http://{OTHER}:{PORT}/hello", False)])
    adopted = client.app[MANAGER].get("tenant-a", sid).backend
    assert isinstance(adopted, PodBackend) and adopted.proxy_token != a_url.password
    assert after["env"]["HTTPS_PROXY"] == f"http://{sid}:{adopted.proxy_token}@127.0.0.1:{b_runtime.listener.port}"
    assert after["env"]["API_TOKEN"] == placeholder, "the guest's placeholders stay valid"
    assert echoed(after["fetched"]["echo"])["headers"]["Authorization"] == f"Bearer {placeholder}", after
    filled = [r for r in upstream.received()[seen:] if r["headers"].get("Authorization") == f"Bearer {VALUE}"]
    assert [r["address"] for r in filled] == [ADDRESS, ADDRESS], "A filled the secret in, then B"
    assert after["fetched"]["other"].startswith("HTTP 403"), "the policy came along"
    assert after["connect"]["right"][0] == "HTTP/1.1 200 Connection established"

    resp = await client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 204
    assert pods(kube_cluster, ns) == [] and secret_gone(kube_cluster, ns, secret)


async def test_the_listener_bounds_each_sandboxs_connections_and_its_own(
    egress_upstream: Upstream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sandbox cannot hold more than MAX_PER_SANDBOX connections through its replica's proxy (429
    past it, until one closes), and the listener closes connections past MAX_OPEN at once, whoever's
    (one that has not said whose it is yet costs a task and a socket for up to 30 s)."""
    monkeypatch.setattr(egress, "MAX_PER_SANDBOX", 3)
    monkeypatch.setattr(egress, "MAX_OPEN", 5)
    ended: asyncio.Queue[None] = asyncio.Queue()
    handle = proxy.handle

    async def handle_and_say(*args: Any) -> None:
        try:
            await handle(*args)
        finally:
            ended.put_nowait(None)  # the listener counts the connection out before it next waits

    monkeypatch.setattr(proxy, "handle", handle_and_say)
    listener = egress.ProxyListener("127.0.0.1", 0)
    port = await listener.start()
    network = Egress().attach("sb_bounded", "tenant-a", NetworkPolicy.parse("public"), Secrets())
    holder = PodBackend.__new__(PodBackend)  # only its token and network are read
    holder.proxy_token = egress.new_token()
    holder.spec = SandboxSpec(sandbox_id="sb_bounded", tenant="tenant-a", memory_mb=256, cpu_seconds=60,
                              disk_mb=512, network=True, egress=network)
    listener.hold("sb_bounded", holder)
    auth = base64.b64encode(f"sb_bounded:{holder.proxy_token}".encode()).decode()

    async def tunnel() -> tuple[str, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"CONNECT {ADDRESS}:{PORT} HTTP/1.1\r\nHost: {ADDRESS}:{PORT}\r\n"
                     f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        return (await reader.readuntil(b"\r\n")).decode().strip(), writer

    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3):
            status, writer = await tunnel()
            writers.append(writer)
            assert status == "HTTP/1.1 200 Connection established"
        refused, writer = await tunnel()
        writers.append(writer)
        assert refused.startswith("HTTP/1.1 429"), refused
        await ended.get()
        writers[0].close()  # one tunnel ends: the sandbox may open another
        await ended.get()
        status, writer = await tunnel()
        writers.append(writer)
        assert status == "HTTP/1.1 200 Connection established"
        # Three tunnels and two silent connections fill MAX_OPEN; the next is closed unanswered.
        # (The listener takes connections in the order they came, so the silent two count first.)
        for _ in range(2):
            writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        assert await reader.read() == b"" and listener.overflowed == 1
    finally:
        for writer in writers:
            writer.close()
        await listener.close()


async def test_no_network_means_no_proxy_and_no_listener_means_no_network(
    aiohttp_client: Callable[..., Awaitable[Any]], pod_config: dict[str, Any], egress_upstream: Upstream,
    kube_cluster: KubeCluster, kube_namespace: str,
) -> None:
    """A sandbox with "none" is not under the egress policy and its processes are told of no proxy; a
    gateway without `egress_listen` refuses a network at create, before anything is made."""
    client = await aiohttp_client(create_app(gateway_settings(pod_config, egress_upstream)))
    sid = (await Gateway(client, "pod", {}).create())["id"]
    [pod] = pods(kube_cluster, kube_namespace)
    assert pod["metadata"]["labels"][m.NETWORK] == "false" and m.NETWORK_POLICY not in pod["metadata"]["annotations"]
    done = await Gateway(client, "pod", {}).exec(sid, command="env")
    assert "PROXY" not in done["stdout"].upper(), done
    assert (await client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)).status == 204

    no_egress = {k: v for k, v in pod_config.items() if k != "egress_listen"}
    other = await aiohttp_client(create_app(gateway_settings(no_egress, egress_upstream)))
    resp = await other.post("/v1/sandboxes", json={"runtime": "pod", "network": {"allow": [API]}}, headers=AUTH)
    error = (await resp.json())["error"]
    assert resp.status == 501 and error["code"] == "unsupported" and "egress_listen" in error["message"], error
    assert pods(kube_cluster, kube_namespace) == []
