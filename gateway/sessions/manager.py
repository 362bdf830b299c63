"""Lifecycle: the registry of sandboxes, and `SandboxManager`, which creates, finds and ends them.

The manager starts and stops the runtimes; creates a sandbox once `admission` has checked the
request and the tenant's quota; finds a tenant's sandbox, adopting one a runtime still has (another
replica's, or this gateway's before a restart); keeps each sandbox's agent alive (the watcher, and
`restart_agent`, which the op router uses too); and destroys sandboxes on request, on shutdown and
when the reaper finds them expired or idle.

The model is `sandbox.Sandbox`; admission is `admission`; what ops reach the agent, and how, is
`routing.OpRouter`, mixed into `SandboxManager` so that callers keep one object (why a mixin: see
`routing`). The web layer only translates HTTP and WebSocket messages into calls here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

import pluggy

from gateway.config import Settings
from gateway.egress.network import Egress, upstream_context
from gateway.egress.resolver import Resolver, parse_nameservers
from gateway.functions.code_cache import CodeCache
from gateway.functions.deployed import FunctionRegistry
from gateway.ports.registry import PortRegistry
from gateway.runtime.agent_client import AgentClient
from gateway.runtime.base import Backend, NotConfigured, Runtime, SandboxSpec
from gateway.sessions.admission import TenantQuota, check_create, check_network
from gateway.sessions.replay import ReplayBudget
from gateway.sessions.routing import OpRouter
from gateway.sessions.sandbox import Sandbox
from gateway.storage import local, mount_sync, patches
from gateway.storage.volumes import VolumeBackend, VolumeRegistry
from guest_agent.wire import ProtocolError

log = logging.getLogger(__name__)


class SandboxManager(OpRouter):
    """The sandboxes of every tenant, from create to destroy; and, through `OpRouter`, their ops."""

    def __init__(self, settings: Settings, runtimes: Mapping[str, Runtime], pm: pluggy.PluginManager) -> None:
        self.settings = settings
        self.runtimes = dict(runtimes)
        self.pm = pm
        self._sandboxes: dict[str, Sandbox] = {}
        self._creating: dict[str, int] = {}
        self._adopting: dict[str, asyncio.Lock] = {}
        #: Destroys under way, by sandbox id (see `destroy`).
        self._destroying: dict[str, asyncio.Task[None]] = {}
        self._quota = TenantQuota(settings.quotas)
        #: Every code body the gateway saw, per tenant, by hash (`code_ref`).
        self.code_cache = CodeCache(settings.functions.code_cache_bytes)
        #: Deployed functions and their instances (sandboxes this manager holds for them).
        self.functions = FunctionRegistry(self)
        #: The replay bytes of every sandbox's execs together (each sandbox has its own share).
        self.replay_budget = ReplayBudget(settings.limits.replay_gateway_bytes)
        self._reaper: asyncio.Task[None] | None = None
        self.draining = False
        self.unavailable: dict[str, str] = {}
        #: Named volumes; its stores are known once the runtimes started (`start`).
        self.volumes = VolumeRegistry(settings.storage, {})
        #: Why a volume store is missing here, by store name (GET /v1/runtimes lists it).
        self.volume_stores_unavailable: dict[str, str] = {}
        #: Sandboxes' networks: the resolver, upstream trust and each sandbox's policy and figures.
        self.egress = Egress(resolver=Resolver(parse_nameservers(settings.network.nameservers)),
                             upstream_tls=upstream_context(settings.network.upstream_ca_file))

    # -- start and stop ----------------------------------------------------------------------

    async def start(self) -> None:
        for runtime_id, runtime in list(self.runtimes.items()):
            try:
                await runtime.start()
            except NotConfigured as exc:  # an optional runtime left off on purpose
                log.info("runtime %s is off: %s", runtime_id, exc)
                self.unavailable[runtime_id] = str(exc)
                del self.runtimes[runtime_id]
            except Exception as exc:
                log.error("runtime %s unavailable: %s", runtime_id, exc)
                self.unavailable[runtime_id] = str(exc)
                del self.runtimes[runtime_id]
        self._start_volumes()
        self._reaper = asyncio.create_task(self._reap_forever(), name="sandbox-reaper")
        self.functions.start()

    def _start_volumes(self) -> None:
        backends: dict[str, VolumeBackend] = {}
        for runtime in self.runtimes.values():
            store = runtime.volume_store
            if store is None or store in backends:
                continue
            if store == local.LocalVolumes.store:
                why = local.available()
                if why is not None:
                    self.volume_stores_unavailable[store] = why
                    continue
                backends[store] = local.LocalVolumes(self.volumes.dir)
            else:
                backend = runtime.volume_backend()
                if backend is not None:
                    backends[store] = backend
        self.volumes.backends = backends
        self.volumes.load()

    async def drain(self) -> None:
        """Refuse new sandboxes and destroy every sandbox: in-flight execs end now with
        `unavailable` (a REST caller gets its partial output and that error) and guests stop.
        Called when shutdown begins, before the web server waits for its handlers: a REST exec
        would otherwise hold the shutdown for its whole timeout with its guest running."""
        self.draining = True
        await self.functions.close()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(self.destroy(s, "shutdown") for s in list(self._sandboxes.values())),
                             *self._destroying.values(), return_exceptions=True)

    async def close(self) -> None:
        """Drain (see `drain`), then stop the runtimes."""
        await self.drain()
        for runtime in self.runtimes.values():
            try:
                await runtime.stop()
            except Exception:
                log.exception("runtime %s failed to stop", runtime.id)

    # -- create, find, destroy ---------------------------------------------------------------

    async def create(self, tenant: str, body: Mapping[str, Any], *, owner: str | None = None) -> Sandbox:
        """Create a sandbox for `tenant` from a create request's body (`admission` checks it);
        `owner` marks one the gateway makes for its own use (see `Sandbox.owner`).

        Raises:
            ProtocolError: `unavailable` while draining; what `check_create` raises; `QuotaExceeded`;
                whatever the runtime raises while it creates the sandbox or its agent says hello.
        """
        if self.draining:
            raise ProtocolError("unavailable", "the gateway is shutting down")
        request = check_create(body, self.settings, self.runtimes, self.unavailable, tenant)
        runtime = request.runtime
        sandbox_id = "sb_" + secrets.token_urlsafe(16)
        now = time.time()
        store = runtime.volume_store if runtime.volume_store in self.volumes.backends else None
        if request.volumes and store is None:
            why = self.volume_stores_unavailable.get(str(runtime.volume_store), "no volume store runs here")
            raise ProtocolError("unavailable", f"runtime {runtime.id!r} cannot mount volumes here: {why}")
        # Volumes before the quota: a missing or busy volume must not cost a rate token.
        spec = request.spec(sandbox_id, tenant, now, self.volumes.acquire(tenant, sandbox_id, store, request.volumes))
        if request.network.has_network:
            spec = dataclasses.replace(spec, egress=self.egress.attach(sandbox_id, tenant, request.network,
                                                                       request.secrets))
        self._creating[tenant] = self._creating.get(tenant, 0) + 1
        try:
            # Only now, with every option checked: a bad request never costs a quota or rate token.
            count = sum(1 for s in self._sandboxes.values() if s.tenant == tenant) + self._creating[tenant] - 1
            self._quota.admit(tenant, count)
            backend = await runtime.create(spec)
            try:
                agent = await self._connect(backend)
            except BaseException:
                await backend.destroy()
                raise
            try:
                await self._guest_env(agent, spec, runtime)
                await patches.apply(lambda op, args: agent.request(op, **args), request.patches, request.files)
                mounts = tuple(mount_sync.MountState(m) for m in request.mounts)
                for mount in request.mounts:
                    # WASI has no file modes (its guest is not refused by them): a denial is refused at sync.
                    await mount_sync.copy_in(agent, mount, self.settings.storage.allowed_roots,
                                             modes=runtime.id != "wasm")
                # Change tracking starts here: what the create placed is not a change of the sandbox's.
                await self._start_tracking(agent, spec, mounts)
            except BaseException:
                await backend.destroy()
                await agent.close()
                raise
        except BaseException:
            await self.volumes.release(sandbox_id)
            if spec.egress is not None:
                self.egress.detach(spec.egress)
            raise
        finally:
            self._creating[tenant] -= 1
        sandbox = Sandbox(id=sandbox_id, tenant=tenant, runtime=runtime, spec=spec, backend=backend,
                          agent=agent, ttl=request.ttl, idle_timeout=request.idle_timeout,
                          metadata=request.metadata, created_at=now, replay_budget=self._sandbox_budget(),
                          owner=owner, mounts=mounts, ports=PortRegistry(self.settings.ports))
        for port in request.ports:
            sandbox.ports.publish(port)
        self._sandboxes[sandbox_id] = sandbox
        sandbox.spawn(self._watch(sandbox), f"watch-{sandbox_id}")
        self.pm.hook.sandgate_sandbox_created(sandbox_id=sandbox_id, tenant=tenant, runtime=runtime.id)
        return sandbox

    async def update(self, sandbox: Sandbox, body: Mapping[str, Any]) -> None:
        """`PATCH /v1/sandboxes/{id}`: change a running sandbox. `network`: its policy, within what
        the tenant may have; open connections the new policy refuses are ended.

        Raises:
            ProtocolError: `bad_request` for an unknown field or a malformed policy, `forbidden`
                as at create, `unsupported` to give a network to a sandbox created without one.
        """
        unknown = set(body) - {"network"}
        if unknown:
            raise ProtocolError("bad_request", f"cannot change {sorted(unknown)} (PATCH takes: network)")
        if "network" in body:
            policy = check_network(body["network"], self.settings, sandbox.tenant)
            network = sandbox.spec.egress
            if network is None:
                if policy.has_network:
                    raise ProtocolError("unsupported", "this sandbox was created without a network, and a running "
                                                       "sandbox cannot be given one: create it with a policy "
                                                       "(e.g. {\"allow\": []}) to open it later")
                return
            network.set_policy(policy)
            await sandbox.backend.network_changed(policy.to_wire())

    @staticmethod
    async def _guest_env(agent: AgentClient, spec: SandboxSpec, runtime: Runtime) -> None:
        """Give the guest its secrets' placeholders (and, where its own TLS clients meet the
        proxy's certificates, the sandbox's CA)."""
        network = spec.egress
        if network is None or not network.secrets:
            return
        args: dict[str, Any] = {"set": network.secrets.env()}
        if runtime.guest_speaks_tls:
            args["ca_pem"] = network.ca.cert_pem
        await agent.request("guest.env", **args)

    @staticmethod
    async def _start_tracking(agent: AgentClient, spec: SandboxSpec, mounts: tuple[mount_sync.MountState, ...]) -> None:
        """Track the volumes and mounts besides /work from now, and pin each mount's sync point."""
        await agent.request("fs.changes", track=[v.path for v in spec.volumes] + [m.spec.path for m in mounts],
                            base=True)
        await mount_sync.pin(agent, mounts)

    async def _connect(self, backend: Backend) -> AgentClient:
        limits = self.settings.limits
        agent = AgentClient(backend.channel(), request_timeout=limits.agent_request_timeout_s,
                            death_reason=backend.wait_exited, stream_queue_bytes=limits.agent_stream_queue_bytes,
                            turn_events=limits.agent_turn_events)
        try:
            await agent.start()
        except BaseException:
            await agent.close()
            raise
        return agent

    def get(self, tenant: str, sandbox_id: str) -> Sandbox:
        """The tenant's sandbox; another tenant's answers exactly like a missing one (404)."""
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox is None or not secrets.compare_digest(sandbox.tenant, tenant):
            raise ProtocolError("not_found", "no such sandbox")
        return sandbox

    def find(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with this id whoever's it is, if this gateway holds it: for a published
        port's token, which names a sandbox without naming its tenant. Never adopts."""
        return self._sandboxes.get(sandbox_id)

    async def lookup(self, tenant: str, sandbox_id: str) -> Sandbox:
        """`get`, and on a miss adopt the sandbox from a runtime that finds it (a pod made by
        another gateway replica, or by this one before a restart: Kubernetes labels are the
        source of truth). An adopted sandbox keeps its ttl, idle timeout and creation time when the
        runtime kept them (`SandboxSpec`); else it gets this gateway's defaults from now."""
        try:
            return self.get(tenant, sandbox_id)
        except ProtocolError:
            if self.draining or not sandbox_id.startswith("sb_"):
                raise
        async with self._adopting.setdefault(sandbox_id, asyncio.Lock()):
            try:
                if sandbox_id in self._sandboxes:  # adopted while this request waited
                    return self.get(tenant, sandbox_id)
                for runtime in list(self.runtimes.values()):
                    state = await runtime.find(sandbox_id)
                    if state is None:
                        continue
                    if not secrets.compare_digest(str(state.get("tenant")), tenant):
                        break  # another tenant's: answered exactly like a missing one
                    backend = await runtime.load_state(state)
                    if backend is None:
                        break
                    return await self._adopt(runtime, backend, sandbox_id, tenant)
            finally:
                self._adopting.pop(sandbox_id, None)
        raise ProtocolError("not_found", "no such sandbox")

    async def _adopt(self, runtime: Runtime, backend: Backend, sandbox_id: str, tenant: str) -> Sandbox:
        try:
            agent = await self._connect(backend)
        except BaseException:
            await backend.destroy()
            raise
        limits = self.settings.limits
        spec = getattr(backend, "spec", None)
        if not isinstance(spec, SandboxSpec):
            spec = SandboxSpec(sandbox_id=sandbox_id, tenant=tenant, memory_mb=limits.memory_mb,
                               cpu_seconds=limits.cpu_seconds, disk_mb=limits.disk_mb)
        # The sandbox keeps the life it was created with; the age is carried over to this clock.
        created_at = spec.created_at if spec.created_at is not None else time.time()
        age = max(0.0, time.time() - created_at)
        ttl = spec.ttl_s if spec.ttl_s is not None else limits.ttl_s
        idle = spec.idle_timeout_s if spec.idle_timeout_s is not None else limits.idle_timeout_s
        sandbox = Sandbox(id=sandbox_id, tenant=tenant, runtime=runtime, spec=spec, backend=backend, agent=agent,
                          ttl=ttl, idle_timeout=idle, metadata={}, created_at=created_at,
                          created_mono=time.monotonic() - age, replay_budget=self._sandbox_budget(),
                          ports=PortRegistry(self.settings.ports))
        self._sandboxes[sandbox_id] = sandbox
        self.volumes.adopt(sandbox_id, spec.volumes)  # its mounts count against other mounts here too
        sandbox.spawn(self._watch(sandbox), f"watch-{sandbox_id}")
        log.info("sandbox %s: adopted from runtime %s", sandbox_id, runtime.id)
        return sandbox

    def _sandbox_budget(self) -> ReplayBudget:
        return ReplayBudget(self.settings.limits.replay_sandbox_bytes, parent=self.replay_budget)

    def list_for(self, tenant: str) -> list[Sandbox]:
        """The tenant's own sandboxes (not those the gateway made for its functions)."""
        return [s for s in self._sandboxes.values() if s.tenant == tenant and s.owner is None]

    def all(self) -> list[Sandbox]:
        return list(self._sandboxes.values())

    async def destroy(self, sandbox: Sandbox, reason: str) -> None:
        """Remove the sandbox; returns once it is gone, also when another caller started it.

        The work runs in a task of its own that the caller's cancellation does not reach: a
        session that destroys its own sandbox is closed by it, a REST client may hang up, and a
        destroy cut short would leave the runtime's sandbox behind."""
        task = self._destroying.get(sandbox.id)
        if task is None:
            if self._sandboxes.pop(sandbox.id, None) is None:
                return
            task = asyncio.create_task(self._teardown(sandbox, reason), name=f"destroy-{sandbox.id}")
            self._destroying[sandbox.id] = task
            task.add_done_callback(lambda _: self._destroying.pop(sandbox.id, None))
        await asyncio.shield(task)

    async def _teardown(self, sandbox: Sandbox, reason: str) -> None:
        sandbox.state = "destroyed"
        if reason == "shutdown":
            for record in sandbox.live_execs:
                record.cancel_error = ProtocolError("unavailable", "the gateway is shutting down; the exec was "
                                                                   "stopped")
        for task in list(sandbox.tasks):
            task.cancel()
        await asyncio.gather(*sandbox.tasks, return_exceptions=True)
        if sandbox.replay_budget is not None:  # nobody can attach any more: give the gateway its bytes back
            for record in sandbox.execs.values():
                sandbox.replay_budget.release(record.buffer)
        # Sessions close (4404) only now: a pump cancelled in a send to a stalled client cancels
        # aiohttp's drain future that the session's close would be waiting on too.
        sandbox.destroyed.set()
        try:
            await sandbox.backend.destroy()
        except Exception:
            log.exception("runtime %s failed to destroy %s", sandbox.runtime.id, sandbox.id)
        # After the runtime removed the guest: closing the channel waits until what the gateway
        # still writes to the agent is taken, and an agent that does not read (a WASM exec busy
        # without reading stdin, sent a large exec.input) would never take it.
        await sandbox.agent.close()
        await self.volumes.release(sandbox.id)
        if sandbox.spec.egress is not None:
            self.egress.detach(sandbox.spec.egress)
        self.pm.hook.sandgate_sandbox_destroyed(sandbox_id=sandbox.id, tenant=sandbox.tenant,
                                                runtime=sandbox.runtime.id, reason=reason)

    # -- liveness ----------------------------------------------------------------------------

    async def _watch(self, sandbox: Sandbox) -> None:
        """Notice an agent that died on its own; restart it where the runtime can, else fail."""
        # Only while running: a failed sandbox's agent stays closed, and waiting on its finished
        # `closed` again would spin without ever yielding to the event loop.
        while sandbox.state == "running":
            agent = sandbox.agent
            error = await asyncio.shield(agent.closed)
            if sandbox.state != "running" or sandbox.agent is not agent:
                continue  # destroyed or failed meanwhile, or already replaced by the watchdog
            log.warning("sandbox %s: agent stopped: %s", sandbox.id, error.message)
            try:
                await self.restart_agent(sandbox, agent)
            except ProtocolError:
                return

    async def restart_agent(self, sandbox: Sandbox, agent: AgentClient) -> None:
        """Replace `agent` with a fresh one from the runtime (files are kept). A runtime that
        cannot restart leaves the sandbox `failed`, and this raises guest_died."""
        async with sandbox.restart_lock:
            if sandbox.agent is not agent or sandbox.state != "running":
                return
            await agent.close()
            try:
                await sandbox.backend.restart_agent()
                sandbox.agent = await self._connect(sandbox.backend)
                await self._guest_env(sandbox.agent, sandbox.spec, sandbox.runtime)
                # The new agent's tracker starts empty: track again and pin the mounts at now. What
                # the stopped exec changed in a mount before the restart is not synced back.
                await self._start_tracking(sandbox.agent, sandbox.spec, sandbox.mounts)
            except ProtocolError as exc:
                log.warning("sandbox %s failed: %s", sandbox.id, exc.message)
                sandbox.state = "failed"
                raise ProtocolError("guest_died", f"the sandbox's agent stopped and could not restart: "
                                                  f"{exc.message}") from None
            sandbox.restarts += 1

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reap_interval_s)
            await self.reap()

    async def reap(self, now: float | None = None) -> list[str]:
        """Destroy expired and idle sandboxes; returns their ids (the reaper's one step).

        `now` (a time.monotonic() value) lets tests look into the future instead of sleeping."""
        now = time.monotonic() if now is None else now
        reaped = []
        for sandbox in list(self._sandboxes.values()):
            if now - sandbox.created_mono >= sandbox.ttl:
                reason = "ttl"
            elif not sandbox.active and now - sandbox.last_activity >= sandbox.idle_timeout:
                reason = "idle"
            else:
                continue
            reaped.append(sandbox.id)
            await self.destroy(sandbox, reason)
        return reaped

