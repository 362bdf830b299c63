"""The pod runtime's own promises, against the local test cluster (real kube-apiserver 1.20, the test
kubelet): hardened pods and their NetworkPolicies, stdin and files through the gateway, a second
gateway adopting a sandbox the first made, orphans of a dead gateway removed at start, fail-fast
creates, the warm pool, and agent-sandbox `Sandbox` resources."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import os
import signal
import urllib.error
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.protocol.client import MSGPACK
from gateway.runtime.agent_client import AgentClient
from gateway.runtime.base import SandboxSpec
from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures, output
from guest_agent.wire import ProtocolError
from plugins.pod import manifests as m
from plugins.pod.channel import StreamChannel
from plugins.pod.kube import Kube
from plugins.pod.runtime import PodBackend, PodRuntime
from tests.kube.cluster import KubeCluster
from tests.serving import Served, serve

pytestmark = pytest.mark.pod

KEY = "pod-test-key"
CRD = Path(__file__).with_name("agent_sandbox_crd.yaml")


def pods(cluster: KubeCluster, ns: str, selector: str = m.SANDBOX_SELECTOR) -> list[dict[str, Any]]:
    return list(cluster.api("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector={selector}")["items"])


def policies(cluster: KubeCluster, ns: str) -> list[str]:
    items = cluster.api("GET", f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies")["items"]
    return sorted(p["metadata"]["name"] for p in items)


def spec_for(sandbox_id: str, **fields: Any) -> SandboxSpec:
    values: dict[str, Any] = {"sandbox_id": sandbox_id, "tenant": "tenant-a", "memory_mb": 256,
                              "cpu_seconds": 60.0, "disk_mb": 512, **fields}
    return SandboxSpec(**values)


@asynccontextmanager
async def pod_runtime(config: dict[str, Any]) -> AsyncIterator[PodRuntime]:
    runtime = PodRuntime(config)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def run_python(agent: AgentClient, code: str) -> tuple[bytes, bytes]:
    events = [e async for e in await agent.stream("exec.start", exec_id=f"t{id(code)}", language="python", code=code)]
    return output(events), output(events, "stderr")


@contextmanager
def gateway_process(tmp_path: Path, config: dict[str, Any], network: dict[str, Any] | None = None) -> Iterator[Served]:
    """`sandgate serve` with the pod runtime as the only runtime, in its own process (so a test can
    kill it the way a node failure or an OOM kill would); `network`: its `[network]` table."""
    lines = [f'api_keys = "{KEY}:tenant-a"', 'default_runtime = "pod"']
    if network:
        lines += ["[network]", *(f"{k} = {json.dumps(v)}" for k, v in network.items())]
    lines.append("[runtimes.pod]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for name, table in config.items():
        if isinstance(table, dict):
            lines.append(f"[runtimes.pod.{name}]")
            lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in table.items()]
    path = tmp_path / "sandgate.toml"
    path.write_text("\n".join(lines) + "\n")
    with serve({**os.environ, "SANDGATE_BLOCKED_PLUGINS": "wasm,microvm"}, "--config", str(path)) as served:
        yield served


def kill(served: Served) -> None:
    served.proc.send_signal(signal.SIGKILL)
    served.proc.wait(30)


class TestThroughTheGateway(GatewayFixtures):
    runtime = "pod"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = pod_config

    async def test_hardened_pod_stdin_files_and_destroy(self, gateway: Gateway, kube_cluster: KubeCluster,
                                                        kube_namespace: str) -> None:
        ns = kube_namespace
        # A sandbox image without the agent (the init container brings it) that asks for network.
        sandbox = await gateway.create(template="plain-python", network=True, memory_mb=300, disk_mb=200)
        sid = sandbox["id"]
        [pod] = pods(kube_cluster, ns, f"{m.SANDBOX_ID}={m.label_value(sid)}")
        meta, spec = pod["metadata"], pod["spec"]
        assert meta["labels"][m.MANAGED_BY] == "sandgate" and meta["labels"][m.TENANT] == "tenant-a"
        assert meta["annotations"][m.SANDBOX_ID] == sid and m.EXPIRES_AT in meta["annotations"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        [main] = spec["containers"]
        assert main["image"] == "docker.io/library/python:3.11-slim"
        assert main["securityContext"]["allowPrivilegeEscalation"] is False
        assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        assert main["resources"]["limits"]["memory"] == "300Mi"
        assert {v["name"]: v["emptyDir"].get("sizeLimit") for v in spec["volumes"]}["work"] == "200Mi"
        assert [c["name"] for c in spec["initContainers"]] == ["install-agent"]
        assert policies(kube_cluster, ns) == [m.DENY_POLICY, m.EGRESS_POLICY], "namespace-wide: none per sandbox"
        assert meta["labels"][m.NETWORK] == "true" and json.loads(meta["annotations"][m.NETWORK_POLICY]) == "public"

        done = await gateway.exec(sid, command="id -u; touch /outside 2>/dev/null || echo read-only; pwd")
        assert done["stdout"] == "10001\nread-only\n/work\n", done

        ws = await gateway.ws(sid, MSGPACK)
        request_id = await ws.send("exec.start", exec_id="upper", language="python", stdin_open=True,
                                   code="import sys\nfor line in sys.stdin:\n    print(line.strip().upper())")
        assert (await ws.receive_for(request_id))["ev"] == "start"
        await ws.call("exec.input", exec_id="upper", data=b"first\n")
        await ws.call("exec.input", exec_id="upper", data=b"second\n")
        await ws.call("exec.close_stdin", exec_id="upper")
        events = await ws.collect(request_id)
        assert output(events) == b"FIRST\nSECOND\n" and events[-1]["exit_code"] == 0

        blob = os.urandom(700_000)
        resp = await gateway.client.put(f"/v1/sandboxes/{sid}/files/data/blob.bin", data=io.BytesIO(blob),
                                        headers=AUTH)
        assert resp.status == 201, await resp.text()
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files/data/blob.bin", headers=AUTH)
        assert await resp.read() == blob

        resp = await gateway.client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
        assert resp.status == 204
        # destroy returned after the watch saw the pod go: nothing of it is left in the API.
        assert pods(kube_cluster, ns) == []
        assert policies(kube_cluster, ns) == [m.DENY_POLICY, m.EGRESS_POLICY]

    async def test_a_pod_that_cannot_start_fails_fast(self, gateway: Gateway, kube_cluster: KubeCluster,
                                                      kube_namespace: str) -> None:
        # ready_timeout_s is 60; an image the kubelet cannot pull must fail long before that.
        started = asyncio.get_running_loop().time()
        resp = await gateway.client.post("/v1/sandboxes", json={"runtime": "pod", "template": "missing"},
                                         headers=AUTH)
        error = (await resp.json())["error"]
        assert resp.status == 503 and error["code"] == "unavailable", error
        assert "ImagePullBackOff" in error["message"], error
        assert asyncio.get_running_loop().time() - started < 30
        assert pods(kube_cluster, kube_namespace) == [], "a failed create leaves nothing behind"


    async def test_a_killed_agent_is_replaced(self, gateway: Gateway) -> None:
        """exec channel: the agent's death ends the exec with guest_died; the gateway asks the
        runtime for a new agent (a fresh exec in the same pod) and the files are still there."""
        sid = (await gateway.create())["id"]
        await gateway.exec(sid, command="echo kept > file.txt")
        done = await gateway.exec(sid, command="kill -KILL $PPID; sleep 30")
        assert done["error"]["code"] == "guest_died", done
        after = await gateway.exec(sid, command="cat file.txt")
        assert after["stdout"] == "kept\n", after
        metrics = await (await gateway.client.get(f"/v1/sandboxes/{sid}/metrics", headers=AUTH)).json()
        assert metrics["restarts"] == 1 and metrics["host"]["channel"] == "exec"


class TestAttachAgentDeath(GatewayFixtures):
    runtime = "pod"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = {**pod_config, "channel": "attach"}

    async def test_the_agent_is_the_container(self, gateway: Gateway) -> None:
        """attach channel: the agent is PID 1, so its death ends the container (restartPolicy
        Never) and the sandbox fails with the pod's reason instead of getting a new agent."""
        sid = (await gateway.create())["id"]
        # (A process in the sandbox cannot kill the agent: PID 1 ignores signals from its own
        # PID namespace. The agent's own interpreter can end it.)
        done = await gateway.exec(sid, language="python", code="import os; os._exit(3)")
        assert done["error"]["code"] == "guest_died", done
        resp = await gateway.client.post(f"/v1/sandboxes/{sid}/exec", json={"command": "true"}, headers=AUTH)
        error = (await resp.json())["error"]
        assert resp.status == 502 and error["code"] == "guest_died", error
        info = await (await gateway.client.get(f"/v1/sandboxes/{sid}", headers=AUTH)).json()
        assert info["state"] == "failed", info


async def test_unschedulable_fails_fast(pod_config: dict[str, Any], kube_cluster: KubeCluster,
                                        kube_namespace: str) -> None:
    async with pod_runtime({**pod_config, "node_selector": {"sandgate.dev/pool": "gpu"}}) as runtime:
        with pytest.raises(ProtocolError) as failed:
            await runtime.create(spec_for("sb_unschedulable"))
    assert failed.value.code == "unavailable" and "unschedulable" in failed.value.message, failed.value
    assert pods(kube_cluster, kube_namespace) == []


@pytest.mark.parametrize("channel", ["exec", "attach"])
async def test_second_gateway_adopts_a_sandbox(channel: str, pod_config: dict[str, Any], tmp_path: Path,
                                               kube_cluster: KubeCluster, kube_namespace: str) -> None:
    """Gateway A (its own process) makes a sandbox and dies without cleaning up; gateway B finds it by
    label, adopts it and talks to its agent. Files survive either way; with attach the agent itself
    does, Python namespace and all."""
    config = {**pod_config, "channel": channel}
    with gateway_process(tmp_path, config) as a:
        sandbox = a.call(KEY, "POST", "/v1/sandboxes", {"runtime": "pod"})
        sid = sandbox["id"]
        a.call(KEY, "POST", f"/v1/sandboxes/{sid}/exec",
               {"language": "python", "code": "x = 41\nopen('note.txt', 'w').write('from A')"})
        kill(a)
    [pod] = pods(kube_cluster, kube_namespace)
    gateway_a = pod["metadata"]["labels"][m.GATEWAY]

    async with pod_runtime(config) as b:
        assert b.settings.gateway_id != gateway_a
        state = await b.find(sid)
        assert state is not None and state["pod"] == pod["metadata"]["name"] and state["tenant"] == "tenant-a"
        assert await b.load_state({**state, "tenant": "tenant-b"}) is None, "adoption checks the tenant"
        backend = await b.load_state(state)
        assert isinstance(backend, PodBackend) and backend.spec is not None and backend.spec.sandbox_id == sid
        agent = AgentClient(backend.channel())
        try:
            await agent.start()
            out, err = await run_python(agent, "print(open('note.txt').read())\nprint(x + 1)")
            assert out.startswith(b"from A\n")
            if channel == "attach":
                assert out == b"from A\n42\n", err
            else:
                assert b"NameError" in err, "exec starts a fresh agent: files stay, the namespace does not"
            [adopted] = pods(kube_cluster, kube_namespace)
            assert adopted["metadata"]["labels"][m.GATEWAY] == b.settings.gateway_id
            assert await b.sweep() == [], "A's Lease is still fresh and the pod is B's now"
        finally:
            await agent.close()
            await backend.destroy()
    assert pods(kube_cluster, kube_namespace) == []


def test_any_replica_serves_any_sandbox(pod_config: dict[str, Any], tmp_path: Path, kube_cluster: KubeCluster,
                                        kube_namespace: str) -> None:
    """Two gateway replicas, both up: a sandbox made through A is used and destroyed through B,
    which finds it by its labels (SandboxManager.lookup -> PodRuntime.find/load_state)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with gateway_process(tmp_path / "a", pod_config) as a, gateway_process(tmp_path / "b", pod_config) as b:
        made = a.call(KEY, "POST", "/v1/sandboxes", {"runtime": "pod", "ttl": 900})
        sid = made["id"]
        a.call(KEY, "POST", f"/v1/sandboxes/{sid}/exec", {"command": "echo made-by-a > note.txt"})
        done = b.call(KEY, "POST", f"/v1/sandboxes/{sid}/exec", {"command": ["cat", "note.txt"]})
        assert done["stdout"] == "made-by-a\n", done
        adopted = b.call(KEY, "GET", f"/v1/sandboxes/{sid}")
        assert adopted["id"] == sid
        assert abs(adopted["expires_at"] - made["expires_at"]) < 5, "adopting never extends a sandbox's life"
        with pytest.raises(urllib.error.HTTPError) as missing:
            b.call(KEY, "GET", "/v1/sandboxes/sb_not-a-sandbox-anywhere")
        missing.value.close()  # the error holds the response's socket
        assert missing.value.code == 404
        assert b.call(KEY, "DELETE", f"/v1/sandboxes/{sid}") is None
    assert pods(kube_cluster, kube_namespace) == []


async def test_orphans_of_a_dead_gateway_are_removed_at_start(pod_config: dict[str, Any], tmp_path: Path,
                                                              kube_cluster: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    with gateway_process(tmp_path, pod_config) as a:
        a.call(KEY, "POST", "/v1/sandboxes", {"runtime": "pod", "network": {"allow": ["api.example.com"]},
                                              "secrets": [{"env": "K", "value": "v", "hosts": ["api.example.com"]}]})
        kill(a)
    [orphan] = pods(kube_cluster, ns)
    secret = orphan["metadata"]["annotations"][m.SECRETS]
    kube_cluster.api("GET", f"/api/v1/namespaces/{ns}/secrets/{secret}")
    leases = kube_cluster.api("GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases")["items"]
    owner = orphan["metadata"]["labels"][m.GATEWAY]
    [lease] = [le for le in leases if le["metadata"]["labels"].get(m.GATEWAY) == owner]
    # What A's Lease looks like an hour after A died (instead of waiting for it to go stale).
    an_hour_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    kube_cluster.api("PATCH", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{lease['metadata']['name']}",
                     {"spec": {"renewTime": m.micro_timestamp(an_hour_ago)}},
                     content_type="application/merge-patch+json")

    async with pod_runtime(pod_config) as b:  # its start sweeps
        kube_cluster.wait_pod(ns, orphan["metadata"]["name"], lambda p: p is None)
        with pytest.raises(urllib.error.HTTPError) as gone:
            kube_cluster.api("GET", f"/api/v1/namespaces/{ns}/secrets/{secret}")
        gone.value.close()
        assert gone.value.code == 404, "the orphan's secrets went with it (no garbage collector runs here)"
        with pytest.raises(urllib.error.HTTPError) as missing:
            kube_cluster.api("GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{lease['metadata']['name']}")
        missing.value.close()
        missing.value.close()  # the error holds the response's socket
        assert missing.value.code == 404

        # A live gateway's sandbox stays, until it is past its expiry annotation.
        mine = await b.create(spec_for("sb_expiring"))
        assert isinstance(mine, PodBackend)
        assert await b.sweep() == []
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=b.settings.max_ttl_s + 60)
        assert await b.sweep(now=later) == [f"pod/{mine.pod}"]
        kube_cluster.wait_pod(ns, mine.pod, lambda p: p is None)
        await mine.destroy()  # already gone: destroy must not mind


async def test_warm_pool_claims_by_relabelling(pod_config: dict[str, Any], kube_cluster: KubeCluster,
                                               kube_namespace: str) -> None:
    async with pod_runtime({**pod_config, "pool_size": 1}) as runtime:
        assert runtime.pool is not None
        await asyncio.wait_for(runtime.pool.wait_full(), 60)
        [pooled] = pods(kube_cluster, kube_namespace)
        assert pooled["metadata"]["labels"][m.POOL] == "true" and m.SANDBOX_ID not in pooled["metadata"]["labels"]
        backend = await runtime.create(spec_for("sb_from_pool"))
        assert isinstance(backend, PodBackend) and backend.pod == pooled["metadata"]["name"]
        claimed = kube_cluster.api("GET", f"/api/v1/namespaces/{kube_namespace}/pods/{backend.pod}")
        assert m.POOL not in claimed["metadata"]["labels"]
        assert claimed["metadata"]["labels"][m.SANDBOX_ID] == "sb_from_pool"
        agent = AgentClient(backend.channel())
        try:
            await agent.start()
            assert (await run_python(agent, "print(6 * 7)"))[0] == b"42\n"
        finally:
            await agent.close()
            await backend.destroy()


async def test_a_create_cancelled_while_it_claims_a_warm_pod_removes_that_pod(
        pod_config: dict[str, Any], kube_cluster: KubeCluster, kube_namespace: str) -> None:
    """Once `create` took a warm pod out of the pool, nothing else holds it (its pod, its agent's
    stream): a create cancelled while it claims the pod (a gateway stopping mid-create) must remove
    it. Before the fix it was dropped: the pod ran on, its stream open, nobody's."""
    async with pod_runtime({**pod_config, "pool_size": 1}) as runtime:
        assert runtime.pool is not None
        await asyncio.wait_for(runtime.pool.wait_full(), 60)
        [warm] = runtime.pool.ready
        with kube_cluster.apiserver_paused():  # the claim waits on the apiserver: cancelled there
            create = asyncio.create_task(runtime.create(spec_for("sb_cancelled_claim")))
            await asyncio.sleep(0)  # one turn: its first step takes the warm pod and sends the claim
            assert runtime.pool.ready == [] and not create.done()
            create.cancel()
        await asyncio.gather(create, return_exceptions=True)
        assert create.cancelled()
        assert warm.pod not in [p["metadata"]["name"] for p in pods(kube_cluster, kube_namespace)]
        channel = warm.channel()
        assert isinstance(channel, StreamChannel) and channel.ws.closed


# -- agent-sandbox ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sandbox_crd(kube_cluster: KubeCluster) -> None:
    """The project's test CRD for agent-sandbox's Sandbox, loaded once and Established."""
    crd = yaml.safe_load(CRD.read_text())
    try:
        kube_cluster.api("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code != 409:
                raise AssertionError(exc.read().decode()) from exc
    kube_cluster.kubectl_run("wait", "--for=condition=Established", "--timeout=60s",
                             f"crd/{crd['metadata']['name']}")


async def play_the_sandbox_controller(kube: Kube, ready: asyncio.Event) -> None:
    """What agent-sandbox's controller does for a new Sandbox, as far as the runtime depends on it:
    a pod from spec.podTemplate, named like the Sandbox and owned by it. (No controller runs in the
    test cluster; this test plays it, from the same watch a controller would use.)"""
    listing = await kube.call(kube.custom.list_namespaced_custom_object, m.SANDBOX_GROUP, m.SANDBOX_VERSION,
                              kube.namespace, m.SANDBOX_PLURAL)
    ready.set()
    async for kind, sandbox in kube.watch(kube.custom.list_namespaced_custom_object, m.SANDBOX_GROUP,
                                          m.SANDBOX_VERSION, kube.namespace, m.SANDBOX_PLURAL,
                                          resource_version=listing["metadata"]["resourceVersion"], timeout_s=120):
        if kind != "ADDED":
            continue
        meta, template = sandbox["metadata"], sandbox["spec"]["podTemplate"]
        await kube.call(kube.core.create_namespaced_pod, kube.namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {**template.get("metadata", {}), "name": meta["name"], "ownerReferences": [{
                "apiVersion": f"{m.SANDBOX_GROUP}/{m.SANDBOX_VERSION}", "kind": "Sandbox", "name": meta["name"],
                "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]},
            "spec": template["spec"]})


class TestAgentSandboxMode(GatewayFixtures):
    runtime = "pod"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any], sandbox_crd: None) -> None:
        self.runtime_config = {**pod_config, "mode": "agent-sandbox"}

    async def test_sandbox_resource_end_to_end(self, gateway: Gateway, kube_cluster: KubeCluster,
                                               kube_namespace: str) -> None:
        ns = kube_namespace
        kube = await Kube.connect(str(kube_cluster.kubeconfig), None, ns)
        ready = asyncio.Event()
        controller = asyncio.create_task(play_the_sandbox_controller(kube, ready))
        try:
            await ready.wait()
            sandbox = await gateway.create()
            path = f"/apis/{m.SANDBOX_GROUP}/{m.SANDBOX_VERSION}/namespaces/{ns}/{m.SANDBOX_PLURAL}"
            [resource] = kube_cluster.api("GET", path)["items"]
            assert resource["metadata"]["annotations"][m.SANDBOX_ID] == sandbox["id"]
            assert resource["spec"]["shutdownPolicy"] == "Delete"
            template = resource["spec"]["podTemplate"]
            assert template["metadata"]["labels"][m.SANDBOX_ID] == m.label_value(sandbox["id"])
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True
            done = await gateway.exec(sandbox["id"], language="python", code="print('in a Sandbox')")
            assert done["stdout"] == "in a Sandbox\n"
            resp = await gateway.client.delete(f"/v1/sandboxes/{sandbox['id']}", headers=AUTH)
            assert resp.status == 204
            assert kube_cluster.api("GET", path)["items"] == [] and pods(kube_cluster, ns) == []
        finally:
            controller.cancel()
            await asyncio.gather(controller, return_exceptions=True)
            await kube.close()

    def test_the_apiserver_validates_what_the_runtime_writes(self, kube_cluster: KubeCluster,
                                                             kube_namespace: str, pod_config: dict[str, Any]) -> None:
        from plugins.pod.settings import PodSettings

        settings = PodSettings.from_config({**pod_config, "mode": "agent-sandbox"})
        now = datetime.datetime.now(datetime.UTC)
        good = m.sandbox_resource(settings, "checked", spec_for("sb_checked"), now, image=settings.agent_image)
        path = f"/apis/{m.SANDBOX_GROUP}/{m.SANDBOX_VERSION}/namespaces/{kube_namespace}/{m.SANDBOX_PLURAL}"
        kube_cluster.api("POST", f"{path}?dryRun=All", good)
        for broken in ({**good, "spec": {"shutdownPolicy": "Delete"}},
                       {**good, "spec": {**good["spec"], "shutdownPolicy": "Sometimes"}}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                kube_cluster.api("POST", f"{path}?dryRun=All", broken)
            refused.value.close()
            assert refused.value.code == 422
