"""helm/sandgate: linted, rendered, schema-checked and validated offline with Helm 4 (helm-python-sdk,
no helm CLI) and kubernetes-validate's official schemas for Kubernetes 1.20; then installed into
the local test cluster's real kube-apiserver, its RBAC checked with `kubectl auth can-i` as the
chart's ServiceAccount, and the pod runtime run with that ServiceAccount's token."""

from __future__ import annotations

import json
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from gateway.config import load_settings
from plugins.pod.settings import PodSettings
from tests.kube.cluster import KubeCluster

pytestmark = pytest.mark.helm

CHART = Path(__file__).resolve().parents[2] / "helm" / "sandgate"
KUBE = "1.20.2"
#: A values set that turns every optional part on.
EVERYTHING: dict[str, Any] = {
    "apiKeys": {"value": "key-a:tenant-a,key-b:tenant-b"},
    "gateway": {"allowedOrigins": ["https://ide.example.com"], "limits": {"ttl_s": 600, "memory_mb": 512},
                "quotas": {"max_sandboxes": 5}},
    "sandboxes": {"namespace": "sandboxes", "mode": "agent-sandbox", "channel": "attach",
                  "runtimeClassName": "gvisor", "templates": {"python": "python:3.12-slim"},
                  "languages": {"golang": "golang:1.22-bookworm"},
                  "nodeSelector": {"sandgate.dev/sandboxes": "true"},
                  "tolerations": [{"key": "sandboxes", "operator": "Exists", "effect": "NoSchedule"}]},
    "agentSandbox": {"enabled": True},
    "autoscaling": {"enabled": True},
    "networkPolicy": {"apiServerCIDRs": ["10.0.0.1/32"], "ingressFrom": [{"podSelector": {}}]},
    "service": {"sessionAffinity": "ClientIP"},
    "egress": {"port": 13128, "exceptCIDRs": ["10.0.0.0/8", "fd00::/8"]},
}


def render(values: dict[str, Any] | None = None, *, kube: str = KUBE,
           namespace: str = "sandgate") -> list[dict[str, Any]]:
    """The chart's objects (NOTES.txt left out), rendered offline for Kubernetes `kube`."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render({**(values or {}), "kubeVersionOverride": kube}, name="sg", namespace=namespace)
    return [doc for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def gateway_toml(objects: list[dict[str, Any]]) -> str:
    [config_map] = by_kind(objects, "ConfigMap")
    return str(config_map["data"]["sandgate.toml"])


def test_lint_is_clean() -> None:
    for values in ({}, EVERYTHING):
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], report


def test_defaults_render_a_hardened_gateway() -> None:
    objects = render()
    assert sorted(o["kind"] for o in objects) == sorted([
        "ConfigMap", "Deployment", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget", "Role",
        "RoleBinding", "Service", "ServiceAccount"])
    [deployment] = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    [gateway] = pod["containers"]
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    assert gateway["securityContext"]["allowPrivilegeEscalation"] is False
    assert gateway["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert gateway["readinessProbe"]["httpGet"]["path"] == gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["resources"]["limits"] and gateway["resources"]["requests"]
    [pdb] = by_kind(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1beta1", "1.20 has no policy/v1"
    assert by_kind(render(kube="1.30.0"), "PodDisruptionBudget")[0]["apiVersion"] == "policy/v1"


def test_role_grants_only_what_the_runtime_calls() -> None:
    def rules(values: dict[str, Any]) -> dict[str, list[str]]:
        [role] = by_kind(render(values), "Role")
        text = json.dumps(role)
        assert "*" not in text, "no wildcards"
        return {f"{r['apiGroups'][0]}/{res}": r["verbs"] for r in role["rules"] for res in r["resources"]}

    assert rules({}) == {
        "/pods": ["create", "get", "list", "watch", "patch", "delete"],
        "/pods/exec": ["create", "get"],
        "/persistentvolumeclaims": ["create", "list", "watch", "delete"],
        "networking.k8s.io/networkpolicies": ["create"],
        "/secrets": ["create", "get", "delete"],
        "coordination.k8s.io/leases": ["create", "list", "patch", "delete"],
    }
    everything = rules(EVERYTHING)
    assert "/pods/exec" not in everything and everything["/pods/attach"] == ["create", "get"]
    assert everything["agents.x-k8s.io/sandboxes"] == ["create", "list", "patch", "delete"]
    objects = render(EVERYTHING)
    [role], [binding] = by_kind(objects, "Role"), by_kind(objects, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "sandboxes"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "sg-sandgate", "namespace": "sandgate"}]


def test_the_gateway_accepts_the_config_the_chart_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "10.244.1.7")  # what the Deployment gives each replica
    for values in ({}, EVERYTHING):
        path = tmp_path / "sandgate.toml"
        path.write_text(gateway_toml(render(values)))
        settings = load_settings(path, env={})
        assert settings.default_runtime == "pod" and settings.blocked_plugins == ("wasm", "microvm")
        pod = PodSettings.from_config(settings.runtimes["pod"])
        expected_namespace = values.get("sandboxes", {}).get("namespace", "sandgate")
        assert pod.namespace == expected_namespace and pod.agent_image == "ghcr.io/sandgate/sandgate-agent:0.1.0"
    assert pod.listen_address() == ("0.0.0.0", 13128) and pod.proxy_address(13128) == ("10.244.1.7", 13128)
    assert dict(pod.egress_gateway_labels) == {"app.kubernetes.io/name": "sandgate", "app.kubernetes.io/instance": "sg",
                                               "app.kubernetes.io/component": "gateway"}
    assert pod.mode == "agent-sandbox" and pod.channel == "attach" and pod.runtime_class_name == "gvisor"
    assert dict(pod.templates) == {"python": "python:3.12-slim"}
    assert dict(pod.languages) == {"go": "golang:1.22-bookworm"}
    assert pod.tolerations == ({"key": "sandboxes", "operator": "Exists", "effect": "NoSchedule"},)
    assert settings.limits.ttl_s == 600 and settings.quotas.max_sandboxes == 5
    assert tomllib.loads(gateway_toml(render(EVERYTHING)))["allowed_origins"] == ["https://ide.example.com"]
    off = tomllib.loads(gateway_toml(render({"egress": {"enabled": False}})))["runtimes"]["pod"]
    assert "egress_listen" not in off and not PodSettings.from_config(off).egress


def test_network_sandboxes_reach_their_gateways_proxy_port_only() -> None:
    """The sandboxes' way out, as the chart writes it: the gateway pods admit network sandboxes on
    the egress port (and reach the internet but the excepted ranges for them); sandboxes may reach
    the gateway pods on that port and nothing else; each replica gives its own IP to its sandboxes."""
    for values, same_namespace in (({}, True), (EVERYTHING, False)):
        objects = render(values)
        port = values.get("egress", {}).get("port", 3128)
        policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
        gateway_labels = {"app.kubernetes.io/name": "sandgate", "app.kubernetes.io/instance": "sg",
                          "app.kubernetes.io/component": "gateway"}
        sandbox_network = {"app.kubernetes.io/managed-by": "sandgate", "app.kubernetes.io/component": "sandbox",
                           "sandgate.dev/network": "true"}
        gateway = policies["sg-sandgate"]["spec"]
        [admitted] = [rule for rule in gateway["ingress"] if rule["ports"] == [{"port": port, "protocol": "TCP"}]]
        [peer] = admitted["from"]
        assert peer["podSelector"]["matchLabels"] == sandbox_network
        assert ("namespaceSelector" not in peer) == same_namespace
        out = policies["sandgate-sandboxes-egress"]
        assert out["metadata"]["namespace"] == ("sandgate" if same_namespace else "sandboxes")
        assert out["spec"]["podSelector"]["matchLabels"] == sandbox_network
        assert out["spec"]["policyTypes"] == ["Egress"]
        [rule] = out["spec"]["egress"]
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}], "one port: no DNS, nothing else"
        [to] = rule["to"]
        assert to["podSelector"]["matchLabels"] == gateway_labels
        assert ("namespaceSelector" not in to) == same_namespace
        [wide] = [r for r in gateway["egress"] if "ports" not in r]
        blocks = {b["ipBlock"]["cidr"]: b["ipBlock"].get("except") for b in wide["to"]}
        if same_namespace:
            assert blocks == {"0.0.0.0/0": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                                            "100.64.0.0/10"], "::/0": ["fc00::/7", "fe80::/10"]}
        else:
            assert blocks == {"0.0.0.0/0": ["10.0.0.0/8"], "::/0": ["fd00::/8"]}
        [deployment] = by_kind(objects, "Deployment")
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert {"name": "egress", "containerPort": port, "protocol": "TCP"} in container["ports"]
        assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    off = render({"egress": {"enabled": False}})
    assert sorted(p["metadata"]["name"] for p in by_kind(off, "NetworkPolicy")) == [
        "sandgate-sandboxes-deny-all", "sg-sandgate"]
    assert len(by_kind(off, "NetworkPolicy")[0]["spec"]["ingress"]) == 1


@pytest.mark.parametrize("bad", [
    {"replicaCount": 0},
    {"replicas": 3},  # a typo of replicaCount
    {"sandboxes": {"mode": "vm"}},
    {"sandboxes": {"channel": "ssh"}},
    {"sandboxes": {"cpuLimit": "lots"}},
    {"sandboxes": {"runAsUser": 0}},
    {"sandboxes": {"namespace": "Not_A_Namespace"}},
    {"apiKeys": {"value": "a key without a tenant"}},
    {"image": {"pullPolicy": "Sometimes"}},
    {"networkPolicy": {"apiServerCIDRs": ["kubernetes.default"]}},
    {"egress": {"port": 0}},
    {"egress": {"exceptCIDRs": ["private networks"]}},
    {"sandboxes": {"egressExcept": ["10.0.0.0/8"]}},  # gone: egress.exceptCIDRs is the gateway's
])
def test_schema_refuses_bad_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(EVERYTHING)  # the good values pass
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)
        with pytest.raises(helm.HelmError):  # and an install-time render refuses them too
            chart.render(bad, name="sg", namespace="sandgate")


@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "everything"])
def test_manifests_validate_against_kubernetes_1_20_schemas(values: dict[str, Any]) -> None:
    """Offline, strict (unknown fields refused), with the official 1.20 OpenAPI schemas; the same
    chart rendered for a newer cluster against the newest schemas this kubernetes-validate has."""
    for kube, schema in ((KUBE, "1.20.0"), ("1.28.0", "1.28.0")):
        for obj in render(values, kube=kube):
            with warnings.catch_warnings():
                # kubernetes-validate 1.28 (the last with the 1.20 schemas) uses APIs that newer
                # jsonschema releases deprecate; validation errors still raise.
                warnings.simplefilter("ignore", DeprecationWarning)
                kubernetes_validate.validate(obj, schema, strict=True)


# -- installed into the local test cluster ------------------------------------------------------------


@pytest.fixture
def installed(kube_cluster: KubeCluster, kube_namespace: str) -> Iterator[dict[str, Any]]:
    """The chart installed by Helm 4 into the real apiserver (nothing reconciles the Deployment: no
    controller-manager runs; the objects are stored and judged, RBAC included)."""
    with helm.Config(kubeconfig_path=kube_cluster.kubeconfig, namespace=kube_namespace) as config:
        release = config.install(CHART, "sg", {"apiKeys": {"value": "key-a:tenant-a"}}, namespace=kube_namespace,
                                 timeout=120)
        try:
            yield dict(release)
        finally:
            config.uninstall("sg")


def test_install_and_rbac(installed: dict[str, Any], kube_cluster: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    assert installed["status"] == "deployed", installed
    deployment = kube_cluster.api("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/sg-sandgate")
    assert deployment["spec"]["replicas"] == 3
    pdb = kube_cluster.api("GET", f"/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets/sg-sandgate")
    assert pdb["spec"]["minAvailable"] == 1
    for policy in ("sandgate-sandboxes-deny-all", "sandgate-sandboxes-egress", "sg-sandgate"):
        kube_cluster.api("GET", f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/{policy}")

    token = kube_cluster.service_account_token(ns, "sg-sandgate")
    allowed = [("create", "pods", None), ("get", "pods", None), ("list", "pods", None), ("watch", "pods", None),
               ("patch", "pods", None), ("delete", "pods", None), ("create", "pods", "exec"), ("get", "pods", "exec"),
               ("create", "networkpolicies.networking.k8s.io", None),
               ("create", "secrets", None), ("get", "secrets", None), ("delete", "secrets", None),
               ("create", "leases.coordination.k8s.io", None), ("patch", "leases.coordination.k8s.io", None)]
    denied = [("create", "pods", "attach"), ("create", "pods", "portforward"), ("update", "pods", None),
              ("list", "secrets", None), ("watch", "secrets", None), ("update", "secrets", None),
              ("delete", "networkpolicies.networking.k8s.io", None), ("create", "deployments.apps", None),
              ("update", "leases.coordination.k8s.io", None), ("create", "sandboxes.agents.x-k8s.io", None),
              ("create", "roles.rbac.authorization.k8s.io", None), ("delete", "namespaces", None)]
    for verb, resource, sub in allowed:
        assert kube_cluster.can_i(verb, resource, namespace=ns, token=token, subresource=sub), (verb, resource, sub)
    for verb, resource, sub in denied:
        assert not kube_cluster.can_i(verb, resource, namespace=ns, token=token, subresource=sub), (verb, resource, sub)
    assert not kube_cluster.can_i("create", "pods", namespace="default", token=token), "namespaced, not cluster-wide"


async def test_the_runtime_works_with_the_charts_service_account(installed: dict[str, Any], kube_cluster: KubeCluster,
                                                                 kube_namespace: str, tmp_path: Path) -> None:
    """The pod runtime, authenticated as the chart's ServiceAccount: the Role is enough for a whole
    sandbox life (Lease, watch, create with a network and a secret, exec, adoption by a second
    runtime reading the secret back, destroy, sweep)."""
    from gateway.egress.network import Egress
    from gateway.egress.policy import NetworkPolicy
    from gateway.egress.secrets import Secrets
    from gateway.runtime.agent_client import AgentClient
    from gateway.runtime.base import SandboxSpec
    from plugins.pod.runtime import PodBackend, PodRuntime

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": kube_cluster.server,
                                                "certificate-authority": str(kube_cluster.ca_file)}}],
        "users": [{"name": "sa", "user": {"token": kube_cluster.service_account_token(kube_namespace, "sg-sandgate")}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    config = {"kubeconfig": str(kubeconfig), "namespace": kube_namespace, "ready_timeout_s": 60.0,
              "egress_listen": "127.0.0.1:0"}
    first, second = PodRuntime(config), PodRuntime(config)
    first.egress = second.egress = Egress()
    await first.start()
    await second.start()
    try:
        secrets = Secrets.parse([{"env": "K", "value": "v", "hosts": ["api.example.com"]}])
        network = first.egress.attach("sb_chart", "t", NetworkPolicy.parse({"allow": ["api.example.com"]}), secrets)
        backend = await first.create(SandboxSpec(sandbox_id="sb_chart", tenant="t", memory_mb=256, cpu_seconds=60,
                                                 disk_mb=512, network=True, egress=network))
        agent = AgentClient(backend.channel())
        try:
            await agent.start()
            events = [e async for e in await agent.stream("exec.start", exec_id="e", command=["id", "-u"])]
            assert b"".join(e["data"] for e in events if e.get("ev") == "data") == b"10001\n"
        finally:
            await agent.close()
        state = await second.find("sb_chart")
        assert state is not None
        adopted = await second.load_state(state)
        assert isinstance(adopted, PodBackend) and adopted.network is not None
        assert adopted.network.secrets == secrets, "the secrets came back from their Secret"
        await adopted.destroy()
        assert await first.sweep() == [] and await second.sweep() == []
    finally:
        await second.stop()
        await first.stop()
