"""The pod runtime: each sandbox a hardened Kubernetes pod running the guest agent.

Kubernetes is the only state: pods carry the sandbox id, tenant and owning gateway as labels, each
gateway holds a Lease while it lives, and any replica can find a sandbox by label, adopt it
(`load_state`) or remove it once its gateway's Lease went stale or its expiry passed. Every wait is
a watch with a deadline (plugins/pod/watcher.py), and a pod that cannot start (image pull errors,
unschedulable, a container that ended) fails the create at once with the reason.

The agent is reached through the API server: by default a fresh `python3 -m guest_agent` per
connection through `pods/exec`; with `channel = "attach"` the agent is the container's main
process and each connection attaches to it (docs/kubernetes.md weighs the two).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.egress.network import SandboxNetwork
from gateway.egress.policy import NetworkPolicy
from gateway.egress.secrets import Secrets
from gateway.runtime.agent_client import call_once
from gateway.runtime.base import Backend, ByteChannel, NotConfigured, Runtime, SandboxSpec
from gateway.runtime.pool import WarmPool
from gateway.storage.volumes import VolumeBackend
from guest_agent.wire import ProtocolError
from plugins.pod import egress
from plugins.pod import manifests as m
from plugins.pod.channel import StreamChannel
from plugins.pod.settings import IN_CLUSTER_NAMESPACE, PodSettings
from plugins.pod.watcher import PodWatcher, is_running, problem, summary

if TYPE_CHECKING:
    from plugins.pod.kube import Kube

log = logging.getLogger(__name__)

#: How long a deleted pod may take to go before it is deleted again with no grace at all.
DELETE_WAIT_S = 20.0
#: A sandbox id no pod had is not looked up again for this long (each look-up is a LIST on the API
#: server, and a client can ask for made-up ids as fast as it likes). Ids are random, so a real
#: sandbox is never asked for before it exists, except through this gateway's own create, which
#: forgets the miss.
MISS_TTL_S = 10.0
#: Misses remembered at most (the oldest go first): bounded memory under a flood of made-up ids.
MISS_CACHE_SIZE = 4096
#: LISTs for look-ups in flight at once, and look-ups allowed to wait for one; past that a look-up
#: is refused as `unavailable` (retryable) instead of queueing without end.
MAX_FINDS_RUNNING = 4
MAX_FINDS_WAITING = 64
#: After a stream ends, how long to wait for the pod's status to say why.
DEATH_WAIT_S = 2.0
#: API failures that mean "cannot reach or use the cluster now".
API_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError, OSError)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class PodBackend(Backend):
    """One sandbox pod (spec None while it waits in the warm pool)."""

    def __init__(self, runtime: PodRuntime, pod: str, spec: SandboxSpec | None, image: str,
                 *, sandbox_name: str | None = None) -> None:
        self.runtime = runtime
        self.pod = pod
        self.spec = spec
        self.image = image
        #: The agent-sandbox `Sandbox` owning the pod, in that mode.
        self.sandbox_name = sandbox_name
        #: The password of the sandbox's proxy URL (plugins/pod/egress.py), new with each replica
        #: that holds it.
        self.proxy_token = egress.new_token()
        #: The Secret holding the sandbox's secrets, once there is one.
        self.secret: str | None = None
        self._channel: StreamChannel | None = None

    @property
    def network(self) -> SandboxNetwork | None:
        """The sandbox's network (policy, secrets, figures), when it has one."""
        return self.spec.egress if self.spec is not None else None

    @property
    def label(self) -> str:
        return f"pod {self.runtime.settings.namespace}/{self.pod}"

    async def connect(self, *, resync: bool = False) -> None:
        """Open the stream to the agent: exec a fresh one, or attach to the running one."""
        kube, settings = self.runtime.kube, self.runtime.settings
        common = {"container": m.AGENT_CONTAINER, "stdin": True, "stdout": True, "stderr": True, "tty": False}
        try:
            if settings.channel == "exec":
                ws = await kube.open_stream(kube.core_ws.connect_get_namespaced_pod_exec, self.pod,
                                            settings.namespace, command=m.agent_command(settings, self.image), **common)
            else:
                ws = await kube.open_stream(kube.core_ws.connect_get_namespaced_pod_attach, self.pod,
                                            settings.namespace, **common)
        except self.runtime.kube_error as exc:
            raise ProtocolError("unavailable", f"{self.label}: the API server refused {settings.channel}: "
                                               f"{exc}") from None
        except API_ERRORS as exc:
            raise ProtocolError("unavailable", f"{self.label}: {settings.channel} failed: {exc}") from None
        self._channel = StreamChannel(ws, self.label, resync=resync)

    def channel(self) -> ByteChannel:
        assert self._channel is not None, "connect() first"
        return self._channel

    def guest_env(self) -> dict[str, str]:
        """A network sandbox's processes reach the policy proxy through this replica's listener,
        with the sandbox's credentials (plugins/pod/egress.py)."""
        listener = self.runtime.listener
        if self.network is None or self.spec is None or listener is None:
            return {}
        host, port = self.runtime.settings.proxy_address(listener.port)
        return egress.proxy_env(egress.proxy_url(host, port, self.spec.sandbox_id, self.proxy_token))

    async def network_changed(self, policy: Any) -> None:
        """Keep the pod's copy of the policy current, for a replica that adopts the sandbox later
        (the gateway enforces the new policy already)."""
        if self.network is None:
            return
        await self.runtime._api("save the sandbox's network policy", self.runtime.kube.call(
            self.runtime.kube.core.patch_namespaced_pod, self.pod, self.runtime.settings.namespace,
            {"metadata": {"annotations": {m.NETWORK_POLICY: egress.policy_annotation(self.network.policy)}}},
            _content_type="application/merge-patch+json"))

    async def wait_agent(self, timeout: float) -> None:
        """Ping the agent until it answers, so a warm-pool pod hands out an agent that already
        started (through exec, its interpreter starts only when the stream opens)."""
        await call_once(self.channel(), "ping", timeout, death_reason=self.wait_exited)

    def alive(self) -> bool:
        pod = self.runtime.watcher.find(self.pod)
        return pod is not None and is_running(pod) and self._channel is not None and not self._channel.ws.closed

    async def wait_exited(self) -> str:
        """Why the stream ended: the exec's own status, or the pod's (from the watch)."""
        channel = self._channel
        if channel is not None and self.runtime.settings.channel == "exec":
            ended = channel.ended_reason()
            if ended is not None:
                return ended

        def why(watcher: PodWatcher) -> str | None:
            pod = watcher.find(self.pod)
            if pod is None:
                gone = watcher.gone.get(self.pod)
                owner = ((gone or {}).get("metadata") or {}).get("labels", {}).get(m.GATEWAY)
                if owner and owner != self.runtime.settings.gateway_id:
                    return f"{self.label} was adopted by gateway {owner}"
                return f"{self.label} was deleted"
            found = problem(pod, fail_unschedulable=False)
            return f"{self.label}: {found}" if found else None

        try:
            return await self.runtime.watcher.wait(why, DEATH_WAIT_S)
        except TimeoutError:
            return f"the stream to {self.label} closed while its container still runs"

    async def restart_agent(self) -> None:
        """exec: a fresh agent (the old one reads end of input and exits, killing what it ran);
        attach: attach again to the same agent, whose state survives. Refused once the pod is gone."""
        pod = self.runtime.watcher.find(self.pod)
        if pod is None or not is_running(pod):
            raise ProtocolError("guest_died", f"{self.label}: {problem(pod or {}) or 'gone'}")
        if self._channel is not None:
            await self._channel.close()
        await self.connect(resync=self.runtime.settings.channel == "attach")

    async def host_metrics(self) -> dict[str, Any]:
        pod = self.runtime.watcher.find(self.pod) or {}
        status = (pod.get("status") or {})
        restarts = sum(c.get("restartCount", 0) for c in status.get("containerStatuses") or [])
        return {"pod": self.pod, "namespace": self.runtime.settings.namespace,
                "node": (pod.get("spec") or {}).get("nodeName"), "phase": status.get("phase"),
                "restarts": restarts, "channel": self.runtime.settings.channel}

    def get_state(self) -> dict[str, Any]:
        return {"namespace": self.runtime.settings.namespace, "pod": self.pod, "sandbox_name": self.sandbox_name,
                "sandbox_id": self.spec.sandbox_id if self.spec else None,
                "tenant": self.spec.tenant if self.spec else None}

    async def destroy(self) -> None:
        if self.runtime.listener is not None and self.spec is not None:
            self.runtime.listener.release(self.spec.sandbox_id, self)
        if self._channel is not None:
            with contextlib.suppress(*API_ERRORS):
                await self._channel.close()
        await self.runtime.remove(self.pod, sandbox_name=self.sandbox_name, secret=self.secret)


class PodRuntime(Runtime):
    """Settings: `[runtimes.pod]`, every one in plugins/pod/settings.py and docs/kubernetes.md."""

    id = "pod"
    description = "Kubernetes pods (or agent-sandbox Sandboxes), the agent over the API server's exec/attach"
    capabilities = frozenset({"network", "ports"})
    volume_store = "kubernetes"

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.settings = PodSettings()
        self._kube: Kube | None = None
        self._watcher: PodWatcher | None = None
        self.kube_error: type[Exception] = Exception
        self.pool: WarmPool[PodBackend] | None = None
        #: This replica's egress port (`egress_listen`), when pod sandboxes may have a network.
        self.listener: egress.ProxyListener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.misses = MissCache(MISS_CACHE_SIZE, MISS_TTL_S)
        self._finds = asyncio.Semaphore(MAX_FINDS_RUNNING)
        self._finds_waiting = 0

    def volume_backend(self) -> VolumeBackend | None:
        """Named volumes as PersistentVolumeClaims (plugins/pod/volumes.py)."""
        from plugins.pod.volumes import PodVolumes

        return PodVolumes(self)

    @property
    def kube(self) -> Kube:
        assert self._kube is not None, "the pod runtime has not started"
        return self._kube

    @property
    def watcher(self) -> PodWatcher:
        assert self._watcher is not None, "the pod runtime has not started"
        return self._watcher

    # -- start and stop --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, take this gateway's Lease, make sure sandboxes are isolated by default, follow
        this gateway's pods, remove orphans, then keep the Lease fresh and the pool full. Without a
        `[runtimes.pod]` table it stays off: a default install must not write to whatever cluster
        the host's kubeconfig happens to name."""
        if not self.config:
            raise NotConfigured("not configured: add a [runtimes.pod] table (docs/kubernetes.md; the Helm chart "
                               "writes one)")
        self.settings = PodSettings.from_config(self.config)
        kube_module = await asyncio.to_thread(importlib.import_module, "plugins.pod.kube")
        self.kube_error = kube_module.KubeError
        self._kube = await kube_module.Kube.connect(self.settings.kubeconfig, self.settings.context,
                                                    self.settings.namespace)
        try:
            await self._api("take this gateway's Lease", self.kube.call(
                self.kube.coordination.create_namespaced_lease, self.settings.namespace,
                m.lease_manifest(self.settings, _now())))
            await self._ensure_policy(m.deny_policy(self.settings.namespace))
            if self.settings.egress:
                self.listener = egress.ProxyListener(*self.settings.listen_address())
                await self.listener.start()
                await self._ensure_policy(m.egress_policy(self.settings, self.listener.port, _gateway_namespace(
                    self.settings.namespace)))
            if self.settings.mode == "agent-sandbox":
                await self._api("list agent-sandbox Sandboxes (are its CRDs installed?)", self._list_sandboxes())
            self._watcher = PodWatcher(self.kube, f"{m.SANDBOX_SELECTOR},{m.GATEWAY}={self.settings.gateway_id}")
            await self._api("watch sandbox pods", self._watcher.start())
            removed = await self.sweep()
            if removed:
                log.info("pod runtime: removed %d orphaned sandbox objects: %s", len(removed), ", ".join(removed))
        except BaseException:
            await self._close_client()
            raise
        self._tasks = [asyncio.create_task(self._renew_lease_forever(), name="pod-lease"),
                       asyncio.create_task(self._sweep_forever(), name="pod-sweep")]
        self.pool = WarmPool(self.id, self.settings.pool_size, self.settings.pool_refill_per_s,
                             make=self._make_pooled, alive=lambda backend: backend.alive(),
                             discard=lambda backend: backend.destroy())
        self.pool.start()
        log.info("pod runtime: gateway %s in namespace %s, mode %s, channel %s", self.settings.gateway_id,
                 self.settings.namespace, self.settings.mode, self.settings.channel)

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._kube is not None:
            with contextlib.suppress(self.kube_error, *API_ERRORS):
                await self.kube.call(self.kube.coordination.delete_namespaced_lease,
                                     m.lease_name(self.settings.gateway_id), self.settings.namespace)
        await self._close_client()

    async def _close_client(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        if self._watcher is not None:
            await self._watcher.stop()
        if self._kube is not None:
            await self._kube.close()

    async def _api(self, what: str, call: Any) -> Any:
        """`await call`, with API failures turned into one clear error naming what was tried."""
        try:
            return await call
        except self.kube_error as exc:
            hint = " (the gateway's RBAC Role lacks it)" if getattr(exc, "status", 0) == 403 else ""
            raise ProtocolError("unavailable", f"Kubernetes: cannot {what}: {exc}{hint}") from None
        except API_ERRORS as exc:
            raise ProtocolError("unavailable", f"Kubernetes: cannot {what}: the API server did not answer "
                                               f"({type(exc).__name__}: {exc})") from None

    async def _ensure_policy(self, policy: dict[str, Any]) -> None:
        """Make a namespace-wide NetworkPolicy unless it is there (the chart's, or another replica's)."""
        try:
            await self.kube.call(self.kube.networking.create_namespaced_network_policy, self.settings.namespace,
                                 policy)
        except self.kube_error as exc:
            if getattr(exc, "status", 0) != 409:
                raise

    async def _renew_lease_forever(self) -> None:
        name, namespace = m.lease_name(self.settings.gateway_id), self.settings.namespace
        while True:
            await asyncio.sleep(self.settings.lease_duration_s / 3)
            try:
                await self.kube.call(self.kube.coordination.patch_namespaced_lease, name, namespace,
                                     {"spec": {"renewTime": m.micro_timestamp(_now())}},
                                     _content_type="application/merge-patch+json")
            except self.kube_error as exc:
                if getattr(exc, "status", 0) != 404:
                    log.warning("pod runtime: renewing the Lease failed: %s", exc)
                    continue
                # Another replica judged this gateway dead (it missed renewals) and removed the Lease:
                # take a new one; the sweep may already have removed this gateway's sandboxes.
                log.error("pod runtime: this gateway's Lease was removed; taking it again")
                with contextlib.suppress(self.kube_error, *API_ERRORS):
                    await self.kube.call(self.kube.coordination.create_namespaced_lease, namespace,
                                         m.lease_manifest(self.settings, _now()))
            except API_ERRORS as exc:
                log.warning("pod runtime: renewing the Lease failed: %s", exc)

    async def _sweep_forever(self) -> None:
        failures: tuple[type[BaseException], ...] = (ProtocolError, self.kube_error, *API_ERRORS)
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            try:
                await self.sweep()
            except failures as exc:
                log.warning("pod runtime: orphan sweep failed: %s", exc)

    # -- orphans ---------------------------------------------------------------------------------

    async def _list_sandboxes(self, selector: str = m.SANDBOX_SELECTOR) -> list[dict[str, Any]]:
        listing = await self.kube.call(self.kube.custom.list_namespaced_custom_object, m.SANDBOX_GROUP,
                                       m.SANDBOX_VERSION, self.settings.namespace, m.SANDBOX_PLURAL,
                                       label_selector=selector)
        return list(listing.get("items") or [])

    async def sweep(self, now: datetime.datetime | None = None) -> list[str]:
        """Remove what no live gateway owns: sandbox pods (and their Sandboxes and Secrets) whose
        gateway's Lease is gone or stale, anything past its expiry annotation, and stale Leases
        with nothing left. Called at start and every `sweep_interval_s`; returns what it removed.
        `now` lets tests look into the future instead of waiting."""
        now = now or _now()
        kube, ns = self.kube, self.settings.namespace
        leases = (await self._api("list gateway Leases", kube.call(
            kube.coordination.list_namespaced_lease, ns, label_selector=m.LEASE_SELECTOR))).get("items") or []
        alive = {self.settings.gateway_id} | {
            ((lease.get("metadata") or {}).get("labels") or {}).get(m.GATEWAY) for lease in leases
            if m.lease_alive(lease, now)}

        def orphaned(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            expires = m.parse_time((meta.get("annotations") or {}).get(m.EXPIRES_AT))
            return (meta.get("labels") or {}).get(m.GATEWAY) not in alive or (expires is not None and expires < now)

        removed: list[str] = []
        pods = (await self._api("list sandbox pods", kube.call(
            kube.core.list_namespaced_pod, ns, label_selector=m.SANDBOX_SELECTOR))).get("items") or []
        sandboxes = (await self._api("list Sandboxes", self._list_sandboxes())
                     if self.settings.mode == "agent-sandbox" else [])
        for sandbox in sandboxes:
            if orphaned(sandbox):
                removed.append(f"sandbox/{sandbox['metadata']['name']}")
                await self._delete(kube.custom.delete_namespaced_custom_object, m.SANDBOX_GROUP, m.SANDBOX_VERSION,
                                   ns, m.SANDBOX_PLURAL, sandbox["metadata"]["name"])
        for pod in pods:
            if orphaned(pod) and not pod["metadata"].get("deletionTimestamp"):
                removed.append(f"pod/{pod['metadata']['name']}")
                await self._delete(kube.core.delete_namespaced_pod, pod["metadata"]["name"], ns,
                                   grace_period_seconds=self.settings.delete_grace_s)
                # (Owned by the pod, so a garbage collector would take it too: not every cluster runs one
                # promptly, and an orphan's secrets should not wait.)
                secret = (pod["metadata"].get("annotations") or {}).get(m.SECRETS)
                if secret:
                    removed.append(f"secret/{secret}")
                    await self._delete(kube.core.delete_namespaced_secret, secret, ns)
        owners = {((p.get("metadata") or {}).get("labels") or {}).get(m.GATEWAY) for p in pods if not orphaned(p)}
        for lease in leases:
            gateway = ((lease.get("metadata") or {}).get("labels") or {}).get(m.GATEWAY)
            if gateway not in alive and gateway not in owners:
                removed.append(f"lease/{lease['metadata']['name']}")
                await self._delete(kube.coordination.delete_namespaced_lease, lease["metadata"]["name"], ns)
        return removed

    async def _delete(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Delete one object; already gone is fine, anything else is logged and left to the next
        sweep (or the pod's activeDeadlineSeconds)."""
        try:
            await self.kube.call(fn, *args, **kwargs)
        except self.kube_error as exc:
            if getattr(exc, "status", 0) != 404:
                log.warning("pod runtime: delete %s failed: %s", args[-1] if args else "", exc)
        except API_ERRORS as exc:
            log.warning("pod runtime: delete %s failed: %s", args[-1] if args else "", exc)

    # -- create ----------------------------------------------------------------------------------

    def _image(self, template: str | None) -> str:
        try:
            return m.image_for(self.settings, template)
        except KeyError:
            raise ProtocolError("bad_request", f"unknown pod template {template!r}; have templates "
                                               f"{sorted(self.settings.templates)} and languages "
                                               f"{sorted(self.settings.languages)}") from None

    def check_create(self, template: str | None, network: bool) -> None:
        self._image(template)
        if network and not self.settings.egress:
            raise ProtocolError("unsupported", "pod sandboxes reach the network only through the gateway's egress "
                                               "proxy, which is off here: set [runtimes.pod] egress_listen "
                                               "(docs/kubernetes.md)")

    def languages(self) -> dict[str, list[str]]:
        """By template: a language of `[runtimes.pod] languages` runs in its image (and python, in
        the agent). What else an image holds only its agent can tell."""
        # (a template of the same name wins: its image is the operator's, not this map's)
        return {lang: sorted({"python", lang}) for lang in self.settings.languages
                if lang not in self.settings.templates}

    def _poolable(self, spec: SandboxSpec) -> bool:
        # A sandbox with volumes starts cold: a warm pod cannot gain a volume. A network it can: the
        # claim's labels let the egress policy select it, guest.env gives it the proxy.
        return (self.pool is not None and self.settings.mode == "pod" and spec.template is None
                and not spec.volumes
                and (spec.memory_mb, spec.disk_mb) == (self.settings.pool_memory_mb, self.settings.pool_disk_mb))

    async def create(self, spec: SandboxSpec) -> Backend:
        self.misses.forget(spec.sandbox_id)
        image = self._image(spec.template)
        if spec.network and (spec.egress is None or self.listener is None):
            raise ProtocolError("unsupported", "a pod sandbox's network needs the gateway's egress proxy "
                                               "([runtimes.pod] egress_listen) and the sandbox's policy")
        backend: PodBackend | None = None
        if self._poolable(spec):
            assert self.pool is not None
            warm = self.pool.take()
            if warm is not None:
                try:
                    pod = await self._api("claim a warm pod", self.kube.call(
                        self.kube.core.patch_namespaced_pod, warm.pod, self.settings.namespace,
                        m.claim_patch(self.settings, spec, _now()), _content_type="application/merge-patch+json"))
                    warm.spec = spec
                    await self._save_secrets(warm, pod)
                    backend = warm
                except ProtocolError as exc:
                    log.warning("pod runtime: a warm pod could not be claimed, starting cold: %s", exc.message)
                    await asyncio.shield(warm.destroy())
                except BaseException:  # cancelled mid-claim: taken from the pool, the pod is ours alone
                    await asyncio.shield(warm.destroy())
                    raise
        if backend is None:
            backend = await self._start(spec, image, spec.memory_mb, spec.disk_mb)
        if self.listener is not None and spec.egress is not None:
            self.listener.hold(spec.sandbox_id, backend)
        return backend

    async def _save_secrets(self, backend: PodBackend, pod: Mapping[str, Any]) -> None:
        """Keep the sandbox's secrets in a Secret owned by its pod, for a replica that adopts it."""
        spec = backend.spec
        if spec is None or spec.egress is None or not spec.egress.secrets:
            return
        manifest = m.secret_manifest(self.settings, spec, pod,
                                     egress.secret_data(egress.secrets_document(spec.egress.secrets)))
        await self._api("keep the sandbox's secrets in a Secret", self.kube.call(
            self.kube.core.create_namespaced_secret, self.settings.namespace, manifest))
        backend.secret = manifest["metadata"]["name"]

    async def _make_pooled(self) -> PodBackend:
        backend = await self._start(None, self.settings.sandbox_image, self.settings.pool_memory_mb,
                                    self.settings.pool_disk_mb)
        try:
            await backend.wait_agent(self.settings.ready_timeout_s)
        except BaseException:
            await asyncio.shield(backend.destroy())
            raise
        return backend

    async def _start(self, spec: SandboxSpec | None, image: str, memory_mb: int, disk_mb: int) -> PodBackend:
        """Create the pod (or Sandbox), wait until its container runs, open the agent's stream.
        Leaves nothing behind when it fails or is cancelled."""
        name = f"sandgate-{secrets.token_hex(6)}"
        now = _now()
        kube, ns = self.kube, self.settings.namespace
        sandbox_name = name if self.settings.mode == "agent-sandbox" else None
        backend = PodBackend(self, name, spec, image, sandbox_name=sandbox_name)
        try:
            if sandbox_name is not None:
                assert spec is not None
                await self._api("create the agent-sandbox Sandbox", kube.call(
                    kube.custom.create_namespaced_custom_object, m.SANDBOX_GROUP, m.SANDBOX_VERSION, ns,
                    m.SANDBOX_PLURAL, m.sandbox_resource(self.settings, name, spec, now, image=image)))
                pod = await self._wait_ready(lambda w: w.find_labelled(
                    m.SANDBOX_ID, m.label_value(spec.sandbox_id)), f"Sandbox {ns}/{name}")
                backend.pod = pod["metadata"]["name"]
                await self._save_secrets(backend, pod)
            else:
                pod = await self._api("create the sandbox pod", kube.call(
                    kube.core.create_namespaced_pod, ns,
                    m.pod_manifest(self.settings, name, spec, now, image=image, memory_mb=memory_mb, disk_mb=disk_mb)))
                await self._save_secrets(backend, pod)
                await self._wait_ready(lambda w: w.find(name), f"pod {ns}/{name}")
            await backend.connect()
        except BaseException:
            await asyncio.shield(backend.destroy())
            raise
        return backend

    async def _wait_ready(self, lookup: Any, what: str) -> dict[str, Any]:
        """The pod once its sandbox container runs; ProtocolError('unavailable') with the reason as
        soon as it cannot (or at the deadline, with its last status)."""
        last: list[dict[str, Any]] = []

        def ready(watcher: PodWatcher) -> dict[str, Any] | None:
            pod: dict[str, Any] | None = lookup(watcher)
            if pod is None:
                return None
            last[:] = [pod]
            found = problem(pod, fail_unschedulable=self.settings.fail_unschedulable)
            if found is not None:
                raise ProtocolError("unavailable", f"{what} cannot start: {found}")
            return pod if is_running(pod) else None

        try:
            return await self.watcher.wait(ready, self.settings.ready_timeout_s)
        except TimeoutError:
            raise ProtocolError("unavailable", f"{what} not running after {self.settings.ready_timeout_s:g}s: "
                                               f"{summary(last[0] if last else None)}") from None

    # -- remove ----------------------------------------------------------------------------------

    async def remove(self, pod: str, *, sandbox_name: str | None, secret: str | None) -> None:
        """Delete a sandbox's objects and wait (on the watch) until its pod is gone; a pod that is
        still there after DELETE_WAIT_S is deleted with no grace period. Never raises for objects
        already gone."""
        kube, ns = self.kube, self.settings.namespace
        if sandbox_name is not None:
            await self._delete(kube.custom.delete_namespaced_custom_object, m.SANDBOX_GROUP, m.SANDBOX_VERSION, ns,
                               m.SANDBOX_PLURAL, sandbox_name)
        if secret is not None:
            await self._delete(kube.core.delete_namespaced_secret, secret, ns)
        # Also with a Sandbox: no garbage collector may run (and it would take its time).
        await self._delete(kube.core.delete_namespaced_pod, pod, ns, grace_period_seconds=self.settings.delete_grace_s)

        def gone(watcher: PodWatcher) -> bool | None:
            return True if watcher.find(pod) is None else None

        try:
            await self.watcher.wait(gone, self.settings.delete_grace_s + DELETE_WAIT_S)
        except TimeoutError:
            log.warning("pod runtime: %s/%s still there %gs after its delete; deleting it with no grace period",
                        ns, pod, self.settings.delete_grace_s + DELETE_WAIT_S)
            await self._delete(kube.core.delete_namespaced_pod, pod, ns, grace_period_seconds=0)

    # -- finding and adopting ----------------------------------------------------------------------

    async def find(self, sandbox_id: str) -> dict[str, Any] | None:
        """The state (as `Backend.get_state`) of the sandbox `sandbox_id`, whichever gateway made it,
        found by its label; None if no pod has it (remembered for MISS_TTL_S).

        Raises:
            ProtocolError: `unavailable` when MAX_FINDS_WAITING look-ups already wait for the API server.
        """
        if self.misses.holds(sandbox_id):
            return None
        if self._finds.locked() and self._finds_waiting >= MAX_FINDS_WAITING:
            raise ProtocolError("unavailable", "too many sandbox look-ups in flight; retry shortly")
        self._finds_waiting += 1
        try:
            await self._finds.acquire()
        finally:
            self._finds_waiting -= 1
        try:
            if self.misses.holds(sandbox_id):  # found missing while this one waited
                return None
            found = await self._find(sandbox_id)
        finally:
            self._finds.release()
        if found is None:
            self.misses.add(sandbox_id)
        return found

    async def _find(self, sandbox_id: str) -> dict[str, Any] | None:
        listing = await self._api("find a sandbox pod", self.kube.call(
            self.kube.core.list_namespaced_pod, self.settings.namespace,
            label_selector=f"{m.SANDBOX_SELECTOR},{m.SANDBOX_ID}={m.label_value(sandbox_id)}"))
        for pod in listing.get("items") or []:
            meta = pod.get("metadata") or {}
            annotations = meta.get("annotations") or {}
            if annotations.get(m.SANDBOX_ID) == sandbox_id:
                owner = (pod.get("metadata", {}).get("ownerReferences") or [{}])[0]
                return {"namespace": meta.get("namespace"), "pod": meta["name"], "sandbox_id": sandbox_id,
                        "tenant": annotations.get(m.TENANT),
                        "sandbox_name": owner.get("name") if owner.get("kind") == "Sandbox" else None}
        return None

    async def load_state(self, state: Mapping[str, Any]) -> Backend | None:
        """Adopt a sandbox another gateway (or this one before a restart) created: relabel its pod
        to this gateway, guarded by the pod's resourceVersion so two adopters cannot both win, and
        open a stream to its agent. None if it is gone, ended, or not the state's tenant's."""
        sandbox_id = state.get("sandbox_id")
        if not isinstance(sandbox_id, str):
            return None
        found = await self.find(sandbox_id)
        if found is None or found["tenant"] != state.get("tenant"):
            return None
        kube, ns, name = self.kube, self.settings.namespace, found["pod"]
        pod = await self._api("read the sandbox pod", kube.call(kube.core.read_namespaced_pod, name, ns))
        if not is_running(pod):
            return None
        annotations = pod["metadata"].get("annotations") or {}
        try:
            fields = json.loads(annotations.get(m.SPEC, "{}"))
            spec = SandboxSpec(sandbox_id=sandbox_id, tenant=str(found["tenant"]), memory_mb=int(fields["memory_mb"]),
                               cpu_seconds=float(fields["cpu_seconds"]), disk_mb=int(fields["disk_mb"]),
                               network=bool(fields["network"]), template=fields.get("template"),
                               ttl_s=_number(fields.get("ttl_s")), idle_timeout_s=_number(fields.get("idle_timeout_s")),
                               created_at=_number(fields.get("created_at")),
                               volumes=m.parse_volumes(fields.get("volumes")))
        except (ValueError, KeyError, TypeError):
            return None
        kept = await self._kept_network(sandbox_id, annotations)
        patch = {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"],
                              "labels": {m.GATEWAY: self.settings.gateway_id}}}
        try:
            await kube.call(kube.core.patch_namespaced_pod, name, ns, patch,
                            _content_type="application/merge-patch+json")
        except self.kube_error as exc:
            if getattr(exc, "status", 0) in (404, 409):  # gone, or another gateway adopted it first
                return None
            raise ProtocolError("unavailable", f"Kubernetes: cannot adopt pod {ns}/{name}: {exc}") from None
        if found["sandbox_name"]:
            await self._api("adopt the Sandbox", kube.call(
                kube.custom.patch_namespaced_custom_object, m.SANDBOX_GROUP, m.SANDBOX_VERSION, ns, m.SANDBOX_PLURAL,
                found["sandbox_name"], {"metadata": {"labels": {m.GATEWAY: self.settings.gateway_id}},
                                        "spec": {"podTemplate": {"metadata": {"labels": {
                                            m.GATEWAY: self.settings.gateway_id}}}}},
                _content_type="application/merge-patch+json"))
        image = pod["spec"]["containers"][0]["image"]
        backend = PodBackend(self, name, spec, image, sandbox_name=found["sandbox_name"])
        try:  # this gateway's watch must know the pod before anything waits on it
            await self.watcher.wait(lambda w: True if w.find(name) else None, self.settings.ready_timeout_s)
        except TimeoutError:
            raise ProtocolError("unavailable", f"pod {ns}/{name} adopted but never seen by the watch") from None
        await backend.connect(resync=self.settings.channel == "attach")
        if kept is not None and self.egress is not None and self.listener is not None:
            policy, secrets = kept
            backend.spec = dataclasses.replace(spec, network=True,
                                               egress=self.egress.attach(sandbox_id, spec.tenant, policy, secrets))
            backend.secret = annotations.get(m.SECRETS) or None
            self.listener.hold(sandbox_id, backend)
        else:
            backend.spec = dataclasses.replace(spec, network=False)
        return backend

    async def _kept_network(self, sandbox_id: str,
                            annotations: Mapping[str, str]) -> tuple[NetworkPolicy, Secrets] | None:
        """The policy and secrets a pod keeps for the replica that adopts it; None for a sandbox
        without a network, or one this replica cannot give its network (it goes on without)."""
        text = annotations.get(m.NETWORK_POLICY)
        if text is None:
            return None
        if self.listener is None or self.egress is None:
            log.warning("pod runtime: sandbox %s has a network, and this gateway has no egress listener "
                        "([runtimes.pod] egress_listen): adopted without one", sandbox_id)
            return None
        try:
            policy = egress.parse_policy(text)
        except ValueError as exc:
            log.warning("pod runtime: sandbox %s: its stored network policy is unreadable (%s): adopted without "
                        "a network", sandbox_id, exc)
            return None
        name = annotations.get(m.SECRETS)
        if not name:
            return policy, Secrets()
        try:
            secret = await self.kube.call(self.kube.core.read_namespaced_secret, name, self.settings.namespace)
            return policy, egress.parse_secrets(egress.document_of(secret))
        except self.kube_error as exc:
            if getattr(exc, "status", 0) != 404:
                raise ProtocolError("unavailable", f"Kubernetes: cannot read sandbox {sandbox_id}'s secrets: "
                                                   f"{exc}") from None
            why = "its Secret is gone"
        except API_ERRORS as exc:
            raise ProtocolError("unavailable", f"Kubernetes: cannot read sandbox {sandbox_id}'s secrets: "
                                               f"{exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            why = f"its Secret is unreadable ({type(exc).__name__})"  # never the message: it may quote a value
        log.warning("pod runtime: sandbox %s: %s; adopted with its network policy and without its secrets",
                    sandbox_id, why)
        return policy, Secrets()


class MissCache:
    """Sandbox ids recently looked up and not found: at most `size`, each for `ttl_s` (sans-I/O)."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def holds(self, key: str) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._expiry[key]
            return False
        return True

    def add(self, key: str) -> None:
        self._expiry[key] = self._clock() + self.ttl_s
        self._expiry.move_to_end(key)
        while len(self._expiry) > self.size:
            self._expiry.popitem(last=False)

    def forget(self, key: str) -> None:
        self._expiry.pop(key, None)


def _gateway_namespace(sandbox_namespace: str) -> str:
    """The gateway's own namespace (its service account's, in a cluster), else the sandboxes'."""
    try:
        with open(IN_CLUSTER_NAMESPACE) as f:
            return f.read().strip() or sandbox_namespace
    except OSError:
        return sandbox_namespace


def _number(value: Any) -> float | None:
    """A float from a stored annotation field, None if absent or not a number."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
