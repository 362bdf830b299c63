"""`[runtimes.pod]`: the pod runtime's settings, checked once at gateway start."""

from __future__ import annotations

import ipaddress
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
#: The labels of the gateway pods the chart makes (its selector labels but the release's): the
#: sandboxes' egress NetworkPolicy admits traffic to pods with these only.
DEFAULT_GATEWAY_LABELS = {"app.kubernetes.io/name": "sandgate", "app.kubernetes.io/component": "gateway"}
IN_CLUSTER_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|Ki|Mi|Gi)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
WILDCARDS = ("0.0.0.0", "::")
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
    #: Where this gateway listens for its sandbox pods' connections to the policy proxy
    #: ("host:port"; port 0: any free port). Empty: pod sandboxes get no network.
    egress_listen: str = ""
    #: How this gateway's sandbox pods reach that listener: an IP address (a pod resolves no names),
    #: with a port or without (then the listener's). Empty: $POD_IP (the chart sets it from the
    #: pod's status), else the listen address when it is not a wildcard.
    egress_proxy: str = ""
    #: The labels of the gateway pods, to which (on the listener's port) the sandboxes' egress
    #: NetworkPolicy admits network sandboxes, and nowhere else.
    egress_gateway_labels: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_GATEWAY_LABELS))
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

    @property
    def egress(self) -> bool:
        """Whether pod sandboxes may have a network (through this gateway's egress listener)."""
        return bool(self.egress_listen)

    def listen_address(self) -> tuple[str, int]:
        """`egress_listen` as (host, port)."""
        host, port = _host_port(self.egress_listen, "egress_listen")
        assert port is not None, "checked by from_config"
        return host, port

    def proxy_address(self, bound_port: int) -> tuple[str, int]:
        """The (address, port) sandbox pods reach this gateway's egress listener at, the listener
        being bound to `bound_port`. `from_config` made sure there is one."""
        host, port = _host_port(self.egress_proxy, "egress_proxy")
        return host, port if port is not None else bound_port

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
        if values.get("egress_listen") and not values.get("egress_proxy"):
            values["egress_proxy"] = _default_proxy(values["egress_listen"])
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
        if self.egress_listen:
            _, port = _host_port(self.egress_listen, "egress_listen")
            if port is None:
                raise ConfigError(f"[runtimes.pod] egress_listen must be host:port, not {self.egress_listen!r}")
            host, _ = _host_port(self.egress_proxy, "egress_proxy")
            if host in WILDCARDS:
                raise ConfigError(f"[runtimes.pod] egress_proxy {self.egress_proxy!r}: a sandbox pod cannot reach a "
                                  "wildcard address")
            if not self.egress_gateway_labels:
                raise ConfigError("[runtimes.pod] egress_gateway_labels: the gateway pods' labels are needed for the "
                                  "sandboxes' egress NetworkPolicy")
            for key, value in self.egress_gateway_labels.items():
                if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                    raise ConfigError(f"[runtimes.pod] egress_gateway_labels: {key!r}: {value!r} is not a label")
        elif self.egress_proxy:
            raise ConfigError("[runtimes.pod] egress_proxy needs egress_listen (the listener it reaches)")
        if self.pool_size and self.mode != "pod":
            raise ConfigError("[runtimes.pod] pool_size needs mode = 'pod' (agent-sandbox has SandboxWarmPool)")


def _host_port(text: str, name: str) -> tuple[str, int | None]:
    """An IP address with an optional port ("10.0.0.5", "10.0.0.5:3128", "[fd00::5]:3128", "::"),
    the address normalised; the port None when not given.

    Raises:
        ConfigError: naming `name`, for anything else (a host name among them: pods resolve none).
    """
    shown = f"[runtimes.pod] {name} {text!r}"
    try:
        return str(ipaddress.ip_address(text)), None
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    try:
        address = str(ipaddress.ip_address(host))
        number = int(port)
    except ValueError:
        raise ConfigError(f"{shown}: an IP address and a port (pods resolve no names), e.g. 0.0.0.0:3128") from None
    if not sep or not 0 <= number < 65536:
        raise ConfigError(f"{shown}: the port must be 0 to 65535")
    return address, number


def _default_proxy(listen: Any) -> str:
    """Where sandbox pods reach the listener on `listen` when `egress_proxy` does not say: the listen
    address itself unless it is a wildcard, else $POD_IP (the chart sets it from the downward API)."""
    if not isinstance(listen, str):
        return ""  # check_fields refuses it
    host, port = _host_port(listen, "egress_listen")
    if port is None:
        return ""  # _check says what is wrong
    if host not in WILDCARDS:
        return host
    pod_ip = os.environ.get("POD_IP", "").strip()
    if not pod_ip:
        raise ConfigError(f"[runtimes.pod] egress_proxy: egress_listen {listen!r} listens on every address; set "
                          "egress_proxy to the address sandbox pods reach this gateway at, or POD_IP (the Helm chart "
                          "sets it from the pod's status)")
    return pod_ip


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
