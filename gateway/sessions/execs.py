"""One exec's event stream as the gateway keeps it: numbered, buffered for replay, fanned out.

Every exec, whether run by the agent or by the runtime itself (one-shot languages), goes through an
`ExecRecord`: the pump numbers its events, keeps them in a bounded `ReplayBuffer`, and delivers them
to each subscriber (WebSocket sessions, a REST collector) in order. Delivery awaits the subscriber,
so a slow client slows the sandbox's output instead of growing the gateway's memory; a client that
takes nothing for `send_timeout` seconds is dropped and can re-attach from its last sequence number.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from gateway.sessions.replay import ReplayBudget, ReplayBuffer
from guest_agent.wire import OUTPUT_FDS, ProtocolError

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    async def deliver(self, event: dict[str, Any]) -> None:
        """Send one event (no `id`; the subscriber adds its own). Raising drops the subscriber."""

    def dropped(self, reason: str) -> None:
        """Called once when the record stops delivering to this subscriber because it failed."""


class ExecRecord:
    """One exec as the gateway keeps it (or another stream kept the same way: `kind`).

    `confirm_end`, when given, is awaited when the agent says the exec ended and before the
    gateway takes it as ended: the agent's `end` is a claim, and only the gateway decides (for an
    agent that serves one request at a time, the routing layer confirms it with a ping the agent
    can only answer once its exec handler returned). If the confirmation fails, the exec ends with
    that error instead of the claimed end.
    """

    #: What the stream is: an exec, or a watch (gateway/sessions/watches.py) kept the same way.
    kind = "exec"

    def __init__(self, exec_id: str, tag: str | None, *, replay_bytes: int, send_timeout: float,
                 budget: ReplayBudget | None = None,
                 confirm_end: Callable[[], Awaitable[None]] | None = None) -> None:
        self.exec_id = exec_id
        self.tag = tag
        self.pid: int | None = None
        #: The agent reported the start: an exec that ends without one never ran.
        self.start_seen = False
        #: Run by the runtime itself, not the agent (Backend.run_oneshot): stopped by the runtime.
        self.oneshot = False
        self.buffer = ReplayBuffer(replay_bytes, budget)
        self.confirm_end = confirm_end
        #: Awaited after `confirm_end`, before the end is published: fields it returns are added
        #: to the end (a batch mount sync's `mounts`).
        self.on_end: Callable[[], Awaitable[dict[str, Any]]] | None = None
        #: Why a cancelled pump ended the exec (a destroy's reason; a shutdown says so).
        self.cancel_error = ProtocolError("guest_died", "the sandbox was closed")
        #: The gateway ended it (a destroy or the shutdown cancelled its pump), not the agent.
        self.stopped_by_gateway = False
        self.send_timeout = send_timeout
        self.subscribers: list[Subscriber] = []
        self.done = asyncio.Event()
        self.end: dict[str, Any] | None = None
        self.started = time.monotonic()
        #: Wall-clock start and end (epoch seconds), for the executions API.
        self.created_at = time.time()
        self.ended_at: float | None = None
        #: Stopped by a cancel (`DELETE .../executions/{id}`): its state is `cancelled`.
        self.cancelled = False
        #: Set by the watchdog: an end caused by the agent's restart is reported as a timeout.
        self.timed_out_after: float | None = None
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    @property
    def refused(self) -> bool:
        """The agent refused the exec before it ran (a missing cwd): its requester gets a plain
        error instead of an exec result. Never so when the gateway stopped it: a destroy or the
        shutdown can come after the agent took the exec and before its `start` came through, so
        the exec may well have run (and a shutdown's `unavailable` must not read as "not run,
        retry")."""
        return (not self.start_seen and not self.stopped_by_gateway and self.end is not None
                and refused_before_start(self.end))

    def summary(self) -> dict[str, Any]:
        return {
            "exec_id": self.exec_id,
            "tag": self.tag,
            "pid": self.pid,
            "running": self.running,
            "exit_code": self.end.get("exit_code") if self.end else None,
        }

    async def attach(
        self,
        subscriber: Subscriber,
        from_seq: int,
        before_replay: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Replay buffered events from `from_seq` to `subscriber`, then keep it subscribed.

        `before_replay` gets the attach result (`first_seq`, `lost`) first. Holding the lock orders
        the result and the replay before any live event."""
        async with self._lock:
            events, lost = self.buffer.since(from_seq)
            await before_replay({"exec_id": self.exec_id,
                                 "first_seq": events[0]["seq"] if events else self.buffer.next_seq,
                                 "lost": list(lost) if lost else None})
            self.subscribers.append(subscriber)
            for event in events:
                if not await self._deliver(subscriber, event):
                    break

    def detach(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)

    async def _deliver(self, subscriber: Subscriber, event: dict[str, Any]) -> bool:
        if getattr(subscriber, "never_waits", False):  # no timer to arm for each event
            await subscriber.deliver(event)
            return True
        try:
            async with asyncio.timeout(self.send_timeout):
                await subscriber.deliver(event)
            return True
        except Exception as exc:  # a gone or slow client: drop it, keep the exec going
            reason = "too slow" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            self.detach(subscriber)
            subscriber.dropped(reason)
            return False

    async def publish(self, event: dict[str, Any]) -> None:
        async with self._lock:
            self.buffer.append(event)
            for subscriber in list(self.subscribers):
                await self._deliver(subscriber, event)

    async def pump(self, events: AsyncIterator[dict[str, Any]]) -> None:
        """Move a stream's events into this record until its `end` (or a synthetic one)."""
        try:
            async for raw in events:
                ev = raw.get("ev")
                if ev == "keepalive":
                    continue
                event = {k: v for k, v in raw.items() if k not in ("id", "seq")}
                if ev == "start":
                    self.start_seen = True
                    event["exec_id"] = self.exec_id
                    pid = event.get("pid")
                    self.pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
                elif ev == "end":
                    confirmed = True
                    if self.confirm_end is not None:
                        try:
                            await self.confirm_end()
                        except ProtocolError as exc:  # the agent died or was stopped meanwhile
                            event, confirmed = _end_with(exc), False
                    if self.on_end is not None and confirmed:
                        event.update(await self.on_end())
                    await self._finish(event)
                    return
                await self.publish(event)
            await self._finish(_end_with(ProtocolError("guest_protocol", "the stream stopped without an end")))
        except ProtocolError as exc:
            await self._finish(_end_with(exc))
        except asyncio.CancelledError:
            # Only a destroy (or shutdown) cancels a pump, and it awaits the pump: so the end is
            # kept (exec.list, REST waiters) but delivered to nobody. Delivering could wait on a
            # client that stopped reading (a blocked send, or the lock held by its attach replay)
            # and hold the destroy up; every session of the sandbox is closed with 4404 anyway.
            if self._settle(_end_with(self.cancel_error)):
                self.stopped_by_gateway = True
                assert self.end is not None
                self.buffer.append(self.end)
                self._retire()
            raise
        except Exception as exc:
            log.exception("exec %s pump failed", self.exec_id)
            await self._finish(_end_with(ProtocolError("internal", f"{type(exc).__name__}: {exc}")))

    async def _finish(self, end: dict[str, Any]) -> None:
        if self._settle(end):
            await self.publish(end)
            self._retire()

    def _retire(self) -> None:
        """The exec ended and its end is buffered: its replay may now be reclaimed for others."""
        if self.buffer.budget is not None:
            self.buffer.budget.finished(self.buffer)

    def _settle(self, end: dict[str, Any]) -> bool:
        """Complete `end` and mark the record done; False if it had already ended."""
        if self.done.is_set():
            return False
        if self.timed_out_after is not None:
            end["error"] = ProtocolError(
                "timeout",
                f"the exec ran past its {self.timed_out_after:g} s timeout and was stopped "
                "(the sandbox's agent was restarted: files are kept, interpreter state is not)",
            ).to_wire()
            end.setdefault("exit_code", None)
        end.setdefault("exit_code", None)
        end.setdefault("signal", None)
        end.setdefault("duration_ms", round((time.monotonic() - self.started) * 1000, 3))
        self.end = end
        self.ended_at = time.time()
        self.done.set()  # before delivering: a stalled client must not hold the exec "running"
        return True


#: Errors an exec's end carries when the agent went away or was stopped under it: the exec may well
#: have run (an agent killed by its own exec dies before it can report the start), so such an end is
#: never taken for a refusal.
AGENT_LOST_CODES = frozenset({"guest_died", "guest_protocol", "timeout", "internal"})


def refused_before_start(end: dict[str, Any]) -> bool:
    """Whether `end`, arriving before any `start`, is the agent refusing the exec (a missing cwd):
    then the exec never ran, and its requester gets a plain error instead of an exec result."""
    error = end.get("error")
    return isinstance(error, dict) and error.get("code") not in AGENT_LOST_CODES


def _end_with(error: ProtocolError) -> dict[str, Any]:
    return {"ev": "end", "exit_code": None, "signal": None, "error": error.to_wire()}


class OutputCollector:
    """A subscriber that gathers an exec's output for a REST reply.

    It keeps at most `stream_bytes` of each output stream (its first bytes) and `max_bytes` in
    all; the rest is counted, not kept (`dropped_bytes`), while the exec runs on to its end.
    It keeps every display bundle (`display`): the agent leg bounds their sum per exec
    (guest_agent/schema.py `MAX_EXEC_DISPLAY_BYTES`)."""

    #: Its `deliver` never waits and never raises: the record arms no send timeout for it.
    never_waits = True

    def __init__(self, max_bytes: int, stream_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.stream_bytes = stream_bytes
        self.taken = 0
        # The agent leg admits only these fds (OUTPUT_FDS), so indexing below cannot fail.
        self.out: dict[str, bytearray] = {fd: bytearray() for fd in OUTPUT_FDS}
        self.dropped_bytes: dict[str, int] = dict.fromkeys(OUTPUT_FDS, 0)
        self.display: list[dict[str, str]] = []

    @property
    def truncated(self) -> bool:
        return any(self.dropped_bytes.values())

    async def deliver(self, event: dict[str, Any]) -> None:
        if event["ev"] == "data":
            fd, data = event["fd"], event["data"]
            room = max(0, min(self.max_bytes - self.taken, self.stream_bytes - len(self.out[fd])))
            if len(data) > room:
                self.dropped_bytes[fd] += len(data) - room
                data = data[:room]
            self.taken += len(data)
            self.out[fd].extend(data)
        elif event["ev"] == "display":
            self.display.append(event["bundle"])

    def dropped(self, reason: str) -> None:  # never raises, so never dropped
        pass
