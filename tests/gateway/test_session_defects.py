"""Regression tests for session defects: destroy with stalled clients, signals on a flood, the
destroy reply, the client-leg hello, keepalive sequence numbers, liveness ops on a busy agent.

Everything runs through a real gateway (pytest-aiohttp) on the real WASM runtime, with real
WebSocket clients. A "stalled" client is a real WebSocket client (the `websockets` library) on a
socket with a tiny receive buffer that stops reading: once the kernel buffers and the gateway's
transport buffer are full, the gateway's sends to it block, exactly as with a browser tab that
froze. No test sleeps: a stall is proved by a second, reading client's keepalives (the gateway
sends one only after `keepalive_s` without an event on that client's stream, and every event is
delivered to the stalled client first).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from websockets.asyncio.client import ClientConnection, connect

from gateway import hookimpl
from gateway.config import Settings
from gateway.protocol.client import MAX_CLIENT_MESSAGE
from gateway.web.app import MANAGER, create_app

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

KEY = "session-defects-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: Turns a hang into a failure; nothing here should come anywhere near it.
DEADLINE = 30.0
#: Python in the WASM sandbox writing 60 KB lines as fast as it can, forever.
FLOOD = "import sys\nwhile True:\n    sys.stdout.write('x' * 60000 + '\\n')\n"


class DestroyedHook:
    """A plugin that records each finished destroy (the hook fires at the very end of it)."""

    def __init__(self) -> None:
        self.destroyed: dict[str, asyncio.Event] = {}

    def event(self, sandbox_id: str) -> asyncio.Event:
        return self.destroyed.setdefault(sandbox_id, asyncio.Event())

    @hookimpl
    def sandgate_sandbox_destroyed(self, sandbox_id: str, tenant: str, runtime: str, reason: str) -> None:
        self.event(sandbox_id).set()


@pytest.fixture
def hook() -> DestroyedHook:
    return DestroyedHook()


@pytest.fixture
async def gateway(aiohttp_client: Any, hook: DestroyedHook) -> TestClient[Any, Any]:
    # A client that stalls is never dropped for being slow here (client_send_timeout_s is an
    # hour), so nothing in these tests can pass by waiting out that timeout.
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("microvm", "pod"), default_runtime="wasm",
                        keepalive_s=0.05, client_send_timeout_s=3600.0, reap_interval_s=3600.0,
                        runtimes={"wasm": {"pool_size": 1}})
    return await aiohttp_client(create_app(settings, plugins=[hook]))  # type: ignore[no-any-return]


async def _create(gateway: TestClient[Any, Any]) -> str:
    resp = await gateway.post("/v1/sandboxes", json={}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def _ws(gateway: TestClient[Any, Any], sid: str) -> aiohttp.ClientWebSocketResponse:
    return await gateway.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    return json.loads(msg.data)  # type: ignore[no-any-return]


async def _closed_with(ws: aiohttp.ClientWebSocketResponse) -> int:
    """Read until the gateway's close frame; its code."""
    async with asyncio.timeout(DEADLINE):
        while (msg := await ws.receive()).type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            pass
    assert msg.type == aiohttp.WSMsgType.CLOSE, msg
    assert ws.close_code == msg.data, "a clean close handshake"
    return int(msg.data)


@pytest.fixture
async def stalled(gateway: TestClient[Any, Any]) -> AsyncIterator[Any]:
    """A factory of real WebSocket clients that never read after the handshake."""
    opened: list[ClientConnection] = []

    async def open_stalled(sid: str) -> ClientConnection:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a tiny window
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (gateway.server.host, gateway.server.port))
        conn = await connect(f"ws://{gateway.server.host}:{gateway.server.port}/v1/sandboxes/{sid}/ws", sock=sock,
                             additional_headers=AUTH, compression=None, max_queue=1, ping_interval=None)
        opened.append(conn)
        return conn

    yield open_stalled
    for conn in opened:
        conn.transport.abort()  # a client that never read: its unread bytes reset the connection


async def _start_flood_with_viewer(
    gateway: TestClient[Any, Any], stalled: Any, sid: str, code: str = FLOOD
) -> tuple[ClientConnection, aiohttp.ClientWebSocketResponse, list[dict[str, Any]]]:
    """Start `code` from a stalled client, attach a reading viewer, and return once the viewer's
    keepalive proves the exec's output is held up by the stalled client. Returns the stalled
    client, the viewer, and the events the viewer got."""
    stuck = await stalled(sid)
    await stuck.send(json.dumps({"id": 1, "op": "exec.start", "language": "python", "tag": "flood", "code": code}))
    viewer = await _ws(gateway, sid)
    await viewer.send_json({"id": 1, "op": "exec.attach", "tag": "flood", "from_seq": 0})
    reply = await _receive(viewer)
    assert reply["result"]["exec_id"] == "e1", reply
    seen = []
    while (message := await _receive(viewer))["ev"] != "keepalive":
        seen.append(message)
    assert seen and seen[-1]["ev"] == "data" and message["seq"] == seen[-1]["seq"]
    return stuck, viewer, seen


# -- 1. destroy with stalled clients ---------------------------------------------------------


async def test_rest_delete_finishes_while_a_client_stalls_on_a_flood(
    gateway: TestClient[Any, Any], stalled: Any, hook: DestroyedHook
) -> None:
    sid = await _create(gateway)
    backend = gateway.app[MANAGER].get("tenant", sid).backend
    _stuck, viewer, _ = await _start_flood_with_viewer(gateway, stalled, sid)
    async with asyncio.timeout(DEADLINE):
        resp = await gateway.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 204
    assert hook.event(sid).is_set(), "the destroy ran to its end"
    assert backend.launcher.proc.returncode is not None
    assert await _closed_with(viewer) == 4404
    # Shutting the gateway down with the stalled client still connected is prompt and clean
    # (pytest turns ResourceWarnings and unraisable __del__ errors into failures).
    async with asyncio.timeout(DEADLINE):
        await gateway.close()


async def test_ws_destroy_finishes_while_another_client_stalls_on_a_flood(
    gateway: TestClient[Any, Any], stalled: Any, hook: DestroyedHook
) -> None:
    sid = await _create(gateway)
    _stuck, viewer, _ = await _start_flood_with_viewer(gateway, stalled, sid)
    await viewer.send_json({"id": 2, "op": "sandbox.destroy"})
    async with asyncio.timeout(DEADLINE):
        await hook.event(sid).wait()
    assert await _closed_with(viewer) == 4404
    async with asyncio.timeout(DEADLINE):
        await gateway.close()


async def test_rest_delete_finishes_while_the_client_reads_a_flood(
    gateway: TestClient[Any, Any], hook: DestroyedHook
) -> None:
    sid = await _create(gateway)
    ws = await _ws(gateway, sid)
    await ws.send_json({"id": 1, "op": "exec.start", "language": "python", "code": FLOOD})
    assert (await _receive(ws))["ev"] == "start"
    assert (await _receive(ws))["ev"] == "data"
    async with asyncio.timeout(DEADLINE):
        resp = await gateway.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 204 and hook.event(sid).is_set()
    assert await _closed_with(ws) == 4404



async def test_rest_delete_finishes_with_stdin_the_busy_agent_does_not_read(
    gateway: TestClient[Any, Any], hook: DestroyedHook
) -> None:
    sid = await _create(gateway)
    ws = await _ws(gateway, sid)
    await ws.send_json({"id": 1, "op": "exec.start", "language": "python", "stdin_open": True,
                        "code": "import time\nprint('busy', flush=True)\nwhile True:\n    time.sleep(0.01)"})
    start = await _receive(ws)
    assert (await _receive(ws))["ev"] == "data"
    # More stdin than the pipe holds, for an exec that never reads it: the gateway's write waits.
    data = base64.b64encode(b"y" * 500_000).decode()
    await ws.send_json({"id": 2, "op": "exec.input", "exec_id": start["exec_id"], "data": data})
    await ws.send_json({"id": 3, "op": "ping"})  # answered once the input is being written
    while (await _receive(ws)).get("id") != 3:
        pass
    async with asyncio.timeout(DEADLINE):
        resp = await gateway.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 204 and hook.event(sid).is_set()


# -- 2. SIGKILL on a flooding exec -----------------------------------------------------------


async def test_sigkill_on_a_flooding_exec_is_answered(gateway: TestClient[Any, Any], stalled: Any) -> None:
    sid = await _create(gateway)
    # The stalled client holds the exec's output back, so the gateway stops reading the agent:
    # the agent's pipe is full when the signal restarts it.
    stuck, viewer, seen = await _start_flood_with_viewer(gateway, stalled, sid)
    await viewer.send_json({"id": 2, "op": "exec.signal", "exec_id": "e1", "signal": "SIGKILL"})
    while (message := await _receive(viewer)).get("id") != 2:
        seen.append(message)
    assert message == {"id": 2, "result": {}}
    stuck.transport.abort()  # the stalled client goes: the rest of the stream reaches the viewer
    while not seen or seen[-1].get("ev") != "end":
        seen.append(await _receive(viewer))
    assert seen[-1]["error"]["code"] == "guest_died", seen[-1]
    # The sandbox goes on with a fresh agent.
    await viewer.send_json({"id": 3, "op": "exec.start", "language": "python", "code": "print('alive')"})
    events = []
    while not events or events[-1].get("ev") != "end":
        if (message := await _receive(viewer)).get("id") == 3:
            events.append(message)
    assert b"".join(base64.b64decode(e["data"]) for e in events if e["ev"] == "data") == b"alive\n"


async def test_sigkill_on_a_read_flood_is_answered(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    ws = await _ws(gateway, sid)
    await ws.send_json({"id": 1, "op": "exec.start", "language": "python", "code": FLOOD})
    start = await _receive(ws)
    assert (await _receive(ws))["ev"] == "data"
    await ws.send_json({"id": 2, "op": "exec.signal", "exec_id": start["exec_id"], "signal": "SIGKILL"})
    while (message := await _receive(ws)).get("id") != 2:
        assert message["ev"] == "data", "the reply comes before the stream's end (docs/protocol.md)"
    assert message == {"id": 2, "result": {}}
    while (message := await _receive(ws))["ev"] != "end":
        pass
    assert message["error"]["code"] == "guest_died", message


# -- 3. sandbox.destroy answers before the session closes ------------------------------------


@pytest.mark.parametrize("flooding", [False, True], ids=["quiet", "flooding"])
async def test_ws_destroy_replies_then_closes_4404(
    gateway: TestClient[Any, Any], hook: DestroyedHook, flooding: bool
) -> None:
    sid = await _create(gateway)
    ws = await _ws(gateway, sid)
    other = await _ws(gateway, sid)
    if flooding:  # the reply must also get through a stream in full flow on the same socket
        await ws.send_json({"id": 1, "op": "exec.start", "language": "python", "code": FLOOD})
        assert (await _receive(ws))["ev"] == "start"
    await ws.send_json({"id": 2, "op": "sandbox.destroy"})
    while (message := await _receive(ws)).get("id") != 2:
        assert message.get("id") == 1, message
    assert message == {"id": 2, "result": {}}
    assert hook.event(sid).is_set(), "the reply comes once the sandbox is gone"
    assert await _closed_with(ws) == 4404
    assert await _closed_with(other) == 4404
    resp = await gateway.get(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 404


# -- 4. the client-leg hello -----------------------------------------------------------------


async def test_client_hello_carries_the_agents_identity_and_the_frame_limit(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    agent_hello = gateway.app[MANAGER].get("tenant", sid).agent.hello
    ws = await _ws(gateway, sid)
    await ws.send_json({"id": 1, "op": "hello", "version": 1})
    hello = (await _receive(ws))["result"]
    assert hello["version"] == 1 and hello["subprotocol"] == "sandgate.v1.json"
    assert hello["agent"] == agent_hello["agent"] and hello["agent"].startswith("sandgate-guest/")
    assert hello["platform"] == agent_hello["platform"] == "wasi"
    assert hello["max_frame"] == MAX_CLIENT_MESSAGE, "the largest message the gateway takes from a client"
    assert hello["sandbox"]["id"] == sid and "exec.python" in hello["capabilities"]
    assert hello["gateway"].startswith("sandgate/")


# -- 5. keepalives carry the last seq sent ----------------------------------------------------

#: 24 MB of output (far more than the socket buffers of a stalled client hold), then quiet.
BOUNDED_FLOOD = ("import sys\nfor _ in range(400):\n    sys.stdout.write('x' * 59999 + '\\n')\n"
                 "sys.stdout.flush()\nsys.stdin.readline()\n")
BOUNDED_FLOOD_BYTES = 400 * 60000


async def test_keepalive_after_a_stalled_delivery_carries_the_last_seq_sent(
    gateway: TestClient[Any, Any], stalled: Any
) -> None:
    sid = await _create(gateway)
    stuck = await stalled(sid)
    await stuck.send(json.dumps({"id": 1, "op": "exec.start", "language": "python", "tag": "flood",
                                 "stdin_open": True, "code": BOUNDED_FLOOD}))
    viewer = await _ws(gateway, sid)
    await viewer.send_json({"id": 1, "op": "exec.attach", "tag": "flood", "from_seq": 0})
    assert "result" in await _receive(viewer)
    # Keepalives on the viewer while the output is unfinished: the stream is held up by the
    # stalled client (every event goes to it first), long enough for its own keepalive timer to
    # come round while its delivery is blocked.
    viewed = keepalives = 0
    while keepalives < 3:
        message = await _receive(viewer)
        if message["ev"] == "keepalive":
            keepalives += 1
        elif message["ev"] == "data":
            viewed += len(base64.b64decode(message["data"]))
    assert viewed < BOUNDED_FLOOD_BYTES, "the stalled client did not hold the stream up"
    await viewer.close()  # it would become the next client to hold the stream up
    # The stalled client reads again: each keepalive it gets names the last event it got.
    last_seq, received = None, 0
    async with asyncio.timeout(DEADLINE):
        while True:
            message = json.loads(await stuck.recv())
            if message["ev"] == "keepalive":
                assert message["seq"] == last_seq, f"keepalive seq {message['seq']} after event {last_seq}"
                if received == BOUNDED_FLOOD_BYTES:
                    break  # the stream went quiet, and its keepalive says where it stands
                continue
            last_seq = message["seq"]
            if message["ev"] == "data":
                received += len(base64.b64decode(message["data"]))


async def test_keepalive_of_an_attach_past_the_end_carries_the_last_seq(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    first = await _ws(gateway, sid)
    await first.send_json({"id": 1, "op": "exec.start", "language": "python", "tag": "quiet", "stdin_open": True,
                           "code": "print('ready', flush=True)\nimport sys\nsys.stdin.readline()"})
    assert (await _receive(first))["ev"] == "start"
    data = await _receive(first)
    assert data["ev"] == "data" and data["seq"] == 1
    second = await _ws(gateway, sid)
    await second.send_json({"id": 5, "op": "exec.attach", "tag": "quiet", "from_seq": 1000})
    assert (await _receive(second))["result"]["first_seq"] == 2
    assert await _receive(second) == {"id": 5, "ev": "keepalive", "seq": 1}


# -- 6. liveness ops are never refused as busy ------------------------------------------------


async def test_liveness_ops_answer_while_a_one_at_a_time_agent_runs_an_exec(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    ws = await _ws(gateway, sid)
    await ws.send_json({"id": 1, "op": "exec.start", "language": "python",
                        "code": "import time\nprint('running', flush=True)\nwhile True:\n    time.sleep(0.01)"})
    assert (await _receive(ws))["ev"] == "start"
    assert (await _receive(ws))["ev"] == "data"  # the exec runs: the WASM agent is inside it
    results = {}
    for request_id, op in enumerate(("ping", "hello", "sandbox.info"), start=2):
        await ws.send_json({"id": request_id, "op": op, "version": 1})
        while (message := await _receive(ws)).get("id") != request_id:
            assert message["ev"] == "keepalive", message
        assert "result" in message, message
        results[op] = message["result"]
    assert results["ping"] == {}
    assert results["hello"]["sandbox"]["id"] == sid and results["sandbox.info"]["execs_running"] == 1
    # Other requests still wait for the exec to end (docs/architecture.md: busy, not queued).
    await ws.send_json({"id": 9, "op": "fs.stat", "path": "."})
    while (message := await _receive(ws)).get("id") != 9:
        pass
    assert message["error"]["code"] == "busy"


async def test_metrics_while_a_one_at_a_time_agent_runs_an_exec_has_host_figures_and_null_guest(
    gateway: TestClient[Any, Any],
) -> None:
    sid = await _create(gateway)
    ws = await _ws(gateway, sid)
    await ws.send_json({"id": 1, "op": "exec.start", "language": "python",
                        "code": "import time\nprint('running', flush=True)\nwhile True:\n    time.sleep(0.01)"})
    assert (await _receive(ws))["ev"] == "start"
    assert (await _receive(ws))["ev"] == "data"
    resp = await gateway.get(f"/v1/sandboxes/{sid}/metrics", headers=AUTH)
    metrics = await resp.json()
    assert resp.status == 200 and metrics["guest"] is None and metrics["host"]["rss_bytes"] > 0, metrics


async def test_client_hello_refuses_a_protocol_version_it_does_not_speak(gateway: TestClient[Any, Any]) -> None:
    ws = await _ws(gateway, await _create(gateway))
    await ws.send_json({"id": 1, "op": "hello", "version": 99})
    error = (await _receive(ws))["error"]
    assert error["code"] == "unsupported" and "99" in error["message"]


async def test_shutdown_finishes_with_a_stalled_client_on_a_live_sandbox(
    gateway: TestClient[Any, Any], stalled: Any
) -> None:
    sid = await _create(gateway)
    await _start_flood_with_viewer(gateway, stalled, sid)
    async with asyncio.timeout(DEADLINE):
        await gateway.close()
