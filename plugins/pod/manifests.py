"""The Kubernetes objects the pod runtime writes, as plain JSON-able dicts (no I/O here).

Labels are the source of truth: every object carries `app.kubernetes.io/managed-by: sandgate`, the
owning gateway's id and, for a sandbox, its id and tenant, so any gateway replica can find, adopt
and clean up any sandbox with a label selector. Exact ids sit in annotations too, because a label
value must start and end with a letter or digit and a sandbox id may end in `-` or `_`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from gateway.runtime.base import SandboxSpec
from gateway.storage.volumes import Volume, VolumeMount
from guest_agent.languages import canonical
from plugins.pod import egress
from plugins.pod.settings import PodSettings

MANAGED_BY = "app.kubernetes.io/managed-by"
COMPONENT = "app.kubernetes.io/component"
GATEWAY = "sandgate.dev/gateway"
SANDBOX_ID = "sandgate.dev/sandbox-id"
TENANT = "sandgate.dev/tenant"
POOL = "sandgate.dev/pool"
NETWORK = "sandgate.dev/network"
CREATED_AT = "sandgate.dev/created-at"
EXPIRES_AT = "sandgate.dev/expires-at"
SPEC = "sandgate.dev/spec"
VOLUME_ID = "sandgate.dev/volume-id"
VOLUME_NAME = "sandgate.dev/volume-name"
#: A network sandbox's policy (its wire form, JSON), for a replica that adopts it.
NETWORK_POLICY = "sandgate.dev/network-policy"
#: The name of the Secret holding a sandbox's secrets, when it has any.
SECRETS = "sandgate.dev/secrets"

SANDBOX_SELECTOR = f"{MANAGED_BY}=sandgate,{COMPONENT}=sandbox"
LEASE_SELECTOR = f"{MANAGED_BY}=sandgate,{COMPONENT}=gateway-lease"
#: The namespace-wide policy that isolates every sandbox pod (the chart ships the same one).
DENY_POLICY = "sandgate-sandboxes-deny-all"
#: The namespace-wide policy that lets network sandboxes reach the gateways' egress port (the chart
#: ships it too).
EGRESS_POLICY = "sandgate-sandboxes-egress"
#: A pod's resolver: its own loopback, where nothing answers, so a lookup fails at once instead of
#: waiting for a cluster DNS the NetworkPolicies do not let it reach. Names are the proxy's to resolve.
NO_DNS = {"nameservers": ["127.0.0.1"], "options": [{"name": "attempts", "value": "1"}]}
AGENT_CONTAINER = "sandbox"
AGENT_DIR = "/opt/sandgate"
AGENT_VOLUME_MOUNT = "/mnt/sandgate-agent"

SANDBOX_GROUP = "agents.x-k8s.io"
SANDBOX_VERSION = "v1beta1"
SANDBOX_PLURAL = "sandboxes"

_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
#: PID 1 when the agent comes in through exec: waits for SIGTERM, so a delete takes no grace period.
IDLE_MAIN = "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); signal.pause()"
#: Starts the agent from its folder. Not PYTHONPATH in the container's environment: every process
#: the sandbox runs would inherit it. As a container's PID 1 (attach) the agent would ignore the
#: kubelet's SIGTERM and every delete would wait out the grace period: it exits on SIGTERM instead.
AGENT_BOOT = ("import os, runpy, signal, sys; sys.path.insert(0, {path!r}); "
              "signal.signal(signal.SIGTERM, lambda *_: os._exit(143)); "
              "runpy.run_module('guest_agent', run_name='__main__', alter_sys=True)")


def label_value(text: str) -> str:
    """`text` as a label value: itself when it is one, else `h-` and 40 hex digits of its sha256
    (lookups compute the same, so both spellings find the object)."""
    if _LABEL_VALUE.match(text):
        return text
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC, the form Kubernetes writes."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_timestamp(moment: datetime.datetime) -> str:
    """A MicroTime (Lease renewTime/acquireTime)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def sandbox_labels(settings: PodSettings, spec: SandboxSpec | None) -> dict[str, str]:
    """The labels of a sandbox pod; `spec` None for a warm-pool pod (claimed by relabelling)."""
    labels = {MANAGED_BY: "sandgate", COMPONENT: "sandbox", GATEWAY: settings.gateway_id}
    if spec is None:
        labels[POOL] = "true"
    else:
        labels.update({SANDBOX_ID: label_value(spec.sandbox_id), TENANT: label_value(spec.tenant),
                       NETWORK: "true" if spec.egress is not None else "false"})
    return labels


def sandbox_annotations(settings: PodSettings, spec: SandboxSpec | None, now: datetime.datetime) -> dict[str, str]:
    ttl = min(spec.ttl_s, settings.max_ttl_s) if spec is not None and spec.ttl_s is not None else settings.max_ttl_s
    annotations = {CREATED_AT: timestamp(now), EXPIRES_AT: timestamp(now + datetime.timedelta(seconds=ttl))}
    if spec is not None:
        annotations.update({SANDBOX_ID: spec.sandbox_id, TENANT: spec.tenant, SPEC: spec_json(spec)})
        if spec.egress is not None:
            annotations[NETWORK_POLICY] = egress.policy_annotation(spec.egress.policy)
            if spec.egress.secrets:
                annotations[SECRETS] = secret_name(spec.sandbox_id)
    return annotations


def secret_name(sandbox_id: str) -> str:
    """The name of the Secret holding a sandbox's secrets (a DNS subdomain whatever the id)."""
    return "sandgate-secrets-" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:32]


def spec_json(spec: SandboxSpec) -> str:
    return json.dumps({"memory_mb": spec.memory_mb, "cpu_seconds": spec.cpu_seconds, "disk_mb": spec.disk_mb,
                       "network": spec.network, "template": spec.template, "ttl_s": spec.ttl_s,
                       "idle_timeout_s": spec.idle_timeout_s, "created_at": spec.created_at,
                       "volumes": [asdict(v) for v in spec.volumes]}, sort_keys=True)


def parse_volumes(value: Any) -> tuple[VolumeMount, ...]:
    """The `volumes` of a stored spec annotation. Raises TypeError or KeyError for a bad one."""
    if value is None:
        return ()
    return tuple(VolumeMount(path=str(v["path"]), name=str(v["name"]), readonly=bool(v["readonly"]),
                             quota_mb=int(v["quota_mb"]), source=str(v["source"]), volume_id=str(v["volume_id"]))
                 for v in value)


def claim_manifest(settings: PodSettings, name: str, volume: Volume) -> dict[str, Any]:
    """A named volume's PersistentVolumeClaim: its quota as the storage request, one writer node."""
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": f"{volume.quota_mb}Mi"}}}
    if settings.storage_class is not None:
        spec["storageClassName"] = settings.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": settings.namespace,
                     "labels": {MANAGED_BY: "sandgate", COMPONENT: "volume", TENANT: label_value(volume.tenant),
                                VOLUME_ID: label_value(volume.id)},
                     "annotations": {TENANT: volume.tenant, VOLUME_ID: volume.id, VOLUME_NAME: volume.name}},
        "spec": spec,
    }


def claim_patch(settings: PodSettings, spec: SandboxSpec, now: datetime.datetime) -> dict[str, Any]:
    """The merge patch that turns a warm-pool pod into `spec`'s sandbox (null removes the pool label)."""
    labels: dict[str, Any] = {**sandbox_labels(settings, spec), POOL: None}
    return {"metadata": {"labels": labels, "annotations": sandbox_annotations(settings, spec, now)}}


def image_for(settings: PodSettings, template: str | None) -> str:
    """The sandbox image for a create request's `template`: a name of `templates`, else a language
    of `languages` (by id or alias). KeyError for neither."""
    if template is None:
        return settings.sandbox_image
    if template in settings.templates:
        return settings.templates[template]
    return settings.languages[canonical(template)]


def agent_command(settings: PodSettings, image: str) -> list[str]:
    """The agent's command line in a sandbox container of `image` (attach: its main process;
    exec: what each connection runs)."""
    path = AGENT_DIR if image == settings.agent_image else AGENT_VOLUME_MOUNT
    return [settings.python, "-c", AGENT_BOOT.format(path=path), "--root", "/work", "--fs-root", "/"]


def pod_spec(settings: PodSettings, *, image: str, memory_mb: int, disk_mb: int,
             volumes_wanted: tuple[VolumeMount, ...] = ()) -> dict[str, Any]:
    """A hardened PodSpec: non-root, no privilege escalation, no capabilities, seccomp
    RuntimeDefault, no service-account token, read-only root with emptyDirs for /work and /tmp,
    bounded memory, CPU and disk. The agent comes from an init container copying it out of the
    agent image unless the sandbox image is the agent image. Each named volume is its
    PersistentVolumeClaim, mounted at its path (read-only when asked: the claim and the mount
    both say so); the pod's fsGroup makes a read-write one writable by the non-root agent."""
    hardened = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": settings.read_only_root_filesystem,
        "runAsNonRoot": True,
    }
    own_agent = image == settings.agent_image
    if settings.channel == "attach":
        command = agent_command(settings, image)
    else:
        command = [settings.python, "-c", IDLE_MAIN]
    mounts: list[dict[str, Any]] = [{"name": "work", "mountPath": "/work"}, {"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [
        {"name": "work", "emptyDir": {"sizeLimit": f"{disk_mb}Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": f"{settings.tmp_mb}Mi"}},
    ]
    for i, wanted in enumerate(volumes_wanted):
        volumes.append({"name": f"volume-{i}", "persistentVolumeClaim": {"claimName": wanted.source,
                                                                          "readOnly": wanted.readonly}})
        mounts.append({"name": f"volume-{i}", "mountPath": wanted.path, "readOnly": wanted.readonly})
    init: list[dict[str, Any]] = []
    if not own_agent:
        volumes.append({"name": "agent", "emptyDir": {"sizeLimit": "64Mi"}})
        mounts.append({"name": "agent", "mountPath": AGENT_VOLUME_MOUNT, "readOnly": True})
        init.append({
            "name": "install-agent",
            "image": settings.agent_image,
            "command": ["cp", "-R", f"{AGENT_DIR}/.", AGENT_VOLUME_MOUNT],
            "securityContext": {**hardened, "readOnlyRootFilesystem": True},
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                          "limits": {"cpu": "500m", "memory": "64Mi"}},
            "volumeMounts": [{"name": "agent", "mountPath": AGENT_VOLUME_MOUNT}],
        })
    container: dict[str, Any] = {
        "name": AGENT_CONTAINER,
        "image": image,
        "command": command,
        "workingDir": "/work",
        "env": [
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            {"name": "HOME", "value": "/work"},
            {"name": "TMPDIR", "value": "/tmp"},
        ],
        # attach: the agent's stdin stays open across attach sessions (stdinOnce false), so the
        # agent and its Python namespace outlive one gateway connection.
        "stdin": settings.channel == "attach",
        "stdinOnce": False,
        "tty": False,
        "securityContext": hardened,
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": f"{memory_mb}Mi"},
            "limits": {"cpu": settings.cpu_limit, "memory": f"{memory_mb}Mi",
                       "ephemeral-storage": f"{disk_mb + settings.tmp_mb + 64}Mi"},
        },
        "volumeMounts": mounts,
    }
    if settings.image_pull_policy:
        container["imagePullPolicy"] = settings.image_pull_policy
        for c in init:
            c["imagePullPolicy"] = settings.image_pull_policy
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "dnsPolicy": "None",
        "dnsConfig": NO_DNS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": max(settings.delete_grace_s, 1),
        # The hard backstop: the kubelet ends the pod even if no gateway is left to do it.
        "activeDeadlineSeconds": int(settings.max_ttl_s),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if init:
        spec["initContainers"] = init
    if settings.runtime_class_name:
        spec["runtimeClassName"] = settings.runtime_class_name
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.service_account_name:
        spec["serviceAccountName"] = settings.service_account_name
    return spec


def pod_manifest(settings: PodSettings, name: str, spec: SandboxSpec | None, now: datetime.datetime,
                 *, image: str, memory_mb: int, disk_mb: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": sandbox_labels(settings, spec),
                     "annotations": sandbox_annotations(settings, spec, now)},
        "spec": pod_spec(settings, image=image, memory_mb=memory_mb, disk_mb=disk_mb,
                         volumes_wanted=spec.volumes if spec is not None else ()),
    }


def sandbox_resource(settings: PodSettings, name: str, spec: SandboxSpec, now: datetime.datetime,
                     *, image: str) -> dict[str, Any]:
    """An agents.x-k8s.io/v1beta1 Sandbox whose controller makes the same hardened pod; its
    shutdownTime is the same hard expiry the pod carries."""
    labels = sandbox_labels(settings, spec)
    annotations = sandbox_annotations(settings, spec, now)
    return {
        "apiVersion": f"{SANDBOX_GROUP}/{SANDBOX_VERSION}",
        "kind": "Sandbox",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "podTemplate": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec(settings, image=image, memory_mb=spec.memory_mb, disk_mb=spec.disk_mb,
                                 volumes_wanted=spec.volumes),
            },
            "shutdownTime": annotations[EXPIRES_AT],
            "shutdownPolicy": "Delete",
        },
    }


def deny_policy(namespace: str) -> dict[str, Any]:
    """Every sandbox pod isolated both ways: selected, with no rule allowing anything. Policies
    add up: `egress_policy` opens the one way out a network sandbox has."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": DENY_POLICY, "namespace": namespace,
                     "labels": {MANAGED_BY: "sandgate", COMPONENT: "sandbox-network"}},
        "spec": {"podSelector": {"matchLabels": {MANAGED_BY: "sandgate", COMPONENT: "sandbox"}},
                 "policyTypes": ["Ingress", "Egress"]},
    }


def egress_policy(settings: PodSettings, port: int, gateway_namespace: str) -> dict[str, Any]:
    """Sandbox pods with a network (`NETWORK: "true"`) may open TCP connections to the gateway pods
    (`egress_gateway_labels`) on the egress port, and nothing else: not DNS (the proxy resolves),
    not each other, not the internet. Ingress stays denied. Any gateway pod, not only the one
    holding the sandbox: a sandbox changes replica when another one adopts it."""
    peer: dict[str, Any] = {"podSelector": {"matchLabels": dict(settings.egress_gateway_labels)}}
    if gateway_namespace != settings.namespace:
        # The namespace's name label is set by Kubernetes 1.21 and later; on older clusters the
        # gateway's namespace needs it set by hand.
        peer["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": gateway_namespace}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": EGRESS_POLICY, "namespace": settings.namespace,
                     "labels": {MANAGED_BY: "sandgate", COMPONENT: "sandbox-network"}},
        "spec": {
            "podSelector": {"matchLabels": {MANAGED_BY: "sandgate", COMPONENT: "sandbox", NETWORK: "true"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [peer], "ports": [{"protocol": "TCP", "port": port}]}],
        },
    }


def secret_manifest(settings: PodSettings, spec: SandboxSpec, pod: Mapping[str, Any],
                    data: Mapping[str, str]) -> dict[str, Any]:
    """The Secret holding a sandbox's secrets (`data`: plugins/pod/egress.py writes it), owned by
    its pod so that the cluster's garbage collector removes it with the pod whatever happens."""
    meta = pod["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": secret_name(spec.sandbox_id), "namespace": settings.namespace,
                     "labels": {MANAGED_BY: "sandgate", COMPONENT: "sandbox-secrets",
                                SANDBOX_ID: label_value(spec.sandbox_id)},
                     "annotations": {SANDBOX_ID: spec.sandbox_id},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                          "uid": meta["uid"]}]},
        "data": dict(data),
    }


def lease_name(gateway_id: str) -> str:
    return f"sandgate-gateway-{gateway_id}"


def lease_manifest(settings: PodSettings, now: datetime.datetime) -> dict[str, Any]:
    """The gateway's liveness, renewed while it runs: pods of a gateway whose Lease is gone or
    stale are orphans any replica may remove."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": lease_name(settings.gateway_id), "namespace": settings.namespace,
                     "labels": {MANAGED_BY: "sandgate", COMPONENT: "gateway-lease", GATEWAY: settings.gateway_id}},
        "spec": {"holderIdentity": settings.gateway_id, "leaseDurationSeconds": int(settings.lease_duration_s),
                 "acquireTime": micro_timestamp(now), "renewTime": micro_timestamp(now)},
    }


def lease_alive(lease: Mapping[str, Any], now: datetime.datetime) -> bool:
    """Renewed within twice its duration: one missed renewal, or clocks a little apart, is not death."""
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime"))
    duration = spec.get("leaseDurationSeconds") or 0
    return renewed is not None and renewed + datetime.timedelta(seconds=2 * duration) >= now
