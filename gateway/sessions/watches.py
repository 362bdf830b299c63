"""fs.watch as the gateway keeps it: one more kind of stream in the sandbox's exec registry.

A watch is a `WatchRecord`, an `ExecRecord` of kind `watch` kept in `sandbox.execs` under its
`watch_id`: the same pump numbers its events, the same bounded replay buffer (drawing on the
sandbox's replay budget) keeps them, the same keepalives reach its subscribers, and `exec.attach`
with the watch's id (or tag) and `from_seq` re-attaches it after a reconnect, as for an exec. It is
not an exec anywhere else: exec.list, the executions API and the control ops do not see it, and it
is never `running` for the busy checks (a single-threaded agent serves requests while it watches).

When the sandbox's agent is replaced (an exec stopped by a restart on WASM, a crash), the gateway
starts the watch again on the new agent under the same record, so the client's stream goes on; the
changes between the two are unknown, and the stream says so with an `overflow` event. When the
sandbox dies or is destroyed the stream ends with the error (`guest_died`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from gateway.runtime.agent_client import AgentClient
from gateway.sessions.execs import ExecRecord, Subscriber
from gateway.sessions.sandbox import Sandbox
from guest_agent.wire import ProtocolError

AgentGetter = Callable[[Sandbox], Awaitable[AgentClient]]
#: The agent-leg fields of fs.watch the gateway forwards (the rest are the client leg's).
_FORWARDED = ("path", "recursive", "poll_interval")
#: The `change` event that says changes may have been missed (guest_agent/watch.py).
OVERFLOW = {"ev": "change", "change": "overflow", "path": "", "dir": True}


class WatchRecord(ExecRecord):
    """A watch's stream, kept as an exec's is (module doc)."""

    kind = "watch"

    def __init__(self, watch_id: str, tag: str | None, fields: Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(watch_id, tag, **kwargs)
        #: What the agent is asked for (again, after an agent restart).
        self.fields = {name: fields[name] for name in _FORWARDED if name in fields}
        #: fs.unwatch was asked: an end now is the watch's own, never a reason to start it again.
        self.stopping = False
        #: How many times the watch was started again on a new agent.
        self.resumed = 0


def find_watch(sandbox: Sandbox, args: Mapping[str, Any]) -> WatchRecord:
    """The watch a checked request names by `watch_id`, or the latest with its `tag`."""
    if "watch_id" in args:
        record = sandbox.execs.get(args["watch_id"])
        found = record if isinstance(record, WatchRecord) else None
    else:
        found = next((r for r in reversed(sandbox.execs.values())
                      if isinstance(r, WatchRecord) and r.tag == args["tag"]), None)
    if found is None:
        raise ProtocolError("not_found", "no such watch")
    return found


async def start_watch(sandbox: Sandbox, args: Mapping[str, Any], subscriber: Subscriber | None, *,
                      get_agent: AgentGetter, replay_bytes: int, send_timeout: float,
                      finished: Callable[[Sandbox], None]) -> WatchRecord:
    """Start a watch and subscribe `subscriber` before its first event can be delivered.
    `args` are fs.watch's arguments as the schema checked them; the caller checked the sandbox
    can (`_check_usable`). `finished` prunes the registry once the watch has ended."""
    requested = args.get("watch_id")
    if requested is not None and requested in sandbox.execs:
        raise ProtocolError("bad_request", f"watch_id {requested!r} is taken: it must be new")
    watch_id = requested or f"w{next(sandbox.exec_ids)}"
    record = WatchRecord(watch_id, args.get("tag"), args, replay_bytes=replay_bytes, send_timeout=send_timeout,
                         budget=sandbox.replay_budget)
    if subscriber is not None:
        record.subscribers.append(subscriber)
    agent = await get_agent(sandbox)
    stream = await agent.stream("fs.watch", watch_id=watch_id, **record.fields)
    sandbox.execs[watch_id] = record
    sandbox.touch()
    sandbox.spawn(_run(sandbox, record, _events(sandbox, record, stream, get_agent), finished), f"watch-{watch_id}")
    return record


async def stop_watch(sandbox: Sandbox, args: Mapping[str, Any], get_agent: AgentGetter) -> dict[str, Any]:
    """fs.unwatch: the agent stops the watch and its stream ends (without an error). A watch that
    has ended already is stopped: `{}` again."""
    record = find_watch(sandbox, args)
    if not record.running:
        return {}
    record.stopping = True
    agent = await get_agent(sandbox)
    try:
        await agent.request("fs.unwatch", watch_id=record.exec_id)
    except ProtocolError as exc:
        if exc.code != "not_found":  # not_found: it ended on its own meanwhile
            raise
    return {}


async def _run(sandbox: Sandbox, record: WatchRecord, events: AsyncIterator[dict[str, Any]],
               finished: Callable[[Sandbox], None]) -> None:
    try:
        await record.pump(events)
    finally:
        sandbox.finished_execs.append(record.exec_id)
        finished(sandbox)
    sandbox.touch()


async def _events(sandbox: Sandbox, record: WatchRecord, stream: Any,
                  get_agent: AgentGetter) -> AsyncIterator[dict[str, Any]]:
    """The watch's events from one agent after another (module doc)."""
    started = False
    while True:
        resume = False
        try:
            async for event in stream:
                ev = event.get("ev")
                if ev == "start":
                    if started:  # the watch again, on a new agent: what happened meanwhile is unknown
                        yield dict(OVERFLOW)
                        continue
                    started = True
                elif ev == "end" and started and _agent_lost(event) and not record.stopping:
                    resume = sandbox.state == "running"
                    if resume:
                        break
                yield event
        finally:
            if not stream.finished:
                stream.discard()
        if not resume:
            return
        try:
            agent = await get_agent(sandbox)  # waits out the restart (or raises: the sandbox failed)
            stream = await agent.stream("fs.watch", watch_id=record.exec_id, **record.fields)
        except ProtocolError as exc:
            yield {"ev": "end", "error": exc.to_wire()}
            return
        record.resumed += 1


def _agent_lost(end: Mapping[str, Any]) -> bool:
    error = end.get("error")
    return isinstance(error, dict) and error.get("code") == "guest_died"

