"""Routing of ops to a sandbox's agent: the gateway's checks, then the request or stream.

This is where the gateway decides what reaches the agent: which ops a sandbox supports (from the op
schema and its capabilities), when an agent that runs one thing at a time is `busy`, what an exec
may ask for (`Limits`), when an exec is wedged (the watchdog), and how a runtime without in-guest
signals still stops an exec (by restarting its agent). It also runs each exec's pump, which keeps
the sandbox's exec records.

`OpRouter` is a mixin of `SandboxManager` rather than an object the manager holds: the web layer,
MCP, tests and bench call these ops as manager methods (`manager.request(...)`), and composition
would need a delegating method for each of them. The coupling stays narrow and declared: the router
uses only `settings`, `pm` and `restart_agent` (lifecycle: replacing an agent is the manager's),
and never the manager's registry of sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pluggy

from gateway.config import Settings
from gateway.functions.code_cache import CodeCache
from gateway.runtime.agent_client import AgentClient, AgentStream
from gateway.sessions import watches
from gateway.sessions.execs import ExecRecord, OutputCollector, Subscriber
from gateway.sessions.sandbox import Sandbox
from gateway.sessions.watches import WatchRecord
from gateway.storage import mount_sync
from guest_agent import languages, schema
from guest_agent.schema import OPS
from guest_agent.wire import ProtocolError

#: Signals a runtime without in-guest signals can still honour by restarting its agent.
KILLING_SIGNALS = {"SIGKILL", "SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", 9, 15, 2, 1, 3}


class OpRouter(ABC):
    """The ops a client sends to a sandbox; mixed into `SandboxManager` (see the module docstring)."""

    settings: Settings
    pm: pluggy.PluginManager
    code_cache: CodeCache

    @abstractmethod
    async def restart_agent(self, sandbox: Sandbox, agent: AgentClient) -> None:
        """Replace the sandbox's dead or wedged `agent` (lifecycle: `SandboxManager`'s)."""

    async def _agent(self, sandbox: Sandbox) -> AgentClient:
        """The sandbox's live agent: waits out a restart in progress, and restarts a dead agent
        itself rather than racing the watcher (whoever comes first restarts, once)."""
        agent = sandbox.agent
        if agent.closed.done() and sandbox.state == "running":
            await self.restart_agent(sandbox, agent)
        async with sandbox.restart_lock:
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

    def find_exec(self, sandbox: Sandbox, args: Mapping[str, Any], kind: str | None = "exec") -> ExecRecord:
        """The exec a checked request names by `exec_id`, or the latest with its `tag`; with
        `kind` None, any stream of the registry (exec.attach re-attaches watches too)."""
        if "exec_id" in args:
            record = sandbox.execs.get(args["exec_id"])
        else:
            matches = [r for r in sandbox.execs.values() if r.tag == args["tag"] and kind in (None, r.kind)]
            record = matches[-1] if matches else None
        if record is None or kind not in (None, record.kind):
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
        """exec.signal; where the agent has no signals, a killing signal restarts the agent. A
        one-shot exec (run by the runtime, not the agent) is stopped by its runtime."""
        record = self.find_exec(sandbox, fields)
        if "exec.signal" in sandbox.capabilities and not record.oneshot:
            return await self.request(sandbox, "exec.signal", fields)
        sig = fields.get("signal")
        if sig not in KILLING_SIGNALS:
            raise ProtocolError("unsupported", f"runtime {sandbox.runtime.id} can only stop this exec (SIGKILL, "
                                               "SIGTERM, SIGINT), not deliver other signals")
        if record.oneshot:
            if record.running:
                await sandbox.backend.stop_oneshot()
            return {}
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
        network = sandbox.spec.egress.counters.as_dict() if sandbox.spec.egress is not None else None
        return {"guest": guest, "host": host, "network": network, "restarts": sandbox.restarts}

    async def read_file(self, sandbox: Sandbox, path: str, offset: int = 0, length: int | None = None) -> AgentStream:
        self._check_usable(sandbox, "fs.read")
        sandbox.touch()
        fields: dict[str, Any] = {"path": path, "offset": offset}
        if length is not None:
            fields["length"] = length
        return await (await self._agent(sandbox)).stream("fs.read", **fields)

    async def start_watch(self, sandbox: Sandbox, args: Mapping[str, Any],
                          subscriber: Subscriber | None = None) -> WatchRecord:
        """fs.watch (gateway/sessions/watches.py); `args` as the schema checked them."""
        self._check_usable(sandbox, "fs.watch")
        return await watches.start_watch(sandbox, args, subscriber, get_agent=self._agent,
                                         replay_bytes=self.settings.limits.replay_bytes,
                                         send_timeout=self.settings.client_send_timeout_s,
                                         finished=self.forget_finished)

    async def stop_watch(self, sandbox: Sandbox, args: Mapping[str, Any]) -> dict[str, Any]:
        """fs.unwatch. Not refused as `busy` while a one-request-at-a-time agent runs an exec: the
        agent takes it when the exec reads stdin, or ends."""
        if sandbox.state != "running":
            raise ProtocolError("guest_died", f"the sandbox is {sandbox.state}")
        sandbox.touch()
        return await watches.stop_watch(sandbox, args, self._agent)

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
        remember_code: bool = True,
    ) -> ExecRecord:
        """Start an exec and subscribe `subscriber` before its first event can be delivered.
        `message` holds exec.start's arguments as the schema checked them (`schema.parse`); a
        `code_ref` is resolved from the tenant's code cache, and code is remembered there (not a
        harness's generated source: `remember_code=False`)."""
        self._check_usable(sandbox, "exec.start")
        if "code_ref" in message or (remember_code and "code" in message):
            message = dict(message)
            self.code_cache.take_code(sandbox.tenant, message)
            message.setdefault("language", "python")
        fields = self._exec_fields(sandbox, message, default_timeout)
        tag = message.get("tag")
        oneshot = fields.get("language") in sandbox.backend.oneshot_languages()
        if "language" in fields and not oneshot and f"exec.{fields['language']}" not in sandbox.capabilities:
            language = fields["language"]
            raise languages.unsupported(language, sandbox.languages(), sandbox.runtime.id,
                                        sandbox.runtime.unavailable_languages.get(language))
        if "exec.concurrent" not in sandbox.capabilities and not oneshot and sandbox.running_execs():
            raise ProtocolError("busy", "the agent runs one exec at a time; wait for the running one")
        requested = message.get("exec_id")
        if requested is not None and requested in sandbox.execs:
            raise ProtocolError("bad_request", f"exec_id {requested!r} is taken: it must be new")
        exec_id = requested or f"e{next(sandbox.exec_ids)}"
        record = ExecRecord(exec_id, tag, replay_bytes=self.settings.limits.replay_bytes,
                            send_timeout=self.settings.client_send_timeout_s, budget=sandbox.replay_budget)
        record.oneshot = oneshot
        if subscriber is not None:
            record.subscribers.append(subscriber)
        timeout = fields.get("timeout")
        events: AsyncIterator[dict[str, Any]]
        if oneshot:
            events = sandbox.backend.run_oneshot(fields["language"], fields["code"], stdin=fields.get("stdin", b""),
                                                 env=fields.get("env", {}), timeout=timeout)
        else:
            agent = await self._agent(sandbox)
            if "exec.concurrent" not in sandbox.capabilities:
                record.confirm_end = lambda: _confirm_idle(agent)
            events = aiter(await agent.stream("exec.start", exec_id=exec_id, **fields))
            if any(m.spec.sync == "batch" for m in sandbox.mounts):
                record.on_end = lambda: self._sync_batch_mounts(sandbox, agent)
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
            self.forget_finished(sandbox)
        sandbox.touch()
        assert record.end is not None
        self.pm.hook.sandgate_exec_finished(sandbox_id=sandbox.id, tenant=sandbox.tenant,
                                            exec_id=record.exec_id, end=record.end)

    async def _sync_batch_mounts(self, sandbox: Sandbox, agent: AgentClient) -> dict[str, Any]:
        """An exec ended: apply each batch mount's permitted changes to the host (`mounts` of its end)."""
        results = []
        for state in sandbox.mounts:
            if state.spec.sync != "batch":
                continue
            try:
                results.append(await mount_sync.sync(agent, state, self.settings.storage.allowed_roots))
            except ProtocolError as exc:  # the agent died, or the host directory went away
                results.append({"path": state.spec.path, "error": exc.to_wire()})
        return {"mounts": results}

    async def list_mounts(self, sandbox: Sandbox) -> list[dict[str, Any]]:
        """Each host mount with its pending changes (permitted and denied) and its last sync."""
        self._check_usable(sandbox, "fs.changes")
        sandbox.touch()
        agent = await self._agent(sandbox)
        out = []
        for state in sandbox.mounts:
            changes = await mount_sync.list_pending(agent, state.spec)
            out.append({"path": state.spec.path, "sync": state.spec.sync, "on_error": state.spec.on_error,
                        "pending": {"permitted": [c.describe() for c in changes if c.permitted],
                                    "denied": [c.describe() for c in changes if not c.permitted]},
                        "last_sync": state.last_sync})
        return out

    async def sync_mounts(self, sandbox: Sandbox, paths: list[str]) -> dict[str, Any]:
        """`POST .../mounts/sync`: apply the pending changes at `paths` (and under them) to the
        host, in each mount they fall in; only permitted ones (the others are reported denied)."""
        self._check_usable(sandbox, "fs.changes")
        sandbox.touch()
        agent = await self._agent(sandbox)
        shown = [p.removeprefix("/work/") if p.startswith("/work/") else p for p in paths]
        results, matched = [], set()
        for state in sandbox.mounts:
            mine = [p for p in shown if (p + "/").startswith(mount_sync.shown_prefix(state.spec))]
            if mine:
                matched.update(mine)
                results.append(await mount_sync.sync(agent, state, self.settings.storage.allowed_roots, paths=mine))
        return {"mounts": results, "unmatched": [p for p in shown if p not in matched]}

    async def _watchdog(self, sandbox: Sandbox, agent: AgentClient, record: ExecRecord, timeout: float,
                        grace: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout + grace):
                await record.done.wait()
        if record.running and sandbox.agent is agent:
            record.timed_out_after = timeout
            with contextlib.suppress(ProtocolError):  # a failed restart already marked the sandbox
                await self.restart_agent(sandbox, agent)

    def forget_finished(self, sandbox: Sandbox) -> None:
        """Drop finished execs past the kept count, and those that ended longer ago than they are
        kept (`[functions] executions_kept`, `executions_keep_s`); oldest first."""
        kept = self.settings.functions
        horizon = time.time() - kept.executions_keep_s
        while sandbox.finished_execs:
            oldest = sandbox.execs.get(sandbox.finished_execs[0])
            expired = oldest is not None and oldest.ended_at is not None and oldest.ended_at < horizon
            if len(sandbox.finished_execs) <= kept.executions_kept and not expired:
                break
            forgotten = sandbox.execs.pop(sandbox.finished_execs.popleft(), None)
            if forgotten is not None and sandbox.replay_budget is not None:
                sandbox.replay_budget.release(forgotten.buffer)

    def _remember(self, sandbox: Sandbox, record: ExecRecord) -> None:
        sandbox.execs[record.exec_id] = record
        sandbox.live_execs.add(record)

    async def run_collected(self, sandbox: Sandbox, message: Mapping[str, Any]) -> dict[str, Any]:
        """The REST exec: run to the end and return the collected output. `message` holds
        exec.start's arguments as the schema checked them.

        Each output stream keeps its first `exec_stream_output_bytes` (and all of them together
        `exec_output_bytes`); the rest is counted, not kept: `truncated` says output was cut,
        `<stream>_truncated` which stream, and `dropped_bytes` how many bytes of each. `display`
        lists the exec's display bundles in order (rich output, guest_agent/display.py)."""
        limits = self.settings.limits
        collector = OutputCollector(limits.exec_output_bytes, limits.exec_stream_output_bytes)
        record = await self.start_exec(sandbox, message, collector,
                                       default_timeout=self.settings.limits.exec_timeout_s)
        await record.done.wait()
        end = record.end or {}
        if record.refused:  # a missing cwd: a plain error
            raise ProtocolError.from_wire(end["error"])
        result: dict[str, Any] = {
            "exec_id": record.exec_id,
            "exit_code": end.get("exit_code"),
            "signal": end.get("signal"),
            "duration_ms": end.get("duration_ms"),
            "stdout": collector.out["stdout"].decode("utf-8", "replace"),
            "stderr": collector.out["stderr"].decode("utf-8", "replace"),
            "truncated": collector.truncated,
            "stdout_truncated": collector.dropped_bytes["stdout"] > 0,
            "stderr_truncated": collector.dropped_bytes["stderr"] > 0,
            "dropped_bytes": {fd: n for fd, n in collector.dropped_bytes.items() if n or fd != "pty"},
            "display": collector.display,
            "files": end.get("files"),
            "mounts": end.get("mounts"),
        }
        if collector.out["pty"] or collector.dropped_bytes["pty"]:
            result["pty"] = collector.out["pty"].decode("utf-8", "replace")
            result["pty_truncated"] = collector.dropped_bytes["pty"] > 0
        if "error" in end:
            result["error"] = end["error"]
        return result


async def _confirm_idle(agent: AgentClient) -> None:
    """Return once `agent` answers a ping: an agent that serves one request at a time answers only
    after its exec's handler returned, so an `end` forged by guest code that runs on is not taken
    as the exec's end: only the gateway decides that an exec ended. Waits as long as the exec
    runs on: the exec's timeout (the watchdog restarts the agent) or the sandbox's CPU budget ends
    it, and the agent's death then raises `guest_died` here."""
    while True:
        try:
            await agent.request("ping")
            return
        except ProtocolError as exc:
            if exc.code != "timeout":
                raise
