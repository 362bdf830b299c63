"""The local test cluster itself: the real apiserver answers and judges, the test kubelet binds, runs,
streams and kills pods, and the apiserver's exec/attach proxy reaches it (kubernetes_asyncio's
WebSocket client, as the pod runtime uses it)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.stream import WsApiClient

from guest_agent import wire
from tests.kube.cluster import KubeCluster

pytestmark = pytest.mark.pod


def pod_manifest(name: str, command: list[str] | None, *, image: str = "debian:bookworm-slim",
                 stdin: bool = False, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main", "image": image, "stdin": stdin,
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    if command is not None:
        container["command"] = command
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"automountServiceAccountToken": False, "containers": [container], **spec}}


def phase_is(*phases: str) -> Any:
    return lambda pod: pod is not None and pod.get("status", {}).get("phase") in phases


def container_pid(pod: dict[str, Any]) -> int:
    """The host PID of the container's PID 1 (the test kubelet's container ID is bwrap://<pid>)."""
    return int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("bwrap://"))


@asynccontextmanager
async def ws_core(cluster: KubeCluster) -> AsyncIterator[client.CoreV1Api]:
    config = client.Configuration(host=cluster.server, api_key={"BearerToken": cluster.admin_token},
                                  api_key_prefix={"BearerToken": "Bearer"})
    config.ssl_ca_cert = str(cluster.ca_file)
    async with WsApiClient(configuration=config) as api:
        yield client.CoreV1Api(api_client=api)


async def read_channels(ws: aiohttp.ClientWebSocketResponse) -> tuple[dict[int, bytes], dict[str, Any] | None]:
    """Every frame until the server closes: the bytes per channel and the status on channel 3."""
    out: dict[int, bytes] = {}
    async for msg in ws:
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        out[msg.data[0]] = out.get(msg.data[0], b"") + msg.data[1:]
    status = json.loads(out.pop(3)) if out.get(3) else None
    return out, status


def test_apiserver_answers(kube_cluster: KubeCluster) -> None:
    version = json.loads(kube_cluster.kubectl_run("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.20.2"
    assert version["clientVersion"]["gitVersion"] == "v1.20.2"
    nodes = json.loads(kube_cluster.kubectl_run("get", "nodes", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == [kube_cluster.node_name]
    print(f"\nkube-apiserver start to /readyz: {kube_cluster.apiserver_start_seconds:.2f}s")


def test_rbac_judges_service_accounts(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    kube_cluster.create_service_account(ns, "runner")
    token = kube_cluster.service_account_token(ns, "runner")
    assert not kube_cluster.can_i("create", "pods", namespace=ns, subresource="exec", token=token)
    kube_cluster.api("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "exec"},
        "rules": [{"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]}]})
    kube_cluster.api("POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "exec"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "exec"},
        "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": ns}]})
    assert kube_cluster.can_i("create", "pods", namespace=ns, subresource="exec", token=token)
    assert not kube_cluster.can_i("create", "pods", namespace=ns, token=token)
    assert not kube_cluster.can_i("create", "pods", namespace="default", subresource="exec", token=token)


async def test_pod_runs_and_exec_goes_through_the_apiserver(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    created = time.monotonic()
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/pods", pod_manifest(
        "runner", ["sh", "-c", "echo started; exec sleep 3600"], volumes=[{"name": "work", "emptyDir": {}}]))
    pod = kube_cluster.wait_pod(ns, "runner", phase_is("Running"))
    running = time.monotonic() - created
    assert pod is not None and pod["spec"]["nodeName"] == kube_cluster.node_name
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"

    payload = bytes(range(256)) * 64  # binary safe, both ways, and more than one frame's worth
    async with ws_core(kube_cluster) as core:
        rounds = []
        for _ in range(3):
            began = time.monotonic()
            ws = await core.connect_get_namespaced_pod_exec(
                "runner", ns, command=["id", "-u"], stdout=True, stderr=True, stdin=False, tty=False,
                _preload_content=False)
            async with ws as stream:
                out, status = await read_channels(stream)
            rounds.append(time.monotonic() - began)
            assert out.get(1) == b"65532\n" and status == {"metadata": {}, "status": "Success"}, (out, status)

        ws = await core.connect_get_namespaced_pod_exec(
            "runner", ns, command=["sh", "-c", "cat > /tmp/in && cat /tmp/in && echo oops >&2 && exit 3"],
            stdout=True, stderr=True, stdin=True, tty=False, _preload_content=False,
            _headers={"sec-websocket-protocol": "v5.channel.k8s.io"})
        async with ws as stream:  # v5 (kubelets since 1.29, this test kubelet): stdin can be closed
            for at in range(0, len(payload), 5000):
                await stream.send_bytes(b"\x00" + payload[at:at + 5000])
            await stream.send_bytes(b"\xff\x00")  # v5: close stdin
            out, status = await read_channels(stream)
    assert out[1] == payload and out[2] == b"oops\n"
    assert status is not None and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    assert kube_cluster.kubectl_run("logs", "-n", ns, "runner").stdout == b"started\n"
    print(f"\npod create -> Running: {running:.2f}s; exec round trips (id -u): "
          + ", ".join(f"{r * 1000:.0f} ms" for r in rounds))


async def test_attach_reaches_the_agent(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    """The sandgate-agent image rule: the agent on the main container's stdio, reached by attach."""
    ns = kube_namespace
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/pods", pod_manifest(
        "agent", None, image="example.test/sandgate-agent:dev", stdin=True))
    kube_cluster.wait_pod(ns, "agent", phase_is("Running"))
    decoder = wire.FrameDecoder()
    async with ws_core(kube_cluster) as core:
        ws = await core.connect_get_namespaced_pod_attach(
            "agent", ns, container="main", stdin=True, stdout=True, stderr=False, tty=False, _preload_content=False)
        async with ws as stream:
            await stream.send_bytes(b"\x00" + wire.encode_frame(wire.request(0, "hello", version=1)))
            async for msg in stream:
                if msg.data[0] == 1:
                    decoder.receive_data(msg.data[1:])
                    replies = list(decoder.messages_received())
                    if replies:
                        break
    assert replies[0]["id"] == 0 and replies[0]["result"]["version"] == 1, replies


def test_rejected_image_waits_with_a_reason(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/pods",
                     pod_manifest("unpullable", ["true"], image="registry.example/does-not-exist:1"))

    def waiting(pod: dict[str, Any] | None) -> bool:
        statuses = (pod or {}).get("status", {}).get("containerStatuses", [])
        return bool(statuses) and "waiting" in statuses[0]["state"] and \
            statuses[0]["state"]["waiting"]["reason"] == "ImagePullBackOff"

    pod = kube_cluster.wait_pod(ns, "unpullable", waiting)
    assert pod is not None and pod["status"]["phase"] == "Pending"


def test_unschedulable_pod_says_why(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/pods",
                     pod_manifest("nowhere", ["true"], nodeSelector={"example.test/pool": "gpu"}))

    def unschedulable(pod: dict[str, Any] | None) -> bool:
        conditions = (pod or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)

    pod = kube_cluster.wait_pod(ns, "nowhere", unschedulable)
    assert pod is not None and not pod["spec"].get("nodeName")


async def test_deleting_the_pod_kills_its_processes(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    # sleep as PID 1 has no SIGTERM handler, so SIGTERM does nothing: the kubelet must escalate.
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/pods",
                     pod_manifest("doomed", ["sleep", "3601"], terminationGracePeriodSeconds=1))
    pod = kube_cluster.wait_pod(ns, "doomed", phase_is("Running"))
    assert pod is not None
    pid = container_pid(pod)
    assert _cmdline(pid) == b"sleep\x003601\x00"
    # A process an exec left behind lives in the container too (re-parented to its PID 1).
    async with ws_core(kube_cluster) as core:
        ws = await core.connect_get_namespaced_pod_exec(
            "doomed", ns, command=["sh", "-c", "sleep 3602 >/dev/null 2>&1 &"], stdout=True, stderr=True,
            stdin=False, tty=False, _preload_content=False)
        async with ws as stream:
            _, status = await read_channels(stream)
    assert status == {"metadata": {}, "status": "Success"}
    children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == pid]
    assert children, "the exec's background sleep is not in the container"
    kube_cluster.api("DELETE", f"/api/v1/namespaces/{ns}/pods/doomed")
    # The kubelet removes the pod from the API only once its processes are gone.
    kube_cluster.wait_pod(ns, "doomed", lambda p: p is None)
    for gone in [str(pid), *children]:
        assert _stat(gone)[0] in ("gone", "Z"), f"process {gone} survived its pod"


def _stat(pid: str) -> tuple[str, int | None]:
    """A process's state letter and parent PID ("gone", None when it does not exist)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return "gone", None
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _ppid(pid: str) -> int | None:
    return _stat(pid)[1]


async def test_init_containers_volumes_env_and_root(kube_cluster: KubeCluster, kube_namespace: str) -> None:
    """What an agent-copying init container needs: it runs to completion first, and what it leaves
    in an emptyDir is there for the main container (here as root, read-only root file system)."""
    ns = kube_namespace
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "strict"}})
    pod = pod_manifest("layered", ["sleep", "3600"], volumes=[
        {"name": "shared", "emptyDir": {}}, {"name": "settings", "configMap": {"name": "settings"}}],
        initContainers=[{"name": "copy", "image": "busybox", "command": ["sh", "-c", "echo $(GREETING) > /shared/note"],
                         "env": [{"name": "GREETING", "value": "from-init"}],
                         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}])
    main = pod["spec"]["containers"][0]
    main.update(securityContext={"readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
                workingDir="/shared", env=[{"name": "WHO", "value": "main"}],
                volumeMounts=[{"name": "shared", "mountPath": "/shared"},
                              {"name": "settings", "mountPath": "/config", "readOnly": True}])
    kube_cluster.api("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    running = kube_cluster.wait_pod(ns, "layered", phase_is("Running"))
    assert running is not None
    assert running["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    script = "cat note; cat /config/mode; echo; id -u; pwd; echo $WHO; touch /x 2>/dev/null || echo ro"
    async with ws_core(kube_cluster) as core:
        ws = await core.connect_get_namespaced_pod_exec(
            "layered", ns, command=["sh", "-c", script], stdout=True, stderr=True, stdin=False, tty=False,
            _preload_content=False)
        async with ws as stream:
            out, status = await read_channels(stream)
    assert out.get(1, b"").decode().split() == ["from-init", "strict", "0", "/shared", "main", "ro"], out
    assert status == {"metadata": {}, "status": "Success"}
