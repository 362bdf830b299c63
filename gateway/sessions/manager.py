"""The sandbox registry: tenants, quotas, lifecycle, and routing of ops to the agent.

This is where the gateway decides things: which ops a sandbox supports, what a request may ask for,
when a sandbox is idle or expired, when an exec is wedged. The web layer only translates HTTP and
WebSocket messages into calls here.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from gateway.config import Settings
from gateway.runtime.agent_client import AgentClient, AgentStream
from gateway.runtime.base import Backend, NotConfigured, Runtime, SandboxSpec
from gateway.sessions.execs import ExecRecord, OutputCollector, Subscriber
from guest_agent import schema
from guest_agent.schema import OPS
from guest_agent.wire import ProtocolError
from guest_agent.wire import field as wire_field

log = logging.getLogger(__name__)

#: Signals a runtime without in-guest signals can still honour by restarting its agent.
KILLING_SIGNALS = {"SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", 9, 15, 2, 1, 3}
MAX_FINISHED_EXECS = 64
CREATE_FIELDS = ("runtime", "ttl", "idle_timeout", "memory_mb", "cpu_seconds", "disk_mb", "network",
                 "template", "metadata")


@dataclass
class Sandbox:
    id: str
    tenant: str
    runtime: Runtime
    spec: SandboxSpec
    backend: Backend
    agent: AgentClient
    ttl: float
    idle_timeout: float
    metadata: dict[str, str]
    created_at: float = field(default_factory=time.time)
    created_mono: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    state: str = "running"
    sessions: int = 0
    execs: dict[str, ExecRecord] = field(default_factory=dict)
    #: Records whose pump still runs, and finished exec ids oldest first (for pruning `execs`).
    live_execs: set[ExecRecord] = field(default_factory=set)
    finished_execs: deque[str] = field(default_factory=deque)
    exec_ids: Any = field(default_factory=lambda: itertools.count(1))
    restarts: int = 0
    destroyed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _restart_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def capabilities(self) -> frozenset[str]:
        oneshot = {f"exec.{lang}" for lang in self.backend.oneshot_languages()}
        return self.agent.capabilities | self.runtime.capabilities | oneshot

    def running_execs(self) -> list[ExecRecord]:
        # `running` too: a record is done (its end published) a moment before its pump leaves.
        return [r for r in self.live_execs if r.running]

    @property
    def active(self) -> bool:
        """Open sessions and running execs are activity: the idle reaper leaves the sandbox be."""
        return self.sessions > 0 or bool(self.running_execs())

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "runtime": self.runtime.id,
            "state": self.state,
            "created_at": self.created_at,
            "expires_at": self.created_at + self.ttl,
            "ttl": self.ttl,
            "idle_timeout": self.idle_timeout,
            "memory_mb": self.spec.memory_mb,
            "cpu_seconds": self.spec.cpu_seconds,
            "disk_mb": self.spec.disk_mb,
            "network": self.spec.network,
            "template": self.spec.template,
            "capabilities": sorted(self.capabilities),
            "metadata": self.metadata,
            "execs_running": len(self.running_execs()),
            "ws_url": f"/v1/sandboxes/{self.id}/ws",
        }

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


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


class QuotaExceeded(ProtocolError):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__("quota_exceeded", message)
        self.retry_after = max(1, math.ceil(retry_after))


class SandboxManager:
    def __init__(self, settings: Settings, runtimes: Mapping[str, Runtime], pm: pluggy.PluginManager) -> None:
        self.settings = settings
        self.runtimes = dict(runtimes)
        self.pm = pm
        self._sandboxes: dict[str, Sandbox] = {}
        self._creating: dict[str, int] = {}
        self._adopting: dict[str, asyncio.Lock] = {}
        #: Destroys under way, by sandbox id (see `destroy`).
        self._destroying: dict[str, asyncio.Task[None]] = {}
        self._rate = _CreateRate(settings.quotas.creates_per_minute)
        self._reaper: asyncio.Task[None] | None = None
        self.draining = False
        self.unavailable: dict[str, str] = {}

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
        self._reaper = asyncio.create_task(self._reap_forever(), name="sandbox-reaper")

    async def close(self) -> None:
        """Drain: refuse new sandboxes, destroy every sandbox, stop the runtimes."""
        self.draining = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(self.destroy(s, "shutdown") for s in list(self._sandboxes.values())),
                             *self._destroying.values(), return_exceptions=True)
        for runtime in self.runtimes.values():
            try:
                await runtime.stop()
            except Exception:
                log.exception("runtime %s failed to stop", runtime.id)

    # -- create, find, destroy ---------------------------------------------------------------

    def _bounded(self, body: Mapping[str, Any], name: str, default: float, maximum: float, kind: type) -> Any:
        value = wire_field(body, name, (int, float) if kind is float else int, default)
        if not 0 < value <= maximum:
            raise ProtocolError("bad_request", f"{name} must be > 0 and <= {maximum:g}")
        return kind(value)

    async def create(self, tenant: str, body: Mapping[str, Any]) -> Sandbox:
        if self.draining:
            raise ProtocolError("unavailable", "the gateway is shutting down")
        limits = self.settings.limits
        runtime_id = wire_field(body, "runtime", str, self.settings.default_runtime)
        runtime = self.runtimes.get(runtime_id)
        if runtime is None:
            why = self.unavailable.get(runtime_id)
            if why is not None:
                raise ProtocolError("unavailable", f"runtime {runtime_id!r} is unavailable here: {why}")
            raise ProtocolError("bad_request", f"unknown runtime {runtime_id!r}; have {sorted(self.runtimes)}")
        ttl = self._bounded(body, "ttl", limits.ttl_s, limits.max_ttl_s, float)
        idle = self._bounded(body, "idle_timeout", limits.idle_timeout_s, limits.max_idle_timeout_s, float)
        memory = self._bounded(body, "memory_mb", limits.memory_mb, limits.max_memory_mb, int)
        cpu = self._bounded(body, "cpu_seconds", limits.cpu_seconds, limits.max_cpu_seconds, float)
        disk = self._bounded(body, "disk_mb", limits.disk_mb, limits.max_disk_mb, int)
        network = wire_field(body, "network", bool, False)
        template = wire_field(body, "template", str, None)
        metadata = wire_field(body, "metadata", dict, {})
        if len(metadata) > 32 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256 for k, v in metadata.items()
        ):
            raise ProtocolError("bad_request", "metadata: at most 32 string keys (<= 64) to strings (<= 256)")
        options = runtime.validate_options({k: v for k, v in body.items() if k not in CREATE_FIELDS})
        runtime.check_create(template, network)

        # Quotas are checked after validation, so a bad request never costs a token.
        count = sum(1 for s in self._sandboxes.values() if s.tenant == tenant) + self._creating.get(tenant, 0)
        if count >= self.settings.quotas.max_sandboxes:
            raise QuotaExceeded(f"tenant has {count} sandboxes, the quota is {self.settings.quotas.max_sandboxes}", 5)
        wait = self._rate.take(tenant)
        if wait:
            raise QuotaExceeded("sandbox creation rate quota exceeded", wait)

        sandbox_id = "sb_" + secrets.token_urlsafe(16)
        now = time.time()
        spec = SandboxSpec(sandbox_id=sandbox_id, tenant=tenant, memory_mb=memory, cpu_seconds=cpu,
                           disk_mb=disk, network=network, template=template, options=options,
                           ttl_s=ttl, idle_timeout_s=idle, created_at=now)
        self._creating[tenant] = self._creating.get(tenant, 0) + 1
        try:
            backend = await runtime.create(spec)
            try:
                agent = await self._connect(backend)
            except BaseException:
                await backend.destroy()
                raise
        finally:
            self._creating[tenant] -= 1
        sandbox = Sandbox(id=sandbox_id, tenant=tenant, runtime=runtime, spec=spec, backend=backend,
                          agent=agent, ttl=ttl, idle_timeout=idle, metadata=metadata, created_at=now)
        self._sandboxes[sandbox_id] = sandbox
        sandbox.spawn(self._watch(sandbox), f"watch-{sandbox_id}")
        self.pm.hook.sandgate_sandbox_created(sandbox_id=sandbox_id, tenant=tenant, runtime=runtime.id)
        return sandbox

    async def _connect(self, backend: Backend) -> AgentClient:
        agent = AgentClient(backend.channel(), request_timeout=self.settings.limits.agent_request_timeout_s,
                            death_reason=backend.wait_exited)
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
                          created_mono=time.monotonic() - age)
        self._sandboxes[sandbox_id] = sandbox
        sandbox.spawn(self._watch(sandbox), f"watch-{sandbox_id}")
        log.info("sandbox %s: adopted from runtime %s", sandbox_id, runtime.id)
        return sandbox

    def list_for(self, tenant: str) -> list[Sandbox]:
        return [s for s in self._sandboxes.values() if s.tenant == tenant]

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
        for task in list(sandbox.tasks):
            task.cancel()
        await asyncio.gather(*sandbox.tasks, return_exceptions=True)
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
        async with sandbox._restart_lock:
            if sandbox.agent is not agent or sandbox.state != "running":
                return
            await agent.close()
            try:
                await sandbox.backend.restart_agent()
                sandbox.agent = await self._connect(sandbox.backend)
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

    # -- ops ---------------------------------------------------------------------------------

    async def _agent(self, sandbox: Sandbox) -> AgentClient:
        """The sandbox's live agent: waits out a restart in progress, and restarts a dead agent
        itself rather than racing the watcher (whoever comes first restarts, once)."""
        agent = sandbox.agent
        if agent.closed.done() and sandbox.state == "running":
            await self.restart_agent(sandbox, agent)
        async with sandbox._restart_lock:
            if sandbox.state != "running":
                raise ProtocolError("guest_died", f"the sandbox is {sandbox.state}")
            return sandbox.agent

    def _check_usable(self, sandbox: Sandbox, op: str) -> None:
        """The gateway's checks before an op reaches the agent, all from the op schema."""
        if sandbox.state != "running":
            raise ProtocolError("guest_died", f"the sandbox is {sandbox.state}")
        spec = OPS[op]
        if spec.capability is not None and spec.capability not in sandbox.capabilities:
            raise ProtocolError("unsupported", f"{op} needs {spec.capability}, which runtime {sandbox.runtime.id} "
                                               "lacks")
        # exec.start decides for itself (a one-shot language runs beside a running exec).
        if "exec.concurrent" not in sandbox.capabilities and not spec.control and op != "exec.start":
            running = sandbox.running_execs()
            if running:
                raise ProtocolError("busy", f"the agent runs one thing at a time and exec {running[0].exec_id} "
                                            "is running")

    def find_exec(self, sandbox: Sandbox, args: Mapping[str, Any]) -> ExecRecord:
        """The exec a checked request names by `exec_id`, or the latest with its `tag`."""
        if "exec_id" in args:
            record = sandbox.execs.get(args["exec_id"])
        else:
            matches = [r for r in sandbox.execs.values() if r.tag == args["tag"]]
            record = matches[-1] if matches else None
        if record is None:
            raise ProtocolError("not_found", "no such exec")
        return record

    async def request(self, sandbox: Sandbox, op: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Forward a non-stream op of both legs to the agent after the gateway's own checks.
        `fields` are the op's arguments as the schema checked them where the client's request
        entered (`schema.parse`), or the gateway's own (REST uploads)."""
        spec = schema.op_for(op, schema.CLIENT)
        if spec.stream or spec.leg != schema.BOTH:
            raise ProtocolError("unknown_op", f"{op} is not forwarded as a request")
        self._check_usable(sandbox, op)
        sandbox.touch()
        fields = dict(fields)
        if spec.control:
            record = self.find_exec(sandbox, fields)
            if not record.running:
                raise ProtocolError("not_found", f"exec {record.exec_id} has ended")
            fields.pop("tag", None)
            fields["exec_id"] = record.exec_id
        return await (await self._agent(sandbox)).request(op, **fields)

    async def ping(self, sandbox: Sandbox) -> dict[str, Any]:
        """`ping`, a liveness op: never refused as `busy` (docs/protocol.md §3).

        The agent answers it whenever it can take a request, which proves it alive. An agent
        without exec.concurrent cannot while it runs an exec (WASM: not until the exec ends or reads
        stdin), and a forwarded ping would wait in its channel; then the gateway answers for it
        from what it knows: the agent's channel is open (a dead agent closes it) and the exec's
        stream is live. A dead agent is restarted first (or this raises guest_died)."""
        if sandbox.state != "running":
            raise ProtocolError("guest_died", f"the sandbox is {sandbox.state}")
        if "exec.concurrent" in sandbox.capabilities or not sandbox.running_execs():
            return await self.request(sandbox, "ping", {})
        sandbox.touch()
        if sandbox.agent.closed.done():
            await self._agent(sandbox)  # waits out (or does) the restart; raises if it failed
        return {}

    async def signal(self, sandbox: Sandbox, fields: Mapping[str, Any]) -> dict[str, Any]:
        """exec.signal; where the agent has no signals, a killing signal restarts the agent."""
        if "exec.signal" in sandbox.capabilities:
            return await self.request(sandbox, "exec.signal", fields)
        record = self.find_exec(sandbox, fields)
        sig = fields.get("signal")
        if sig not in KILLING_SIGNALS:
            raise ProtocolError("unsupported", f"runtime {sandbox.runtime.id} can only stop an exec (SIGKILL, "
                                               "SIGTERM, SIGINT), not deliver other signals")
        if record.running:
            record.timed_out_after = None
            # The restart runs on its own, so the `{}` goes out before the exec's end
            # (docs/protocol.md): the caller sends it before this task can end the stream.
            sandbox.spawn(self._stop_by_restart(sandbox, sandbox.agent), f"stop-{record.exec_id}")
        return {}

    async def _stop_by_restart(self, sandbox: Sandbox, agent: AgentClient) -> None:
        with contextlib.suppress(ProtocolError):  # a failed restart already marked the sandbox
            await self.restart_agent(sandbox, agent)

    async def metrics(self, sandbox: Sandbox) -> dict[str, Any]:
        """Guest and host figures. An agent that serves one request at a time cannot answer while
        it runs an exec (WASM): then `guest` is null and the host's figures still come."""
        guest: dict[str, Any] | None = None
        if "exec.concurrent" in sandbox.capabilities or not sandbox.running_execs():
            guest = await self.request(sandbox, "metrics", {})
        host = await sandbox.backend.host_metrics()
        return {"guest": guest, "host": host, "restarts": sandbox.restarts}

    async def read_file(self, sandbox: Sandbox, path: str, offset: int = 0, length: int | None = None) -> AgentStream:
        self._check_usable(sandbox, "fs.read")
        sandbox.touch()
        fields: dict[str, Any] = {"path": path, "offset": offset}
        if length is not None:
            fields["length"] = length
        return await (await self._agent(sandbox)).stream("fs.read", **fields)

    def _exec_fields(
        self, sandbox: Sandbox, args: Mapping[str, Any], default_timeout: float | None
    ) -> dict[str, Any]:
        """The exec.start request to forward: the schema checked its fields (`args`); here the
        gateway refuses what this sandbox cannot do and applies its own limits."""
        limits = self.settings.limits
        out = {k: v for k, v in args.items() if k not in ("exec_id", "tag")}
        if "command" in out and "exec.process" not in sandbox.capabilities:
            raise ProtocolError("unsupported", f"runtime {sandbox.runtime.id} runs no processes; "
                                               "use 'code' with 'language'")
        if out.get("stdin_open") and "exec.stdin" not in sandbox.capabilities:
            raise ProtocolError("unsupported", "this sandbox takes no stdin after start")
        if "pty" in out and "exec.pty" not in sandbox.capabilities:
            raise ProtocolError("unsupported", f"runtime {sandbox.runtime.id} has no PTY")
        timeout = out.get("timeout", default_timeout)
        if timeout is not None:
            if timeout > limits.max_exec_timeout_s:
                raise ProtocolError("bad_request", f"timeout must be <= {limits.max_exec_timeout_s:g}")
            out["timeout"] = float(timeout)
        return out

    async def start_exec(
        self,
        sandbox: Sandbox,
        message: Mapping[str, Any],
        subscriber: Subscriber | None = None,
        *,
        default_timeout: float | None = None,
    ) -> ExecRecord:
        """Start an exec and subscribe `subscriber` before its first event can be delivered.
        `message` holds exec.start's arguments as the schema checked them (`schema.parse`)."""
        self._check_usable(sandbox, "exec.start")
        fields = self._exec_fields(sandbox, message, default_timeout)
        tag = message.get("tag")
        oneshot = fields.get("language") in sandbox.backend.oneshot_languages()
        if "language" in fields and not oneshot and f"exec.{fields['language']}" not in sandbox.capabilities:
            raise ProtocolError("unsupported", f"runtime {sandbox.runtime.id} does not run {fields['language']}")
        if "exec.concurrent" not in sandbox.capabilities and not oneshot and sandbox.running_execs():
            raise ProtocolError("busy", "the agent runs one exec at a time; wait for the running one")
        requested = message.get("exec_id")
        if requested is not None and requested in sandbox.execs:
            raise ProtocolError("bad_request", f"exec_id {requested!r} is taken: it must be new")
        exec_id = requested or f"e{next(sandbox.exec_ids)}"
        record = ExecRecord(exec_id, tag, replay_bytes=self.settings.limits.replay_bytes,
                            send_timeout=self.settings.client_send_timeout_s)
        if subscriber is not None:
            record.subscribers.append(subscriber)
        timeout = fields.get("timeout")
        events: AsyncIterator[dict[str, Any]]
        if oneshot:
            events = sandbox.backend.run_oneshot(fields["language"], fields["code"], stdin=fields.get("stdin", b""),
                                                 env=fields.get("env", {}), timeout=timeout)
        else:
            agent = await self._agent(sandbox)
            events = aiter(await agent.stream("exec.start", exec_id=exec_id, **fields))
            if timeout is not None:
                # The agent enforces timeouts where it can signal; the watchdog catches the rest.
                grace = self.settings.limits.exec_grace_s if "exec.signal" in sandbox.capabilities else 0.0
                sandbox.spawn(self._watchdog(sandbox, agent, record, timeout, grace), f"watchdog-{exec_id}")
        self._remember(sandbox, record)
        sandbox.touch()
        sandbox.spawn(self._pump(sandbox, record, events), f"exec-{exec_id}")
        return record

    async def _pump(self, sandbox: Sandbox, record: ExecRecord, events: AsyncIterator[dict[str, Any]]) -> None:
        try:
            await record.pump(events)
        finally:
            sandbox.live_execs.discard(record)
            sandbox.finished_execs.append(record.exec_id)
            while len(sandbox.finished_execs) > MAX_FINISHED_EXECS:
                sandbox.execs.pop(sandbox.finished_execs.popleft(), None)
        sandbox.touch()
        assert record.end is not None
        self.pm.hook.sandgate_exec_finished(sandbox_id=sandbox.id, tenant=sandbox.tenant,
                                            exec_id=record.exec_id, end=record.end)

    async def _watchdog(self, sandbox: Sandbox, agent: AgentClient, record: ExecRecord, timeout: float,
                        grace: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout + grace):
                await record.done.wait()
        if record.running and sandbox.agent is agent:
            record.timed_out_after = timeout
            with contextlib.suppress(ProtocolError):  # a failed restart already marked the sandbox
                await self.restart_agent(sandbox, agent)

    def _remember(self, sandbox: Sandbox, record: ExecRecord) -> None:
        sandbox.execs[record.exec_id] = record
        sandbox.live_execs.add(record)

    async def run_collected(self, sandbox: Sandbox, message: Mapping[str, Any]) -> dict[str, Any]:
        """The REST exec: run to the end and return the collected output. `message` holds
        exec.start's arguments as the schema checked them."""
        collector = OutputCollector(self.settings.limits.exec_output_bytes)
        record = await self.start_exec(sandbox, message, collector,
                                       default_timeout=self.settings.limits.exec_timeout_s)
        await record.done.wait()
        end = record.end or {}
        result: dict[str, Any] = {
            "exec_id": record.exec_id,
            "exit_code": end.get("exit_code"),
            "signal": end.get("signal"),
            "duration_ms": end.get("duration_ms"),
            "stdout": collector.out["stdout"].decode("utf-8", "replace"),
            "stderr": collector.out["stderr"].decode("utf-8", "replace"),
            "truncated": collector.truncated,
        }
        if collector.out["pty"]:
            result["pty"] = collector.out["pty"].decode("utf-8", "replace")
        if "error" in end:
            result["error"] = end["error"]
        return result
