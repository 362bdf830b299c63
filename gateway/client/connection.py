"""One sandbox's WebSocket session, kept up across drops (docs/protocol.md §3 exec.attach, §5).

A `Connection` multiplexes requests and exec streams over one WebSocket. When the socket drops
without the gateway saying the sandbox is gone, a supervisor task reconnects (backing off, within
`reconnect_timeout`), says `hello`, and re-attaches every running exec from the first event this
client has not delivered, so output is neither lost nor doubled (`StreamTracker` decides what to
deliver). Requests that only read (`fs.stat`, `metrics`, ...) are sent again after a reconnect;
a request that changes something and was in flight when the socket dropped fails with
`ConnectionLost`, because the client cannot know whether it took effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.client.errors import (
    BadRequest,
    ConnectionLost,
    FrameTooLarge,
    GuestProtocol,
    Internal,
    NotFound,
    SandgateError,
    Timeout,
    error_for_status,
    error_from_wire,
)
from gateway.client.models import ExecEvent, Exited, OutputLost, Started, WatchEvent
from gateway.client.streams import StreamTracker, event_from_wire
from gateway.protocol.client import CLOSE_DESTROYED, CLOSE_PROTOCOL_ERROR, SUBPROTOCOLS, ClientCodec
from guest_agent.schema import OPS
from guest_agent.wire import PROTOCOL_VERSION, ProtocolError, message_kind

log = logging.getLogger(__name__)

#: Ops that change nothing, so sending them again after a reconnect is harmless.
IDEMPOTENT_OPS = frozenset(name for name, op in OPS.items() if op.idempotent)
#: Close codes after which reconnecting cannot help (docs/protocol.md §5).
CLOSE_TOO_BIG = 1009


class _Dropped(Exception):
    """The socket a request was sent on went away before its reply came."""


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    #: Runs in the reader when the result arrives, before any later message is handled.
    on_result: Callable[[dict[str, Any]], None] | None = None


class ExecStream:
    """The receiving end of one exec: events in order, each exactly once, then `Exited`.

    Items are queued until the consumer takes them, so a consumer that is slow (or absent) never
    stalls replies to other requests on the same socket."""

    def __init__(self, exec_id: str, *, watch: bool = False) -> None:
        self.exec_id = exec_id
        #: A watch's stream (fs.watch): `change` events, and no output.
        self.watch = watch
        #: The `start` message as it came (a watch's says which `backend` it uses).
        self.start_message: dict[str, Any] = {}
        self.tracker = StreamTracker()
        self.queue: asyncio.Queue[ExecEvent | WatchEvent | SandgateError] = asyncio.Queue()
        self.started: asyncio.Future[Started] = asyncio.get_running_loop().create_future()
        self.done = False

    def feed(self, message: Mapping[str, Any]) -> None:
        """Take one stream message from the socket (keepalives already filtered out)."""
        try:
            event = event_from_wire(message)
        except SandgateError as exc:
            self.fail(exc)
            return
        if isinstance(event, WatchEvent) != self.watch and not isinstance(event, Started | Exited):
            whose = "a watch" if self.watch else "an exec"
            self.fail(GuestProtocol(f"a {message.get('ev')} event on {whose}'s stream"))
            return
        deliver, gap = self.tracker.accept(message["seq"])  # an int: event_from_wire checked it
        if not deliver:
            return
        if gap is not None:
            self.queue.put_nowait(gap)
        self.queue.put_nowait(event)
        if isinstance(event, Started) and not self.started.done():
            self.start_message = dict(message)
            self.started.set_result(event)
        if isinstance(event, Exited):
            self.done = True
            if not self.started.done():  # ended before it started (refused by the runtime)
                self.started.set_result(Started(self.exec_id, None, -1))

    def lost(self, event: OutputLost) -> None:
        self.queue.put_nowait(event)

    def fail(self, error: SandgateError) -> None:
        """End the stream with `error` (the consumer raises it)."""
        if self.done:
            return
        self.done = True
        self.queue.put_nowait(error)
        if not self.started.done():
            self.started.set_exception(error)
            self.started.exception()  # retrieved here: start() may never look


class Connection:
    """A kept-up WebSocket session to one sandbox.

    Args:
        session: the HTTP session to open the socket with (owned by the caller).
        url: the `ws://…/v1/sandboxes/{id}/ws` URL.
        headers: sent with every upgrade (the `Authorization` header).
        subprotocol: `sandgate.v1.msgpack` or `sandgate.v1.json`.
        request_timeout: seconds a request may take, waiting for a reconnect included.
        connect_timeout: seconds one connection attempt may take.
        reconnect_timeout: seconds to keep trying after a drop before giving up.
        heartbeat: seconds between WebSocket pings; a missing pong counts as a drop.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str, headers: Mapping[str, str], *,
                 subprotocol: str, request_timeout: float, connect_timeout: float, reconnect_timeout: float,
                 heartbeat: float) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(f"subprotocol must be one of {SUBPROTOCOLS}")
        self.session = session
        self.url = url
        self.headers = dict(headers)
        self.codec = ClientCodec(subprotocol)
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.heartbeat = heartbeat
        #: What the gateway said in `hello` (capabilities, sandbox description).
        self.hello: dict[str, Any] = {}
        #: How many times the socket dropped and came back.
        self.reconnects = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._routes: dict[int, ExecStream] = {}  # request id → stream, on the current socket
        self._live: set[ExecStream] = set()
        self._ready = asyncio.Event()
        self._failed: SandgateError | None = None
        self._closed = False
        self._supervisor: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    # -- public ---------------------------------------------------------------------------------

    async def request(self, op: str, fields: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> dict[str, Any]:
        """Send one request and return its result.

        Raises:
            SandgateError: the gateway's error for it, `Timeout` past `timeout`, `ConnectionLost`
                when the socket dropped with a changing request in flight or could not come back.
        """
        limit = self.request_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while True:
                    ws = await self._wait_ready()
                    try:
                        return await self._roundtrip(ws, op, dict(fields or {}))
                    except _Dropped:
                        if op not in IDEMPOTENT_OPS:
                            raise ConnectionLost(f"the connection dropped while {op} was in flight; it may or "
                                                 "may not have taken effect") from None
        except TimeoutError:
            raise Timeout(f"no answer to {op} within {limit:g} s") from None

    async def start_exec(self, fields: Mapping[str, Any], *, op: str = "exec.start") -> ExecStream:
        """Send `exec.start` (with a client-chosen `exec_id`), or `fs.watch` (with a client-chosen
        `watch_id`), and return its stream once it has started, so a refused one raises here. A
        reconnect re-attaches either by its id (`exec.attach`).

        Raises:
            SandgateError: the gateway's refusal (`busy`, `unsupported`, ...), or a connection error.
        """
        watch = op == "fs.watch"
        stream = ExecStream(str(fields["watch_id" if watch else "exec_id"]), watch=watch)
        try:
            async with asyncio.timeout(self.request_timeout):
                ws = await self._wait_ready()
                request_id = next(self._ids)
                self._routes[request_id] = stream
                self._live.add(stream)
                try:
                    await self._send(ws, {"id": request_id, "op": op, **fields})
                except _Dropped:
                    pass  # the supervisor re-attaches it by exec_id, or reports that it never started
                await stream.started
        except TimeoutError:
            self.forget(stream)
            raise Timeout(f"{'watch' if watch else 'exec'} {stream.exec_id} was not confirmed within "
                          f"{self.request_timeout:g} s") from None
        return stream

    async def attach_exec(self, exec_id: str | None = None, tag: str | None = None) -> ExecStream:
        """Follow an exec started elsewhere from its first buffered event (`exec.attach`).

        Raises:
            NotFound: no such exec.
        """
        stream = ExecStream(exec_id or "")
        selector = {"exec_id": exec_id} if exec_id is not None else {"tag": tag}
        try:
            async with asyncio.timeout(self.request_timeout):
                while True:
                    ws = await self._wait_ready()
                    try:
                        await self._attach(ws, stream, selector)
                        return stream
                    except _Dropped:
                        self.forget(stream)  # attaching changes nothing: try again on the next socket
        except TimeoutError:
            self.forget(stream)
            raise Timeout(f"exec.attach got no answer within {self.request_timeout:g} s") from None

    async def close(self) -> None:
        """Close the socket; every open stream ends with `ConnectionLost`."""
        if self._closed:
            return
        self._closed = True
        self._ready.set()  # wake waiters: they see _closed
        ws = self._ws
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if ws is not None:
            await ws.close()
        self._end_all(ConnectionLost("the client closed the connection"))

    @property
    def failed(self) -> SandgateError | None:
        """Why the connection gave up, if it did (a permanent reason stays: `NotFound` for a
        destroyed sandbox, `Unauthorized`)."""
        return self._failed

    def forget(self, stream: ExecStream) -> None:
        """Stop tracking a stream whose consumer went away."""
        self._live.discard(stream)
        for request_id in [rid for rid, s in self._routes.items() if s is stream]:
            del self._routes[request_id]

    # -- the socket -----------------------------------------------------------------------------

    async def _wait_ready(self) -> aiohttp.ClientWebSocketResponse:
        if self._failed is not None and self._failed.retryable and not self._closed:
            # The last attempt gave up (the gateway was unreachable): a new call may try again.
            self._failed, self._supervisor = None, None
            self._ready.clear()
        while True:
            if self._failed is not None:
                raise _copy(self._failed)
            if self._closed:
                raise ConnectionLost("the connection was closed")
            if self._supervisor is None:
                self._supervisor = asyncio.create_task(self._supervise(), name=f"sandgate-ws {self.url}")
            await self._ready.wait()
            if self._ws is not None and self._failed is None and not self._closed:
                return self._ws

    async def _roundtrip(self, ws: aiohttp.ClientWebSocketResponse, op: str, fields: dict[str, Any], *,
                         on_result: Callable[[dict[str, Any]], None] | None = None,
                         request_id: int | None = None) -> dict[str, Any]:
        request_id = next(self._ids) if request_id is None else request_id
        pending = _Pending(asyncio.get_running_loop().create_future(), on_result)
        self._pending[request_id] = pending
        try:
            await self._send(ws, {"id": request_id, "op": op, **fields})
            return await pending.future
        finally:
            self._pending.pop(request_id, None)

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
        try:
            payload = self.codec.encode(message)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"cannot encode {message.get('op')}: {exc}") from None
        try:
            async with self._send_lock:
                if isinstance(payload, bytes):
                    await ws.send_bytes(payload)
                else:
                    await ws.send_str(payload)
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            if self._ws is ws:
                # Dead for certain: later requests wait for the supervisor to bring a new socket,
                # instead of failing on this one again before the reader has noticed.
                self._ready.clear()
            raise _Dropped(str(exc)) from None

    async def _open(self) -> aiohttp.ClientWebSocketResponse:
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await self.session.ws_connect(self.url, protocols=(self.codec.subprotocol,),
                                                   headers=self.headers, heartbeat=self.heartbeat,
                                                   max_msg_size=4 << 20)
        except aiohttp.WSServerHandshakeError as exc:
            raise error_for_status(exc.status, f"the gateway refused the WebSocket for {self.url}: "
                                               f"HTTP {exc.status}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot reach the gateway at {self.url}: {exc or type(exc).__name__}") from None
        except RuntimeError as exc:  # the HTTP session was closed under this connection
            raise ConnectionLost(f"cannot open a WebSocket: {exc}", retryable=False) from None
        if ws.protocol != self.codec.subprotocol:
            await ws.close()
            raise GuestProtocol(f"the gateway chose subprotocol {ws.protocol!r}, not {self.codec.subprotocol!r}")
        return ws

    async def _supervise(self) -> None:
        """Connect, resume, read until the socket drops; repeat until closed or failed for good.

        The first connection fails at once; after a drop, retryable failures are retried with
        backoff until `reconnect_timeout` has passed since the drop."""
        try:
            await self._keep_up()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: say so to every waiter instead of leaving them hanging
            log.exception("sandgate: the connection supervisor failed")
            self._fail(Internal(f"the SDK's connection supervisor failed: {type(exc).__name__}: {exc}"))

    async def _keep_up(self) -> None:
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # while reconnecting: when to give up
        delay = 0.05
        while not self._closed:
            if deadline is not None and loop.time() >= deadline:
                self._fail(ConnectionLost(f"the connection dropped and did not come back within "
                                          f"{self.reconnect_timeout:g} s"))
                return
            try:
                ws = await self._open()
            except SandgateError as exc:
                if deadline is None or not exc.retryable:
                    self._fail(exc)
                    return
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, 2.0)
                continue
            self._ws = ws
            reader = asyncio.create_task(self._read(ws), name="sandgate-ws-reader")
            resumed = False
            try:
                await self._resume(ws, reconnecting=deadline is not None)
                resumed = True
            except _Dropped:
                pass  # dropped again at once: the reader has ended
            except SandgateError as exc:
                await ws.close()
                await reader
                self._fail(exc)
                return
            if resumed:
                deadline, delay = None, 0.05
                self._ready.set()
            try:
                close_code = await reader
            finally:
                self._ready.clear()
                self._ws = None
            if self._closed:
                return
            permanent = _permanent_close(close_code)
            if permanent is not None:
                self._fail(permanent)
                return
            if deadline is None:
                if not resumed:  # the very first socket dropped while opening
                    self._fail(ConnectionLost(f"the connection to {self.url} dropped while opening"))
                    return
                deadline = loop.time() + self.reconnect_timeout
            log.info("sandgate: connection to %s dropped (close code %s); reconnecting", self.url, close_code)

    async def _resume(self, ws: aiohttp.ClientWebSocketResponse, *, reconnecting: bool) -> None:
        """On a fresh socket: `hello`, then re-attach every running exec where it left off."""
        hello = await self._roundtrip(ws, "hello", {"version": PROTOCOL_VERSION})
        if hello.get("version") != PROTOCOL_VERSION:
            raise GuestProtocol(f"the gateway speaks protocol version {hello.get('version')!r}, "
                                f"this client {PROTOCOL_VERSION}")
        self.hello = hello
        if reconnecting:
            self.reconnects += 1  # before any replayed event can reach a consumer
        for request_id in list(self._routes):  # routes of the dead socket
            del self._routes[request_id]
        await asyncio.gather(*(self._reattach(ws, stream) for stream in list(self._live)))

    async def _reattach(self, ws: aiohttp.ClientWebSocketResponse, stream: ExecStream) -> None:
        try:
            await self._attach(ws, stream, {"exec_id": stream.exec_id})
        except NotFound:
            why = ("it never started" if stream.tracker.last_seq is None
                   else "it finished long ago and was forgotten")
            stream.fail(ConnectionLost(f"the connection dropped and the gateway no longer knows exec "
                                       f"{stream.exec_id}: {why}"))
        except SandgateError as exc:
            stream.fail(exc)

    async def _attach(self, ws: aiohttp.ClientWebSocketResponse, stream: ExecStream,
                      selector: dict[str, Any]) -> None:
        """`exec.attach` `stream` on `ws` from its resume point; raises the gateway's refusal."""
        request_id = next(self._ids)
        self._routes[request_id] = stream
        self._live.add(stream)

        def attached(result: dict[str, Any]) -> None:
            # In the reader, before the replayed events that follow this reply.
            if isinstance(result.get("exec_id"), str):
                stream.exec_id = result["exec_id"]
            lost = stream.tracker.attached(result)
            if lost is not None:
                stream.lost(lost)

        try:
            await self._roundtrip(ws, "exec.attach", {**selector, "from_seq": stream.tracker.resume_from},
                                  on_result=attached, request_id=request_id)
        except SandgateError:
            self._routes.pop(request_id, None)
            self._live.discard(stream)
            raise

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> int | None:
        """Route every message of `ws` until it closes; then fail what was in flight on it."""
        try:
            async for msg in ws:
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    try:
                        self._route(msg.data)
                    except Exception:  # a bug here must not take the connection down with it
                        log.exception("sandgate: failed to handle a message from the gateway")
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.debug("sandgate: socket error: %s", exc)
        finally:
            for pending in list(self._pending.values()):
                if not pending.future.done():
                    pending.future.set_exception(_Dropped())
        return ws.close_code

    def _route(self, payload: str | bytes) -> None:
        try:
            message = self.codec.decode(payload)
            kind = message_kind(message)
        except ProtocolError as exc:
            log.warning("sandgate: ignoring a malformed message from the gateway: %s", exc)
            return
        request_id = message["id"]
        if kind == "event":
            stream = self._routes.get(request_id)
            if stream is None or message["ev"] == "keepalive":
                return
            stream.feed(message)
            if stream.done:
                self._routes.pop(request_id, None)
                self._live.discard(stream)
            return
        if kind != "reply":
            return
        pending = self._pending.get(request_id)
        if pending is not None:
            if pending.future.done():
                return
            if "error" in message:
                pending.future.set_exception(error_from_wire(message["error"]))
            else:
                if pending.on_result is not None:
                    pending.on_result(message["result"])
                pending.future.set_result(message["result"])
            return
        stream = self._routes.pop(request_id, None)
        if stream is not None and "error" in message:  # exec.start refused before it started
            self._live.discard(stream)
            stream.fail(error_from_wire(message["error"]))

    # -- failure --------------------------------------------------------------------------------

    def _fail(self, error: SandgateError) -> None:
        self._failed = error
        self._ready.set()  # wake waiters: they see _failed
        self._end_all(error)

    def _end_all(self, error: SandgateError) -> None:
        for stream in list(self._live):
            stream.fail(_copy(error))
        self._live.clear()
        self._routes.clear()
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(_copy(error))


def _permanent_close(code: int | None) -> SandgateError | None:
    if code == CLOSE_DESTROYED:
        return NotFound("the sandbox was destroyed")
    if code == CLOSE_PROTOCOL_ERROR:
        return BadRequest("the gateway closed the session after too many protocol errors")
    if code == CLOSE_TOO_BIG:
        return FrameTooLarge("the gateway closed the session: a message exceeded its size limit")
    return None


def _copy(error: SandgateError) -> SandgateError:
    """A fresh exception per raise, so tracebacks of different callers do not pile up on one object."""
    copy = type(error)(error.message, code=error.code, retryable=error.retryable, http_status=error.http_status,
                       retry_after=error.retry_after)
    copy.result = error.result
    return copy
