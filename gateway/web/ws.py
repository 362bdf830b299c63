"""The WebSocket session (docs/protocol.md §5): one connection, bound to one sandbox.

The handler authenticates and checks the Origin before the upgrade, then decodes each client message
with the sans-I/O `ClientCodec` and hands it to the manager. Each request runs in its own task, so a
long stream never blocks stdin, signals or other requests on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from aiohttp import WSMessage, WSMsgType, web

from gateway import __version__
from gateway.functions.calls import invoke_in, test_in
from gateway.protocol.client import (
    CLOSE_DESTROYED,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_SLOW,
    MAX_CLIENT_MESSAGE,
    ClientCodec,
    InvalidMessage,
    bearer_from_subprotocols,
    choose_subprotocol,
)
from gateway.protocol.paths import check_path
from gateway.sessions.execs import refused_before_start
from gateway.sessions.manager import SandboxManager
from gateway.sessions.sandbox import Sandbox
from gateway.web.context import MANAGER, SESSIONS, SETTINGS, authenticate, bearer_token
from guest_agent import schema
from guest_agent.wire import PROTOCOL_VERSION, ProtocolError

Handler = Callable[[schema.Request], Awaitable[dict[str, Any] | None]]

log = logging.getLogger(__name__)

MAX_PROTOCOL_ERRORS = 100
#: Seconds from the gateway's decision to close a session to its connection being cut, if the
#: close handshake is not done by then. A client that stopped reading never takes the close frame,
#: and would hold its session (and a shutdown) forever.
CLOSE_TIMEOUT_S = 5.0
PATH_FIELDS = ("path", "src", "dst")


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    """No Origin (not a browser), the gateway's own origin, or one on the allowlist.

    The own origin is the page's: the scheme the request came in on (http for a page served over
    http, https behind TLS) and the Host it named. An `https://` or `ws://` Origin naming the same
    host:port is another origin (RFC 6454), so it is refused unless it is on the allowlist.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    return origin.lower() == f"{request.scheme}://{request.host}".lower()


class Subscription:
    """Delivers one exec's events to this session under the client's request id.

    The subscription of the exec.start that made the exec (`starting`) answers an exec that ended
    before it started (a missing `cwd`, a refused start) with an error reply, as any refused
    request is answered: the client never sees a start that did not happen."""

    def __init__(self, session: Session, client_id: int, *, starting: bool = False) -> None:
        self.session = session
        self.client_id = client_id
        self.starting = starting
        #: The seq of the last event written to the socket (set under the session's send lock).
        self.last_seq: int | None = None
        self.last_sent = time.monotonic()
        #: A delivery is under way (perhaps waiting on a slow client): the stream is not quiet.
        self.sending = False

    async def deliver(self, event: dict[str, Any]) -> None:
        if self.starting:
            self.starting = event["ev"] not in ("start", "end")
            if event["ev"] == "end" and refused_before_start(event):
                self.session.subscriptions.discard(self)
                error = ProtocolError.from_wire(event["error"])
                await self.session.send({"id": self.client_id, "error": error.to_wire()})
                return
        self.sending = True
        try:
            await self.session.send({"id": self.client_id, **event}, subscription=self)
        finally:
            self.sending = False
        self.last_sent = time.monotonic()
        if event["ev"] == "end":  # a finished stream gets no more keepalives
            self.session.subscriptions.discard(self)

    async def deliver_keepalive(self) -> None:
        await self.session.send_keepalive(self)
        self.last_sent = time.monotonic()

    def dropped(self, reason: str) -> None:
        self.session.subscriptions.discard(self)
        if reason == "too slow":
            self.session.request_close(CLOSE_TOO_SLOW, "too slow to take output; re-attach with exec.attach")


class Session:
    #: The method answering each client-leg op of the schema (a test checks they match); None: the
    #: gateway forwards the op to the agent after its checks (`SandboxManager.request`).
    HANDLERS: ClassVar[dict[str, str | None]] = {
        "hello": "_hello", "ping": "_ping", "sandbox.info": "_info", "sandbox.destroy": "_destroy",
        "metrics": "_metrics", "exec.start": "_exec_start", "exec.attach": "_exec_attach", "exec.list": "_exec_list",
        "exec.signal": "_exec_signal", "fs.read": "_fs_read", "exec.input": None, "exec.close_stdin": None,
        "exec.resize": None, "fs.stat": None, "fs.list": None, "fs.write": None, "fs.mkdir": None, "fs.move": None,
        "fs.remove": None, "fs.patch": None, "fs.changes": None, "fs.watch": "_fs_watch",
        "fs.unwatch": "_fs_unwatch",
        "invoke": "_invoke", "test": "_test",
    }

    def __init__(self, ws: web.WebSocketResponse, codec: ClientCodec, manager: SandboxManager,
                 sandbox: Sandbox, transport: asyncio.Transport | None = None) -> None:
        self.ws = ws
        self.transport = transport
        #: This session asked for its sandbox's destroy: it closes itself after the reply.
        self.destroying = False
        #: (code, reason) once the gateway decided to close this session (`request_close`).
        self._close_request: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        self._abort_timer: asyncio.TimerHandle | None = None
        self.codec = codec
        self.manager = manager
        self.sandbox = sandbox
        self.subscriptions: set[Subscription] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors = 0
        self._send_lock = asyncio.Lock()
        # Keystrokes, resizes and signals must reach the agent in the order they were typed, so
        # they go through one queue and one worker; every other request runs in its own task.
        self._controls: asyncio.Queue[schema.Request] = asyncio.Queue()
        self.spawn(self._run_controls())

    async def _run_controls(self) -> None:
        while True:
            await self.run(await self._controls.get())

    async def send(self, message: dict[str, Any], subscription: Subscription | None = None) -> None:
        """Send one message; an event of `subscription`'s stream also records its seq as sent."""
        payload = self.codec.encode(message)
        async with self._send_lock:
            await self._write(payload)
            if subscription is not None:
                subscription.last_seq = message["seq"]

    async def send_keepalive(self, subscription: Subscription) -> None:
        # Built under the send lock, where `last_seq` is recorded: a keepalive taken while an event
        # was still being written would otherwise name the event before it (docs/protocol.md §1).
        async with self._send_lock:
            if subscription.last_seq is not None:
                await self._write(self.codec.encode(
                    {"id": subscription.client_id, "ev": "keepalive", "seq": subscription.last_seq}))

    async def _write(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            await self.ws.send_bytes(payload)
        else:
            await self.ws.send_str(payload)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def request_close(self, code: int, message: str) -> None:
        """Close this session with `code`. The handler's task does it (`receive`): only the one
        task that reads the socket can wait for the client's close frame before the connection
        closes, and a client may still be decoding what came before ours (Node's WebSocket drops
        a message it is still inflating when the connection closes under it). Whatever happens,
        the connection is cut after CLOSE_TIMEOUT_S."""
        if self._close_request.done():
            return
        self._close_request.set_result((code, message))
        self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def receive(self) -> WSMessage | None:
        """The client's next text or binary message; None when the session ends (the client
        closed, or `request_close` was called: then the close handshake is done here)."""
        while not self._close_request.done():
            receive = asyncio.ensure_future(self.ws.receive())
            try:
                await asyncio.wait((receive, self._close_request), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not receive.done():
                    receive.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await receive
            if self._close_request.done():
                break
            msg = receive.result()
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                return msg
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return None
        code, message = self._close_request.result()
        try:
            await self.ws.close(code=code, message=message.encode())
        except asyncio.CancelledError:
            # aiohttp's sends on one connection wait on one shared drain future: a task cancelled
            # in a send to this (stalled) client cancels the close's wait as well. Not ours: cut.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            self._abort()
        except Exception as exc:  # the connection is already gone
            log.debug("session close failed: %s", exc)
        return None

    async def reply_error(self, request_id: Any, error: ProtocolError) -> None:
        self.errors += 1
        rid = request_id if isinstance(request_id, int) and not isinstance(request_id, bool) else None
        await self.send({"id": rid, "error": error.to_wire()})
        if self.errors >= MAX_PROTOCOL_ERRORS:
            self.request_close(CLOSE_PROTOCOL_ERROR, "too many protocol errors")

    async def handle(self, payload: str | bytes) -> None:
        """Decode one client message and validate it against the op schema, once, here."""
        request_id = None
        try:
            message = self.codec.decode(payload)
            request_id = schema.request_id_of(message)
            request = schema.parse(message, schema.CLIENT)
        except ProtocolError as exc:
            await self.reply_error(exc.request_id if isinstance(exc, InvalidMessage) else request_id, exc)
            return
        except Exception:  # a bug, not the client's: it still gets its answer, the session goes on
            log.exception("client message not parsed")
            await self.reply_error(request_id, ProtocolError("internal", "internal error; see the gateway's log"))
            return
        if request.op.control:
            self._controls.put_nowait(request)
        else:
            self.spawn(self.run(request))

    async def run(self, request: schema.Request) -> None:
        try:
            for name in PATH_FIELDS:
                if name in request.args:
                    check_path(request.args[name], allow_absolute=True)
            method = self.HANDLERS[request.op.name]
            result: dict[str, Any] | None
            if method is None:
                result = await self.manager.request(self.sandbox, request.op.name, request.args)
            else:
                handler: Handler = getattr(self, method)
                result = await handler(request)
            if result is not None:
                await self.send({"id": request.id, "result": result})
            return
        except ProtocolError as exc:
            error = exc
        except (ConnectionError, RuntimeError) as exc:
            log.debug("session send failed: %s", exc)  # the socket is going away; the loop ends
            return
        except Exception:
            # A bug, not the client's: the request is still answered, and the task that runs it
            # (perhaps the session's one control worker) lives on.
            log.exception("%s failed", request.op.name)
            error = ProtocolError("internal", "internal error; see the gateway's log")
        try:
            await self.reply_error(request.id, error)
        except (ConnectionError, RuntimeError) as exc:  # the client left meanwhile (bench/soak.py found it)
            log.debug("session send failed: %s", exc)

    # -- the ops the gateway answers itself, or forwards with more than checks ----------------------
    # Each returns the op's result, or None when it answered with a stream (or itself).

    async def _hello(self, request: schema.Request) -> dict[str, Any]:
        version = request["version"]
        if version != PROTOCOL_VERSION:
            raise ProtocolError("unsupported", f"protocol version {version} (this gateway speaks {PROTOCOL_VERSION})")
        # docs/protocol.md §3: `agent` and `platform` are the sandbox agent's own (from its hello);
        # `max_frame` is this leg's limit, the largest message a client may send.
        sandbox = self.sandbox
        agent_hello = sandbox.agent.hello
        return {"version": PROTOCOL_VERSION, "gateway": f"sandgate/{__version__}",
                "agent": agent_hello.get("agent"), "platform": agent_hello.get("platform"),
                "max_frame": MAX_CLIENT_MESSAGE,
                "subprotocol": self.codec.subprotocol, "sandbox": sandbox.describe(),
                "capabilities": sorted(sandbox.capabilities)}

    async def _ping(self, request: schema.Request) -> dict[str, Any]:
        return await self.manager.ping(self.sandbox)

    async def _info(self, request: schema.Request) -> dict[str, Any]:
        return self.sandbox.describe()

    async def _destroy(self, request: schema.Request) -> None:
        # docs/protocol.md §3: the reply, then the 4404 close. Every other session is closed
        # during the destroy (_close_on_destroy); this one only after its reply.
        self.destroying = True
        try:
            await self.manager.destroy(self.sandbox, "api")
            await self.send({"id": request.id, "result": {}})
        finally:
            self.request_close(CLOSE_DESTROYED, "sandbox destroyed")

    async def _metrics(self, request: schema.Request) -> dict[str, Any]:
        return await self.manager.metrics(self.sandbox)

    async def _exec_start(self, request: schema.Request) -> None:
        subscription = Subscription(self, request.id, starting=True)
        self.subscriptions.add(subscription)
        try:
            await self.manager.start_exec(self.sandbox, request.args, subscription)
        except BaseException:
            self.subscriptions.discard(subscription)
            raise

    async def _exec_attach(self, request: schema.Request) -> None:
        record = self.manager.find_exec(self.sandbox, request.args, kind=None)  # a watch too
        subscription = Subscription(self, request.id)
        from_seq = request["from_seq"]
        # The client has everything before from_seq: a quiet re-attached stream gets keepalives
        # carrying that, not silence until its next event. Never a seq the stream has not
        # reached: a from_seq past its end stands for its last event.
        last_seq = min(from_seq, record.buffer.next_seq) - 1
        subscription.last_seq = last_seq if last_seq >= 0 else None
        self.subscriptions.add(subscription)

        async def reply_first(result: dict[str, Any]) -> None:
            # The client learns what was lost before the replay arrives.
            await self.send({"id": request.id, "result": result})

        await record.attach(subscription, from_seq, reply_first)

    async def _exec_list(self, request: schema.Request) -> dict[str, Any]:
        return {"execs": [r.summary() for r in self.sandbox.execs.values() if r.kind == "exec"]}

    async def _exec_signal(self, request: schema.Request) -> dict[str, Any]:
        return await self.manager.signal(self.sandbox, request.args)

    async def _fs_watch(self, request: schema.Request) -> None:
        subscription = Subscription(self, request.id, starting=True)
        self.subscriptions.add(subscription)
        try:
            await self.manager.start_watch(self.sandbox, request.args, subscription)
        except BaseException:
            self.subscriptions.discard(subscription)
            raise

    async def _fs_unwatch(self, request: schema.Request) -> dict[str, Any]:
        return await self.manager.stop_watch(self.sandbox, request.args)

    async def _invoke(self, request: schema.Request) -> dict[str, Any]:
        return await invoke_in(self.manager, self.sandbox, request.args)

    async def _test(self, request: schema.Request) -> dict[str, Any]:
        return await test_in(self.manager, self.sandbox, request.args)

    async def _fs_read(self, request: schema.Request) -> None:
        await self.forward_stream(request.id, await self.manager.read_file(
            self.sandbox, request["path"], request["offset"], request.get("length")))

    async def forward_stream(self, request_id: int, stream: Any) -> None:
        try:
            async for event in stream:
                await self.send({**event, "id": request_id})
        finally:
            if not stream.finished:
                stream.discard()

    async def keepalive(self, interval: float) -> None:
        """Tell clients that a quiet exec stream is still alive (they can then use read deadlines)."""
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for sub in list(self.subscriptions):
                if now - sub.last_sent >= interval and sub.last_seq is not None and not sub.sending:
                    try:
                        await sub.deliver_keepalive()
                    except (ConnectionError, RuntimeError):
                        return  # the socket is closing: nothing more to keep alive

    async def close(self) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        for record in self.sandbox.execs.values():
            for sub in list(self.subscriptions):
                record.detach(sub)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def websocket(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    manager = request.app[MANAGER]
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    # Everything is checked before the upgrade, so a refused client gets a plain HTTP error.
    if not origin_allowed(request, settings.allowed_origins):
        raise ProtocolError("forbidden_origin", f"Origin {request.headers.get('Origin')!r} is not allowed")
    tenant = authenticate(request, bearer_token(request) or bearer_from_subprotocols(offered))
    sandbox = await manager.lookup(tenant, request.match_info["sandbox_id"])
    subprotocol = choose_subprotocol(offered)
    ws = web.WebSocketResponse(protocols=(subprotocol,), max_msg_size=MAX_CLIENT_MESSAGE, heartbeat=30.0)
    await ws.prepare(request)
    session = Session(ws, ClientCodec(subprotocol), manager, sandbox, request.transport)
    request.app[SESSIONS].add(session)
    sandbox.sessions += 1
    sandbox.touch()
    session.spawn(session.keepalive(settings.keepalive_s))
    session.spawn(_close_on_destroy(session))
    try:
        while (msg := await session.receive()) is not None:
            sandbox.touch()
            await session.handle(msg.data)
    finally:
        request.app[SESSIONS].discard(session)
        sandbox.sessions -= 1
        sandbox.touch()
        await session.close()
    return ws


async def _close_on_destroy(session: Session) -> None:
    await session.sandbox.destroyed.wait()
    if not session.destroying:  # a session's own sandbox.destroy closes it after the reply
        session.request_close(CLOSE_DESTROYED, "sandbox destroyed")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/sandboxes/{sandbox_id}/ws", websocket)
