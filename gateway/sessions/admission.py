"""Admission: whether a create request may go ahead, decided before it costs anything.

Two steps, in this order, because a request that cannot succeed must not cost the tenant a quota
or rate token:

1. `check_create` builds a `CreateRequest` from the request body: the gateway's own fields
   (bounded by `Limits`), the metadata, whether the tenant may have a network (`NetworkAccess`),
   and the runtime's options (`Runtime.validate_options`) and template/network support
   (`Runtime.check_create`). It raises on the first bad field.
2. `TenantQuota.admit` counts the tenant's sandboxes against `max_sandboxes` and only then takes a
   token from the per-tenant `creates_per_minute` bucket, raising `QuotaExceeded` (429 with
   Retry-After).

Nothing here does I/O or knows about sandboxes that exist: the manager passes the count in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Quotas, Settings
from gateway.egress.policy import NetworkPolicy
from gateway.egress.secrets import Secrets
from gateway.ports.registry import check_port
from gateway.runtime.base import Runtime, SandboxSpec
from gateway.storage.mounts import MountSpec, parse_mounts
from gateway.storage.patches import parse_files, parse_patches
from gateway.storage.volumes import VolumeMount
from guest_agent.wire import ProtocolError
from guest_agent.wire import field as wire_field

#: The create body's fields the gateway reads itself; the rest are the runtime's options.
CREATE_FIELDS = ("runtime", "ttl", "idle_timeout", "memory_mb", "cpu_seconds", "disk_mb", "network",
                 "secrets", "template", "metadata", "volumes", "files", "patches", "mounts", "ports")


@dataclass(frozen=True)
class CreateRequest:
    """A create request whose every field has been checked, the runtime's options included."""

    runtime: Runtime
    ttl: float
    idle_timeout: float
    memory_mb: int
    cpu_seconds: float
    disk_mb: int
    network: NetworkPolicy
    template: str | None
    metadata: dict[str, str]
    options: dict[str, Any]
    #: {path: {"name", "readonly"}} as asked: the manager acquires them (gateway/storage/volumes.py).
    volumes: Mapping[str, Any] = field(default_factory=dict)
    #: fs.patch arguments and (path, bytes) files, applied before the sandbox is handed out.
    patches: tuple[dict[str, Any], ...] = ()
    files: tuple[tuple[str, bytes], ...] = ()
    #: Host mounts: copied in after the files, synced back (gateway/storage/mount_sync.py).
    mounts: tuple[MountSpec, ...] = ()
    #: Secrets the egress proxy fills in for their hosts; the guest gets placeholders.
    secrets: Secrets = field(default_factory=Secrets)
    #: Ports to publish once the sandbox runs (gateway/ports).
    ports: tuple[int, ...] = ()

    def spec(self, sandbox_id: str, tenant: str, created_at: float,
             volumes: tuple[VolumeMount, ...] = ()) -> SandboxSpec:
        """What the runtime is asked to create for this request, with the volumes acquired for it."""
        return SandboxSpec(sandbox_id=sandbox_id, tenant=tenant, memory_mb=self.memory_mb,
                           cpu_seconds=self.cpu_seconds, disk_mb=self.disk_mb, network=self.network.has_network,
                           template=self.template, options=self.options, ttl_s=self.ttl,
                           idle_timeout_s=self.idle_timeout, created_at=created_at, volumes=volumes)


def check_create(
    body: Mapping[str, Any], settings: Settings, runtimes: Mapping[str, Runtime], unavailable: Mapping[str, str],
    tenant: str,
) -> CreateRequest:
    """Check a create request's body.

    Args:
        body: the request's JSON object.
        settings: the gateway's default runtime, its `Limits`, and who may have a network.
        runtimes: the runtimes that started, by id.
        unavailable: why each runtime that did not start is off, by id.
        tenant: who asks.

    Returns:
        The checked request.

    Raises:
        ProtocolError: `bad_request` for a bad or unknown field, metadata or runtime; `forbidden`
            for a network the tenant may not have; `unavailable` for a runtime that is off here;
            whatever the runtime's checks raise (`unsupported`).
    """
    limits = settings.limits
    runtime_id = wire_field(body, "runtime", str, settings.default_runtime)
    runtime = runtimes.get(runtime_id)
    if runtime is None:
        why = unavailable.get(runtime_id)
        if why is not None:
            raise ProtocolError("unavailable", f"runtime {runtime_id!r} is unavailable here: {why}")
        raise ProtocolError("bad_request", f"unknown runtime {runtime_id!r}; have {sorted(runtimes)}")
    ttl = _bounded(body, "ttl", limits.ttl_s, limits.max_ttl_s, float)
    idle = _bounded(body, "idle_timeout", limits.idle_timeout_s, limits.max_idle_timeout_s, float)
    memory = _bounded(body, "memory_mb", limits.memory_mb, limits.max_memory_mb, int)
    if memory < runtime.min_memory_mb:
        raise ProtocolError("bad_request", f"memory_mb must be >= {runtime.min_memory_mb} for runtime "
                                           f"{runtime.id!r}: its guest cannot start with less")
    cpu = _bounded(body, "cpu_seconds", limits.cpu_seconds, limits.max_cpu_seconds, float)
    disk = _bounded(body, "disk_mb", limits.disk_mb, limits.max_disk_mb, int)
    network = check_network(body.get("network"), settings, tenant)
    secrets = Secrets.parse(body.get("secrets"))
    for i, secret in enumerate(secrets.items):
        for rule in secret.hosts:
            why = network.name_refusal(rule.name, None) if rule.name is not None else \
                None if network.has_network else "the sandbox has no network"
            if why is not None:
                raise ProtocolError("bad_request", f"secrets[{i}].hosts: {rule.text} cannot be reached: {why}")
    template = wire_field(body, "template", str, None)
    metadata = wire_field(body, "metadata", dict, {})
    if len(metadata) > 32 or not all(
        isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256 for k, v in metadata.items()
    ):
        raise ProtocolError("bad_request", "metadata: at most 32 string keys (<= 64) to strings (<= 256)")
    volumes = wire_field(body, "volumes", dict, {})
    if volumes and runtime.volume_store is None:
        raise ProtocolError("unsupported", f"runtime {runtime.id!r} does not mount volumes")
    patches = parse_patches(body.get("patches"))
    files = parse_files(body.get("files"))
    # WASM reaches only its preopens: a mount's copy goes under /work there.
    mounts = parse_mounts(body.get("mounts"), settings.storage.allowed_roots, work_only=runtime.id == "wasm")
    ports = _ports(body.get("ports"), runtime, settings.ports.max_per_sandbox)
    options = runtime.validate_options({k: v for k, v in body.items() if k not in CREATE_FIELDS})
    runtime.check_create(template, network.has_network)
    return CreateRequest(runtime=runtime, ttl=ttl, idle_timeout=idle, memory_mb=memory, cpu_seconds=cpu,
                         disk_mb=disk, network=network, template=template, metadata=metadata, options=options,
                         volumes=volumes, patches=patches, files=files,
                         mounts=mounts, secrets=secrets, ports=ports)


def check_network(value: Any, settings: Settings, tenant: str) -> NetworkPolicy:
    """The network policy a create or `PATCH` asks for, if this tenant may have it.

    Raises:
        ProtocolError: `bad_request` for a malformed policy; `forbidden` for a network the tenant
            may not have, or `"all"` when the operator has not allowed it to this tenant.
    """
    policy = NetworkPolicy.parse(value)
    if policy.has_network and not settings.network.allows(tenant):
        raise ProtocolError("forbidden", "this tenant may not create sandboxes with a network "
                                         "(the operator's [network] settings)")
    if policy.mode == "all" and not settings.network.allows_all(tenant):
        raise ProtocolError("forbidden", "network \"all\" (private networks too) is not allowed to this tenant: "
                                         "the operator names the tenants that may in [network] all_tenants")
    return policy


def _ports(value: Any, runtime: Runtime, most: int) -> tuple[int, ...]:
    """`"ports": [8000, ...]`: distinct port numbers, as many as a sandbox may publish, on a runtime
    whose guests can publish them (capability `ports`)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > most:
        raise ProtocolError("bad_request", f"'ports' is a list of at most {most} port numbers")
    ports = tuple(dict.fromkeys(check_port(v) for v in value))
    if ports and "ports" not in runtime.capabilities:
        raise ProtocolError("unsupported", f"runtime {runtime.id!r} cannot publish ports (its guests have no "
                                           "sockets to serve them)")
    return ports


def _bounded(body: Mapping[str, Any], name: str, default: float, maximum: float, kind: type) -> Any:
    value = wire_field(body, name, (int, float) if kind is float else int, default)
    if not 0 < value <= maximum:
        raise ProtocolError("bad_request", f"{name} must be > 0 and <= {maximum:g}")
    return kind(value)


class QuotaExceeded(ProtocolError):
    """A tenant's quota is used up; the REST layer answers 429 with `Retry-After: retry_after`."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__("quota_exceeded", message)
        self.retry_after = max(1, math.ceil(retry_after))


class TenantQuota:
    """The per-tenant quotas a create is admitted under: how many sandboxes, and how fast."""

    def __init__(self, quotas: Quotas) -> None:
        self.max_sandboxes = quotas.max_sandboxes
        self._rate = _CreateRate(quotas.creates_per_minute)

    def admit(self, tenant: str, count: int) -> None:
        """Admit one create for `tenant`, which has `count` sandboxes (made or being made).

        Raises:
            QuotaExceeded: the tenant is at `max_sandboxes`, or out of rate tokens. The count is
                checked first, so a create refused for it costs no token.
        """
        if count >= self.max_sandboxes:
            raise QuotaExceeded(f"tenant has {count} sandboxes, the quota is {self.max_sandboxes}", 5)
        wait = self._rate.take(tenant)
        if wait:
            raise QuotaExceeded("sandbox creation rate quota exceeded", wait)


class _CreateRate:
    """A token bucket per tenant for creates."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.tokens: dict[str, tuple[float, float]] = {}

    def take(self, tenant: str) -> float:
        """0 if a create may go ahead now, else the seconds until one may."""
        now = time.monotonic()
        tokens, at = self.tokens.get(tenant, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens < 1:
            self.tokens[tenant] = (tokens, now)
            return (1 - tokens) / self.rate if self.rate else 60.0
        self.tokens[tenant] = (tokens - 1, now)
        return 0.0
