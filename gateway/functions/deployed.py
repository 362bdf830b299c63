"""Deployed functions: named code with warm instances that scale up, queue, and scale to zero.

An instance is a sandbox (owned by the function: not in the tenant's sandbox list, but counted
against its quotas) in which the function's module was loaded once, into a named Python namespace
of the agent: warm calls only call the function, so module-level state persists between calls, as
in every FaaS. (JavaScript is loaded with every call: QuickJS runs one script per exec.)

Each instance serves one call at a time. A call takes an idle instance of the current version,
else starts a new one while the function has fewer than `max_instances`, else waits in a bounded
queue for one to come free, and answers 429 (with Retry-After) when the queue is full or the wait
runs out. Instances idle past `idle_timeout` are destroyed down to `min_instances`, which are
made at deploy time and kept loaded. A redeploy with a different version (the hash of what the
instances run) drains the old instances: idle ones now, busy ones when their call ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.functions import harness
from gateway.functions.calls import invoke_result, run_call
from gateway.sessions.admission import QuotaExceeded
from guest_agent.languages import canonical as canonical_language
from guest_agent.wire import ProtocolError
from guest_agent.wire import field as wire_field

if TYPE_CHECKING:
    from gateway.sessions.manager import SandboxManager
    from gateway.sessions.sandbox import Sandbox

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: What the version hashes: a change to any of these makes new instances (and drains the old).
VERSIONED = ("runtime", "language", "code", "function", "timeout", "memory_mb", "env")
#: Where a Python instance's calls write their reports: one call at a time runs in an instance, so
#: each rewrites the last one's in place (its `call` id tells them apart) and none is removed,
#: which saves a round trip to the agent per call. (JavaScript's harness names a report per call.)
INSTANCE_REPORT = harness.report_path("instance")


@dataclass
class Instance:
    sandbox: Sandbox
    version: str
    busy: bool = True
    #: The agent in which the module is loaded (a restarted agent has lost it).
    loaded_in: Any = None
    last_used: float = field(default_factory=time.monotonic)
    calls: int = 0

    @property
    def usable(self) -> bool:
        return self.sandbox.state == "running"

    def describe(self) -> dict[str, Any]:
        return {"id": self.sandbox.id, "version": self.version, "busy": self.busy, "calls": self.calls,
                "idle_s": 0.0 if self.busy else round(time.monotonic() - self.last_used, 3)}


@dataclass
class Deployment:
    tenant: str
    spec: dict[str, Any]
    version: str
    created_at: float
    updated_at: float
    instances: list[Instance] = field(default_factory=list)
    #: Instances being created (they count towards max_instances).
    starting: int = 0
    waiters: deque[asyncio.Future[Instance]] = field(default_factory=deque)
    #: Instances being made ahead of calls (`min_instances`).
    warming: set[asyncio.Task[None]] = field(default_factory=set)
    deleted: bool = False

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def describe(self) -> dict[str, Any]:
        spec = dict(self.spec)
        spec.pop("code")
        return {**spec, "version": self.version, "code_hash": self.spec_hash("code"),
                "created_at": self.created_at, "updated_at": self.updated_at,
                "instances": [i.describe() for i in self.instances], "queued": len(self.waiters)}

    def spec_hash(self, key: str) -> str:
        return hashlib.sha256(str(self.spec[key]).encode("utf-8", "surrogatepass")).hexdigest()


class FunctionRegistry:
    """Every tenant's deployed functions and their instances."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager
        self.settings = manager.settings.functions
        self._tenants: dict[str, dict[str, Deployment]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retiring: set[asyncio.Task[Any]] = set()
        #: Notified when a call starts waiting for an instance (tests wait for a full queue).
        self.queue_changed = asyncio.Condition()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(), name="function-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- deploy, read, delete ----------------------------------------------------------------

    def check_spec(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """A deploy body checked and completed with defaults (before anything is made)."""
        if not NAME.match(name):
            raise ProtocolError("bad_request", "a function's name is 1-128 letters, digits, '_', '.' or '-', "
                                               "starting with a letter or digit")
        manager, limits = self.manager, self.manager.settings.limits
        runtime = wire_field(body, "runtime", str, manager.settings.default_runtime)
        if runtime not in manager.runtimes:
            raise ProtocolError("bad_request", f"unknown or unavailable runtime {runtime!r:.40}")
        language = canonical_language(wire_field(body, "language", str, "python"))
        harness.check_language(language)
        code = wire_field(body, "code", str, None)
        if code is None:
            raise ProtocolError("bad_request", "missing field 'code' (or 'code_ref')")
        function = wire_field(body, "function", str, None)
        if function is None or not (function.isidentifier() and function.isascii()):
            raise ProtocolError("bad_request", "'function' must be the name of the function to call")
        timeout = _number(body, "timeout", limits.exec_timeout_s, limits.max_exec_timeout_s)
        memory = int(_number(body, "memory_mb", limits.memory_mb, limits.max_memory_mb, integer=True))
        max_instances = int(_number(body, "max_instances", self.settings.default_max_instances,
                                    self.settings.max_instances, integer=True))
        min_instances = int(_number(body, "min_instances", 0, max_instances, integer=True, low=0))
        idle = _number(body, "idle_timeout", self.settings.idle_timeout_s, limits.max_idle_timeout_s)
        env = wire_field(body, "env", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) and k and "\0" not in k + v and "=" not in k
                   for k, v in env.items()):
            raise ProtocolError("bad_request", "'env' must map names to strings")
        return {"name": name, "runtime": runtime, "language": language, "code": code, "function": function,
                "timeout": timeout, "memory_mb": memory, "min_instances": min_instances,
                "max_instances": max_instances, "idle_timeout": idle, "env": env}

    def deploy(self, tenant: str, name: str, body: dict[str, Any]) -> tuple[Deployment, bool]:
        """Create or replace a function; (its deployment, whether it is new)."""
        body = dict(body)
        self.manager.code_cache.take_code(tenant, body)
        spec = self.check_spec(name, body)
        version = hashlib.sha256(json.dumps({k: spec[k] for k in VERSIONED}, sort_keys=True).encode(
            "utf-8", "surrogatepass")).hexdigest()[:32]
        functions = self._tenants.setdefault(tenant, {})
        now = time.time()
        current = functions.get(name)
        if current is None:
            if len(functions) >= self.settings.max_functions:
                raise QuotaExceeded(f"tenant has {len(functions)} functions (the most is "
                                    f"{self.settings.max_functions}); delete one first", 60.0)
            current = functions[name] = Deployment(tenant, spec, version, now, now)
            created = True
        else:
            created = False
            current.spec, current.updated_at = spec, now
            if current.version != version:
                current.version = version
                for instance in list(current.instances):
                    if not instance.busy:
                        self._retire(current, instance)
        self._keep_warm(current)
        return current, created

    def get(self, tenant: str, name: str) -> Deployment:
        deployment = self._tenants.get(tenant, {}).get(name)
        if deployment is None:
            raise ProtocolError("not_found", f"no function {name!r:.128}")
        return deployment

    def list_for(self, tenant: str) -> list[Deployment]:
        return sorted(self._tenants.get(tenant, {}).values(), key=lambda d: d.name)

    async def delete(self, tenant: str, name: str) -> None:
        """Remove the function; returns once its idle instances are destroyed (busy ones go when
        their call ends)."""
        deployment = self.get(tenant, name)
        del self._tenants[tenant][name]
        deployment.deleted = True
        while deployment.waiters:
            waiter = deployment.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ProtocolError("not_found", f"the function {name!r:.128} was deleted"))
        for instance in list(deployment.instances):
            if not instance.busy:
                self._retire(deployment, instance)
        await self.settle()

    async def settle(self) -> None:
        """Until the instances being destroyed are gone (tests and `delete` wait on it)."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- invoke ------------------------------------------------------------------------------

    async def invoke(self, tenant: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Call the function: the invoke result, plus `cold` and the `instance` that ran it."""
        deployment = self.get(tenant, name)
        args = wire_field(body, "args", list, [])
        kwargs = wire_field(body, "kwargs", dict, {})
        if not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise ProtocolError("bad_request", "'kwargs' keys must be argument names")
        instance, created = await self._acquire(deployment)
        try:
            spec = deployment.spec
            python = spec["language"] == "python"
            cold = created or not python or instance.loaded_in is not instance.sandbox.agent
            call = harness.new_call_id()
            report = INSTANCE_REPORT if python else harness.report_path(call)
            if cold:
                source = harness.invoke_source(
                    spec["language"], function=spec["function"], args=args, kwargs=kwargs, report=report,
                    code=spec["code"], filename=f"<function {spec['name']}>", call=call,
                    bind=spec["function"] if python else None)
            else:
                source = harness.warm_call_source(args=args, kwargs=kwargs, call=call)
            run = await run_call(self.manager, instance.sandbox, language=spec["language"], source=source,
                                 report=report, timeout=spec["timeout"], namespace=_namespace(instance.version),
                                 env=spec["env"], call=call if python else None, remove_report=not python)
            if run.report is not None and run.report.get("loaded") is True:
                instance.loaded_in = instance.sandbox.agent
            instance.calls += 1
            return {**invoke_result(run), "cold": cold, "instance": instance.sandbox.id,
                    "version": instance.version}
        finally:
            self._release(deployment, instance)

    async def _acquire(self, deployment: Deployment) -> tuple[Instance, bool]:
        """An instance for one call, marked busy; (it, whether it was made for this call)."""
        for instance in deployment.instances:
            if not instance.busy and instance.version == deployment.version and instance.usable:
                instance.busy = True
                return instance, False
        if len(deployment.instances) + deployment.starting < deployment.spec["max_instances"]:
            return await self._new_instance(deployment), True
        limit = self.settings.queue_per_instance * deployment.spec["max_instances"]
        if len(deployment.waiters) >= limit:
            raise QuotaExceeded(f"function {deployment.name!r} has all {deployment.spec['max_instances']} instances "
                                f"busy and {limit} calls queued", 1.0)
        waiter: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        deployment.waiters.append(waiter)
        async with self.queue_changed:
            self.queue_changed.notify_all()
        try:
            async with asyncio.timeout(self.settings.queue_wait_s):
                return await waiter, False
        except BaseException as exc:
            if waiter in deployment.waiters:
                deployment.waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(deployment, waiter.result())  # handed over just as this caller left
            if isinstance(exc, TimeoutError):
                raise QuotaExceeded(f"no instance of function {deployment.name!r} came free within "
                                    f"{self.settings.queue_wait_s:g} s", 1.0) from None
            raise

    async def _new_instance(self, deployment: Deployment) -> Instance:
        spec = deployment.spec
        limits = self.manager.settings.limits
        body = {"runtime": spec["runtime"], "memory_mb": spec["memory_mb"], "ttl": limits.max_ttl_s,
                "idle_timeout": limits.max_idle_timeout_s,
                "metadata": {"sandgate.function": deployment.name}}
        deployment.starting += 1
        try:
            sandbox = await self.manager.create(deployment.tenant, body, owner=f"function:{deployment.name}")
        finally:
            deployment.starting -= 1
        instance = Instance(sandbox, deployment.version)
        deployment.instances.append(instance)
        return instance

    def _release(self, deployment: Deployment, instance: Instance) -> None:
        """A call ended: hand the instance to the next waiter, or leave it idle (or retire it)."""
        instance.last_used = time.monotonic()
        if deployment.deleted or instance.version != deployment.version or not instance.usable:
            self._retire(deployment, instance)
            self._wake_one(deployment)
            return
        while deployment.waiters:
            waiter = deployment.waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)  # stays busy: the waiter's call runs on it
                return
        instance.busy = False

    def _wake_one(self, deployment: Deployment) -> None:
        """An instance went away with calls queued: make a new one for the first of them."""
        if deployment.deleted or not deployment.waiters:
            return
        if len(deployment.instances) + deployment.starting >= deployment.spec["max_instances"]:
            return

        async def start_for_waiter() -> None:
            try:
                instance = await self._new_instance(deployment)
            except ProtocolError as exc:
                while deployment.waiters:
                    waiter = deployment.waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(exc)
                        return
                return
            self._release(deployment, instance)

        self._spawn(start_for_waiter(), f"function-{deployment.name}-replace")

    def _retire(self, deployment: Deployment, instance: Instance) -> None:
        if instance in deployment.instances:
            deployment.instances.remove(instance)
        instance.busy = True  # never handed out again
        task = self._spawn(self.manager.destroy(instance.sandbox, "function"), f"retire-{instance.sandbox.id}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _keep_warm(self, deployment: Deployment) -> None:
        """Make (and load) instances up to `min_instances`, in the background."""
        wanted = deployment.spec["min_instances"] - len([i for i in deployment.instances
                                                        if i.version == deployment.version]) - deployment.starting
        for _ in range(max(0, wanted)):
            task = self._spawn(self._warm_one(deployment), f"function-{deployment.name}-warm")
            deployment.warming.add(task)
            task.add_done_callback(deployment.warming.discard)

    async def warmed(self, tenant: str, name: str) -> None:
        """Until the function's `min_instances` are made and loaded (or failed to be)."""
        deployment = self.get(tenant, name)
        while deployment.warming:
            await asyncio.gather(*deployment.warming, return_exceptions=True)

    async def _warm_one(self, deployment: Deployment) -> None:
        try:
            instance = await self._new_instance(deployment)
        except ProtocolError as exc:
            log.warning("function %s: a warm instance could not start: %s", deployment.name, exc.message)
            return
        try:
            if deployment.spec["language"] == "python" and instance.version == deployment.version:
                await self._load(deployment, instance)
        except ProtocolError as exc:
            log.warning("function %s: loading a warm instance failed: %s", deployment.name, exc.message)
        finally:
            self._release(deployment, instance)

    async def _load(self, deployment: Deployment, instance: Instance) -> None:
        spec = deployment.spec
        call = harness.new_call_id()
        source = harness.invoke_source("python", function="", args=[], kwargs={}, report=INSTANCE_REPORT,
                                       code=spec["code"], filename=f"<function {spec['name']}>", call=call,
                                       bind=spec["function"])
        run = await run_call(self.manager, instance.sandbox, language="python", source=source,
                             report=INSTANCE_REPORT, timeout=spec["timeout"], namespace=_namespace(instance.version),
                             env=spec["env"], call=call, remove_report=False)
        if run.report is not None and run.report.get("loaded") is True:
            instance.loaded_in = instance.sandbox.agent

    # -- scale to zero -------------------------------------------------------------------------

    def reap(self) -> None:
        """Destroy instances idle past their function's idle_timeout, down to min_instances, and
        instances whose sandbox is gone."""
        now = time.monotonic()
        for functions in self._tenants.values():
            for deployment in functions.values():
                for instance in list(deployment.instances):
                    if not instance.usable and not instance.busy:
                        self._retire(deployment, instance)
                idle = sorted((i for i in deployment.instances if not i.busy), key=lambda i: i.last_used)
                spare = len(deployment.instances) - deployment.spec["min_instances"]
                for instance in idle:
                    if spare <= 0:
                        break
                    if now - instance.last_used >= deployment.spec["idle_timeout"]:
                        self._retire(deployment, instance)
                        spare -= 1
                self._keep_warm(deployment)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.manager.settings.reap_interval_s))
            try:
                self.reap()
            except Exception:
                log.exception("function reaper failed")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _namespace(version: str) -> str:
    return f"function-{version}"


def _number(body: dict[str, Any], name: str, default: float, maximum: float, *, integer: bool = False,
            low: float | None = None) -> float:
    """A number field in (0, maximum], or [low, maximum] when `low` is given."""
    value = wire_field(body, name, int if integer else (int, float), default)
    above_low = value > 0 if low is None else value >= low
    if isinstance(value, bool) or not above_low or value > maximum:
        bounds = f"> 0 and <= {maximum:g}" if low is None else f"{low:g}..{maximum:g}"
        raise ProtocolError("bad_request", f"{name} must be {bounds}, not {value!r}")
    return float(value)
