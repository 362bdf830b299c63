"""The gateway's own rules over real HTTP and WebSocket: auth, Origin, bad input, quotas, shutdown.

The sandboxes here run the real guest agent as a host process (the example runtime); the WASM
runtime has its own tests in tests/plugins/wasm.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
from typing import Any

import aiohttp
import pytest
import sandgate_example_runtime
from aiohttp.test_utils import TestClient

from gateway.config import Limits, Quotas, Settings
from gateway.protocol.client import JSON, MSGPACK, bearer_subprotocol
from gateway.web.app import MANAGER, create_app

KEY = "web-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient[Any, Any]:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("wasm", "microvm"), default_runtime="example-local",
                        allowed_origins=("https://ide.example.com",),
                        quotas=Quotas(max_sandboxes=2, creates_per_minute=100), limits=Limits(),
                        reap_interval_s=3600.0)
    return await aiohttp_client(create_app(settings, plugins=[sandgate_example_runtime]))  # type: ignore[no-any-return]


async def _create(client: TestClient[Any, Any]) -> str:
    resp = await client.post("/v1/sandboxes", json={}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def _error(resp: aiohttp.ClientResponse) -> str:
    return str((await resp.json())["error"]["code"])


async def test_healthz_needs_no_key(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200 and (await resp.json())["status"] == "ok"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}])
async def test_unauthorized(client: TestClient[Any, Any], headers: dict[str, str]) -> None:
    resp = await client.get("/v1/sandboxes", headers=headers)
    assert resp.status == 401 and await _error(resp) == "unauthorized"


async def test_malformed_bodies_answer_400(client: TestClient[Any, Any]) -> None:
    for body in (b"{nope", b"[1]", b'{"runtime": 5}', b'{"runtime": "nope"}', b'{"ttl": -1}', b'{"memory_mb": "x"}',
                 b'{"metadata": {"k": 1}}', b'{"unknown_option": true}'):
        resp = await client.post("/v1/sandboxes", data=body, headers=AUTH)
        assert resp.status == 400, body
        assert await _error(resp) == "bad_request", body
    sid = await _create(client)
    for body in ({}, {"code": "1", "command": ["x"]}, {"command": []}, {"command": [1]}, {"code": "1", "timeout": 0},
                 {"code": "1", "env": {"A": 1}}, {"code": "1", "language": "cobol"}, {"code": 5}):
        resp = await client.post(f"/v1/sandboxes/{sid}/exec", json=body, headers=AUTH)
        assert resp.status in (400, 501), body
        assert await _error(resp) in ("bad_request", "unsupported"), body


async def test_unknown_route_and_method(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v1/nothing", headers=AUTH)
    assert resp.status == 404 and await _error(resp) == "not_found"
    resp = await client.patch("/v1/sandboxes", headers=AUTH)
    assert resp.status == 405


async def test_quota_answers_429_with_retry_after(client: TestClient[Any, Any]) -> None:
    await _create(client)
    await _create(client)
    resp = await client.post("/v1/sandboxes", json={}, headers=AUTH)
    assert resp.status == 429 and await _error(resp) == "quota_exceeded"
    assert int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["retryable"] is True


async def test_origin_allowlist(client: TestClient[Any, Any]) -> None:
    sid = await _create(client)
    url = f"/v1/sandboxes/{sid}/ws"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(url, headers={**AUTH, "Origin": "https://evil.example.net"})
    assert refused.value.status == 403
    ws = await client.ws_connect(url, headers={**AUTH, "Origin": "https://ide.example.com"})
    await ws.close()
    own = f"http://{client.server.host}:{client.server.port}"
    ws = await client.ws_connect(url, headers={**AUTH, "Origin": own})
    await ws.close()


async def test_browser_bearer_subprotocol(client: TestClient[Any, Any]) -> None:
    sid = await _create(client)
    ws = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", protocols=(bearer_subprotocol(KEY), MSGPACK))
    assert ws.protocol == MSGPACK, "the bearer entry is never selected"
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(f"/v1/sandboxes/{sid}/ws", protocols=(bearer_subprotocol("wrong"), JSON))
    assert refused.value.status == 401


async def test_ws_to_missing_sandbox_is_404_before_upgrade(client: TestClient[Any, Any]) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/sandboxes/sb_nope/ws", headers=AUTH)
    assert refused.value.status == 404


async def test_oversized_client_message_closes_with_1009(client: TestClient[Any, Any]) -> None:
    sid = await _create(client)
    ws = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await ws.send_str(json.dumps({"id": 1, "op": "ping", "pad": "x" * (2 << 20)}))
    msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    resp = await client.get(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 200, "the sandbox outlives a bad client"


async def test_too_many_protocol_errors_close_the_session(client: TestClient[Any, Any]) -> None:
    sid = await _create(client)
    ws = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    for _ in range(100):
        await ws.send_str("garbage")
    codes = []
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            codes.append(json.loads(msg.data)["error"]["code"])
    assert codes == ["bad_frame"] * 100 and ws.close_code == 4400


async def test_exec_controls_and_pty_over_ws(client: TestClient[Any, Any]) -> None:
    sid = await _create(client)
    ws = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await ws.send_json({"id": 1, "op": "exec.start", "command": ["sh"], "pty": {"rows": 10, "cols": 40},
                        "stdin_open": True, "tag": "term"})
    start = await ws.receive_json()
    assert start["ev"] == "start" and start["pid"] > 0
    await ws.send_json({"id": 2, "op": "exec.resize", "tag": "term", "rows": 33, "cols": 77})
    typed = base64.b64encode(b"stty size; exit 7\n").decode()
    await ws.send_json({"id": 3, "op": "exec.input", "tag": "term", "data": typed})
    screen, end = b"", None
    while end is None:
        message = await ws.receive_json()
        if message.get("ev") == "data":
            screen += base64.b64decode(message["data"])
        elif message.get("ev") == "end":
            end = message
    assert b"33 77" in screen and end["exit_code"] == 7


async def test_sigterm_signal_to_a_process(client: TestClient[Any, Any]) -> None:
    sid = await _create(client)
    ws = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await ws.send_json({"id": 1, "op": "exec.start", "command": ["sleep", "600"]})
    start = await ws.receive_json()
    await ws.send_json({"id": 2, "op": "exec.signal", "exec_id": start["exec_id"], "signal": "SIGTERM"})
    messages = [await ws.receive_json(), await ws.receive_json()]
    end = next(m for m in messages if m.get("ev") == "end")
    assert end["signal"] == "SIGTERM" and end["exit_code"] is None


async def test_reattach_reports_exactly_what_fell_out_of_the_replay_buffer(aiohttp_client: Any) -> None:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("wasm", "microvm"), default_runtime="example-local",
                        limits=Limits(replay_bytes=4096), reap_interval_s=3600.0)
    client = await aiohttp_client(create_app(settings, plugins=[sandgate_example_runtime]))
    sid = await _create(client)
    done = await client.post(f"/v1/sandboxes/{sid}/exec", headers=AUTH, json={
        "tag": "noisy", "command": ["sh", "-c", "for i in $(seq 1 5000); do echo line $i; done"]})
    assert (await done.json())["exit_code"] == 0
    ws = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await ws.send_json({"id": 1, "op": "exec.attach", "tag": "noisy", "from_seq": 0})
    reply = await ws.receive_json()
    first_seq, lost = reply["result"]["first_seq"], reply["result"]["lost"]
    assert lost == [0, first_seq - 1] and first_seq > 1
    replayed = []
    while not replayed or replayed[-1]["ev"] != "end":
        replayed.append(await ws.receive_json())
    assert [e["seq"] for e in replayed] == list(range(first_seq, first_seq + len(replayed)))


async def test_quiet_running_stream_gets_keepalives_until_it_ends(aiohttp_client: Any) -> None:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("wasm", "microvm"), default_runtime="example-local",
                        keepalive_s=0.05, reap_interval_s=3600.0)
    client = await aiohttp_client(create_app(settings, plugins=[sandgate_example_runtime]))
    sid = await _create(client)
    ws = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await ws.send_json({"id": 1, "op": "exec.start", "command": ["sh", "-c", "read line; echo $line"],
                        "stdin_open": True})
    start = await ws.receive_json()
    keepalive = await ws.receive_json()  # the exec waits for stdin: silence, so a keepalive comes
    assert keepalive == {"id": 1, "ev": "keepalive", "seq": start["seq"]}
    await ws.send_json({"id": 2, "op": "exec.input", "exec_id": start["exec_id"], "data": "Z28K"})  # "go\n"
    events = []
    while not events or events[-1].get("ev") != "end":
        message = await ws.receive_json()
        if message.get("ev") != "keepalive" and message.get("id") == 1:
            events.append(message)
    assert base64.b64decode(events[0]["data"]) == b"go\n" and events[-1]["exit_code"] == 0


async def test_quiet_reattached_stream_gets_keepalives(aiohttp_client: Any) -> None:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("wasm", "microvm"), default_runtime="example-local",
                        keepalive_s=0.05, reap_interval_s=3600.0)
    client = await aiohttp_client(create_app(settings, plugins=[sandgate_example_runtime]))
    sid = await _create(client)
    first = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await first.send_json({"id": 1, "op": "exec.start", "tag": "quiet", "command": ["sh", "-c", "read line"],
                           "stdin_open": True})
    start = await first.receive_json()
    await first.close()
    second = await client.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await second.send_json({"id": 7, "op": "exec.attach", "tag": "quiet", "from_seq": start["seq"] + 1})
    reply = await second.receive_json()
    assert reply["result"]["lost"] is None
    keepalive = await second.receive_json()  # nothing new to replay, and still the stream is kept alive
    assert keepalive == {"id": 7, "ev": "keepalive", "seq": start["seq"]}
    await second.send_json({"id": 8, "op": "exec.close_stdin", "tag": "quiet"})
    while (message := await second.receive_json()).get("ev") != "end":
        pass
    assert message["id"] == 7 and message["exit_code"] == 1


async def test_download_cut_by_a_dying_guest_is_a_broken_transfer_not_a_short_file(
    client: TestClient[Any, Any],
) -> None:
    sid = await _create(client)
    blob = os.urandom(32 << 20)
    resp = await client.put(f"/v1/sandboxes/{sid}/files/big.bin", data=io.BytesIO(blob), headers=AUTH)
    assert resp.status == 201
    resp = await client.get(f"/v1/sandboxes/{sid}/files/big.bin", headers=AUTH)
    assert resp.status == 200 and resp.content_length == len(blob)
    await resp.content.readexactly(1 << 16)  # the transfer is under way
    backend = client.app[MANAGER].get("tenant", sid).backend
    os.killpg(backend._proc.pid, signal.SIGKILL)
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


async def test_protocol_description_is_served_and_matches_the_js_module(client: TestClient[Any, Any]) -> None:
    from gateway.protocol.client import describe

    resp = await client.get("/v1/protocol")
    served = await resp.json()
    assert resp.status == 200 and served == json.loads(json.dumps(describe()))
    assert served["ops"]["exec.input"]["control"] is True and "guest.setup" in served["ops"]
    js = await client.get("/static/protocol.js")
    assert js.status == 200 and "export const PROTOCOL" in await js.text()
