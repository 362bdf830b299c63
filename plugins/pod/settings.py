"""`[runtimes.pod]`: the pod runtime's settings, checked once at gateway start."""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from gateway import __version__
from gateway.config import ConfigError, check_fields, check_keys
from guest_agent import languages as language_table

#: The agent image the Helm chart and helm/Dockerfile.agent build: the guest agent and msgpack at
#: /opt/sandgate, on a python3 base.
DEFAULT_AGENT_IMAGE = f"ghcr.io/sandgate/sandgate-agent:{__version__}"
#: Where cloud metadata endpoints and private networks live: a sandbox that asks for network gets
#: the internet, not the cluster or the node's credentials.
DEFAULT_EGRESS_EXCEPT = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10")
IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|Ki|Mi|Gi)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class PodSettings:
    """Every `[runtimes.pod]` setting; docs/kubernetes.md explains each."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str = "default"
    #: "pod": the runtime creates the pod; "agent-sandbox": it creates an agents.x-k8s.io Sandbox
    #: whose controller creates the pod.
    mode: str = "pod"
    #: "exec": a fresh agent per connection through pods/exec (the default: docs/kubernetes.md says
    #: why); "attach": the agent is the container's main process, reached through pods/attach.
    channel: str = "exec"
    agent_image: str = DEFAULT_AGENT_IMAGE
    #: The sandbox image; the agent image itself when empty.
    image: str = ""
    #: Create-request `template` name -> sandbox image.
    templates: Mapping[str, str] = field(default_factory=dict)
    #: Language id -> sandbox image, for a create whose `template` names a language (or an alias
    #: of one) that `templates` does not name: `{"template": "go"}` boots `languages["go"]`. The
    #: image must hold the language's programs on its PATH (and python3, for the agent).
    languages: Mapping[str, str] = field(default_factory=dict)
    image_pull_policy: str | None = None
    runtime_class_name: str | None = None
    run_as_user: int = 10001
    read_only_root_filesystem: bool = True
    cpu_limit: str = "1"
    cpu_request: str = "100m"
    tmp_mb: int = 256
    pool_size: int = 0
    pool_refill_per_s: float = 2.0
    #: The warm pool serves creates asking for exactly these (the gateway's default limits), no
    #: network and no template; anything else starts cold.
    pool_memory_mb: int = 256
    pool_disk_mb: int = 512
    ready_timeout_s: float = 120.0
    fail_unschedulable: bool = True
    max_ttl_s: float = 24 * 3600.0
    lease_duration_s: float = 30.0
    sweep_interval_s: float = 60.0
    egress_except: tuple[str, ...] = DEFAULT_EGRESS_EXCEPT
    delete_grace_s: int = 1
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    gateway_id: str = ""
    python: str = "python3"
    service_account_name: str | None = None
    #: The storage class of volumes' PersistentVolumeClaims; None: the cluster's default class.
    storage_class: str | None = None
    #: How long a volume's create waits for its claim to be Bound (0: not at all, for classes
    #: that bind only once a pod uses the claim, WaitForFirstConsumer).
    volume_bind_timeout_s: float = 60.0

    @property
    def sandbox_image(self) -> str:
        return self.image or self.agent_image

    def __post_init__(self) -> None:
        # Types only: the bounds in _check need from_config's namespace and gateway_id.
        check_fields(self, "[runtimes.pod] ")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PodSettings:
        """Raises ConfigError (a ValueError) naming the bad setting."""
        check_keys(config, (f.name for f in fields(cls)), "[runtimes.pod]")
        values = dict(config)
        if "namespace" not in values:
            values["namespace"] = _default_namespace()
        for name in ("cpu_limit", "cpu_request"):  # `cpu_limit = 1` is a quantity too
            if isinstance(values.get(name), int | float) and not isinstance(values[name], bool):
                values[name] = f"{values[name]:g}"
        if not values.get("gateway_id"):
            values["gateway_id"] = _gateway_id()
        if isinstance(values.get("languages"), Mapping):  # aliases (js, golang, c++) name their language
            values["languages"] = {language_table.canonical(k) if isinstance(k, str) else k: v
                                   for k, v in values["languages"].items()}
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.mode not in ("pod", "agent-sandbox"):
            raise ConfigError(f"[runtimes.pod] mode must be 'pod' or 'agent-sandbox', not {self.mode!r}")
        if self.channel not in ("exec", "attach"):
            raise ConfigError(f"[runtimes.pod] channel must be 'exec' or 'attach', not {self.channel!r}")
        if not _DNS_LABEL.match(self.namespace):
            raise ConfigError(f"[runtimes.pod] namespace {self.namespace!r} is not a DNS label")
        if not _DNS_LABEL.match(self.gateway_id) or len(self.gateway_id) > 50:
            raise ConfigError(f"[runtimes.pod] gateway_id {self.gateway_id!r}: a DNS label of at most 50 characters")
        for name in ("cpu_limit", "cpu_request"):
            if not _QUANTITY.match(str(getattr(self, name))):
                raise ConfigError(f"[runtimes.pod] {name} is not a Kubernetes quantity: {getattr(self, name)!r}")
        if self.image_pull_policy not in (None, "Always", "IfNotPresent", "Never"):
            raise ConfigError("[runtimes.pod] image_pull_policy must be Always, IfNotPresent or Never")
        if self.run_as_user <= 0:
            raise ConfigError("[runtimes.pod] run_as_user must be a non-root uid (> 0)")
        for name in ("ready_timeout_s", "max_ttl_s", "lease_duration_s", "sweep_interval_s", "tmp_mb",
                     "pool_refill_per_s", "pool_memory_mb", "pool_disk_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"[runtimes.pod] {name} must be > 0, not {getattr(self, name)!r}")
        for name in ("pool_size", "delete_grace_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[runtimes.pod] {name} must be >= 0, not {getattr(self, name)!r}")
        unknown = sorted(set(self.languages) - set(language_table.BY_ID))
        if unknown:
            raise ConfigError(f"[runtimes.pod] languages: unknown language {unknown[0]!r}; the table has "
                              f"{', '.join(language_table.BY_ID)}")
        for name, image in {**self.templates, **self.languages}.items():
            if not image.strip():
                raise ConfigError(f"[runtimes.pod] the image for {name!r} is empty")
        if self.storage_class is not None and not _DNS_SUBDOMAIN.match(self.storage_class):
            raise ConfigError(f"[runtimes.pod] storage_class {self.storage_class!r} is not a storage class name")
        if self.volume_bind_timeout_s < 0:
            raise ConfigError(f"[runtimes.pod] volume_bind_timeout_s must be >= 0, not {self.volume_bind_timeout_s!r}")
        if self.pool_size and self.mode != "pod":
            raise ConfigError("[runtimes.pod] pool_size needs mode = 'pod' (agent-sandbox has SandboxWarmPool)")


def _default_namespace() -> str:
    """In a cluster, the gateway's own namespace; elsewhere `default`."""
    try:
        with open(IN_CLUSTER_NAMESPACE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def _gateway_id() -> str:
    """This gateway process's identity in labels and its Lease: the host name (the pod name in a
    cluster) and a random suffix, so a restarted container is a new gateway."""
    host = re.sub(r"[^a-z0-9-]+", "-", (os.environ.get("POD_NAME") or socket.gethostname()).lower())
    host = host.strip("-")[:40].strip("-") or "gateway"
    return f"{host}-{secrets.token_hex(4)}"
