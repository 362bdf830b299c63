"""Hostile client input (issue 9): every malformed message or body gets an error reply with a code
from the error table, never a 500, a hang or a dead worker, and the session keeps working after it.

Everything runs through a real gateway (pytest-aiohttp) on the real WASM runtime, with real
WebSocket and HTTP clients. A hang turns into a failure at DEADLINE.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from gateway.config import ConfigError, Settings
from gateway.protocol.client import JSON, MSGPACK
from gateway.web.app import SETTINGS, create_app
from gateway.web.connections import make_runner
from guest_agent.wire import ERRORS

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

KEY = "hostile-clients-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED = "https://ide.example.com"
#: Turns a missing reply into a failure; a reply comes within milliseconds.
DEADLINE = 30.0
#: 100k levels of nesting: far past any recursion limit.
DEEP = 100_000


@pytest.fixture
async def gateway(aiohttp_client: Any) -> TestClient[Any, Any]:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("microvm", "pod"), default_runtime="wasm",
                        allowed_origins=(ALLOWED,), reap_interval_s=3600.0, runtimes={"wasm": {"pool_size": 1}})
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


@pytest.fixture
async def sandbox(gateway: TestClient[Any, Any]) -> str:
    resp = await gateway.post("/v1/sandboxes", json={}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


class Session:
    """A real WebSocket client speaking one subprotocol, with a deadline on every reply."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.binary = ws.protocol == MSGPACK

    async def send_raw(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            await self.ws.send_bytes(payload)
        else:
            await self.ws.send_str(payload)

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(msgpack.packb(message) if self.binary else json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        async with asyncio.timeout(DEADLINE):
            msg = await self.ws.receive()
        assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), (msg.type, msg.data, msg.extra)
        decoded = msgpack.unpackb(msg.data) if self.binary else json.loads(msg.data)
        assert isinstance(decoded, dict)
        return decoded

    async def reply_to(self, request_id: int | None) -> dict[str, Any]:
        """The next message for `request_id` (skipping nothing: these tests run one thing at a time)."""
        message = await self.receive()
        assert message.get("id") == request_id, message
        return message

    async def error_of(self, request_id: int | None) -> str:
        reply = await self.reply_to(request_id)
        assert "error" in reply and "ev" not in reply, reply  # an error reply, not a stream's end
        error = reply["error"]
        assert error["code"] in ERRORS and error["code"] != "internal", error
        assert "Traceback" not in error["message"] and "\n" not in error["message"], error
        return str(error["code"])

    async def still_answers(self, request_id: int = 900) -> None:
        await self.send({"id": request_id, "op": "ping"})
        assert (await self.reply_to(request_id))["result"] == {}


async def _session(gateway: TestClient[Any, Any], sid: str, subprotocol: str = JSON) -> Session:
    ws = await gateway.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH, protocols=(subprotocol,))
    assert ws.protocol == subprotocol
    return Session(ws)


# -- item 1: malformed WebSocket messages ----------------------------------------------------------

# JSON text that Python's json module decodes into values the rest of the gateway cannot carry: a lone
# surrogate (not encodable as UTF-8, so not as msgpack either), integers past msgpack's 64 bits,
# floats JSON has no spelling for.
JSON_ATTACKS = {
    "lone surrogate in a path": '{"id": 1, "op": "fs.stat", "path": "a\\ud800b"}',
    "lone surrogate in fs.read": '{"id": 1, "op": "fs.read", "path": "\\udfff"}',
    "lone surrogate in a tag": '{"id": 1, "op": "exec.input", "tag": "\\ud800", "data": "eA=="}',
    "lone surrogate in code": '{"id": 1, "op": "exec.start", "code": "print(1)\\udc00"}',
    "lone surrogate in an env key": '{"id": 1, "op": "exec.start", "code": "1", "env": {"\\ud800": "x"}}',
    "2**70 as offset": f'{{"id": 1, "op": "fs.read", "path": "x", "offset": {2**70}}}',
    "2**70 as length": f'{{"id": 1, "op": "fs.read", "path": "x", "length": {2**70}}}',
    "2**70 as from_seq": f'{{"id": 1, "op": "exec.attach", "tag": "t", "from_seq": {2**70}}}',
    "2**70 as hello version": f'{{"id": 1, "op": "hello", "version": {2**70}}}',
    "NaN timeout": '{"id": 1, "op": "exec.start", "code": "1", "timeout": NaN}',
    "Infinity timeout": '{"id": 1, "op": "exec.start", "code": "1", "timeout": Infinity}',
    "1e999 timeout": '{"id": 1, "op": "exec.start", "code": "1", "timeout": 1e999}',
    "non-ASCII base64 (found by the fuzzer)": '{"id": 1, "op": "fs.write", "path": "x", "data": "\u00e9"}',
    "signal as a list": '{"id": 1, "op": "exec.signal", "tag": "t", "signal": [1]}',
    "lone surrogate in a signal name": '{"id": 1, "op": "exec.signal", "tag": "t", "signal": "SIG\\ud800"}',
    "signal as a map": '{"id": 1, "op": "exec.signal", "tag": "t", "signal": {"a": 1}}',
    "deep list": "[" * DEEP,
    "deep object": '{"a":' * DEEP,
    "deep list in a field": '{"id": 1, "op": "ping", "x": ' + "[" * DEEP + "]" * DEEP + "}",
}


@pytest.mark.parametrize("attack", JSON_ATTACKS, ids=list(JSON_ATTACKS))
async def test_each_malformed_json_message_gets_an_error_reply(
    gateway: TestClient[Any, Any], sandbox: str, attack: str
) -> None:
    session = await _session(gateway, sandbox)
    await session.send_raw(JSON_ATTACKS[attack])
    reply = await session.receive()
    assert "error" in reply and "ev" not in reply, reply
    assert reply["error"]["code"] in ("bad_request", "bad_frame"), reply
    await session.still_answers()


MSGPACK_ATTACKS = {
    "deep arrays": b"\x91" * DEEP + b"\xc0",
    "deep maps": b"\x81\xa1k" * DEEP + b"\xc0",
    "deep array in a field": b"\x83\xa2id\x01\xa2op\xa4ping\xa1x" + b"\x91" * DEEP + b"\xc0",
    "2**64 - 1 as offset": msgpack.packb({"id": 1, "op": "fs.read", "path": "x", "offset": 2**64 - 1}),
    "invalid UTF-8 in a path": b"\x83\xa2id\x01\xa2op\xa7fs.stat\xa4path\xa2\xed\xa0",
    "signal as a list": msgpack.packb({"id": 1, "op": "exec.signal", "tag": "t", "signal": [1]}),
    "bin where a str goes": msgpack.packb({"id": 1, "op": "fs.stat", "path": b"x"}),
    "an ext type": msgpack.packb({"id": 1, "op": "fs.stat", "path": msgpack.ExtType(5, b"x")}),
}


@pytest.mark.parametrize("attack", MSGPACK_ATTACKS, ids=list(MSGPACK_ATTACKS))
async def test_each_malformed_msgpack_message_gets_an_error_reply(
    gateway: TestClient[Any, Any], sandbox: str, attack: str
) -> None:
    session = await _session(gateway, sandbox, MSGPACK)
    await session.send_raw(MSGPACK_ATTACKS[attack])
    reply = await session.receive()
    assert "error" in reply, reply
    assert reply["error"]["code"] in ("bad_request", "bad_frame"), reply
    await session.still_answers()


async def test_bad_controls_leave_the_control_worker_alive(gateway: TestClient[Any, Any], sandbox: str) -> None:
    """Signals and input go through one ordered worker per session: a bad one must not end it."""
    session = await _session(gateway, sandbox)
    await session.send({"id": 1, "op": "exec.start", "tag": "cat", "code": "import sys\nprint(sys.stdin.readline())",
                        "stdin_open": True})
    assert (await session.reply_to(1))["ev"] == "start"
    attacks = (
        '"op": "exec.signal", "tag": "cat", "signal": [1]',
        '"op": "exec.signal", "tag": "cat", "signal": "SIGINT\\udfff"',
        f'"op": "exec.signal", "tag": "cat", "signal": {2**70}',
        '"op": "exec.signal", "tag": "\\ud800", "signal": 2',
        '"op": "exec.input", "tag": "cat", "data": "not base64!"',
        '"op": "exec.input", "exec_id": "\\udc00", "data": "eA=="',
        f'"op": "exec.resize", "tag": "cat", "rows": {2**70}, "cols": 1',
    )
    for request_id, fields in enumerate(attacks, start=10):
        await session.send_raw(f'{{"id": {request_id}, {fields}}}')
        assert await session.error_of(request_id) == "bad_request"
    await session.send({"id": 20, "op": "exec.input", "tag": "cat", "data": base64_of(b"still here\n")})
    events = []
    while True:
        message = await session.receive()
        events.append(message)
        if message.get("id") == 1 and message.get("ev") == "end":
            break
    assert {"id": 20, "result": {}} in events, events
    output = b"".join(base64_decode(m["data"]) for m in events if m.get("ev") == "data")
    assert output == b"still here\n\n", events


def base64_of(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def base64_decode(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


# -- item 2: hostile REST bodies ------------------------------------------------------------------

REST_ATTACKS = {
    "deep list": "[" * DEEP,
    "deep object": '{"a":' * DEEP,
    "deep field": '{"code": "1", "env": ' + "[" * DEEP + "]" * DEEP + "}",
    "lone surrogate in code": '{"code": "print(1)\\ud800"}',
    "lone surrogate in an env key": '{"code": "1", "env": {"\\ud800": "x"}}',
    "lone surrogate in an env value": '{"code": "1", "env": {"A": "\\udfff"}}',
    "lone surrogate in cwd": '{"code": "1", "cwd": "\\ud800"}',
    "lone surrogate in namespace": '{"code": "1", "namespace": "n\\ud800"}',
    "lone surrogate in stdin": '{"code": "1", "stdin": "\\ud800"}',
    "lone surrogate in a command": '{"command": ["echo", "\\ud800"]}',
    "NaN timeout": '{"code": "1", "timeout": NaN}',
    "2**70 timeout": f'{{"code": "1", "timeout": {2**70}}}',
    "not UTF-8": b'{"code": "\xff"}',
}


def _check_error_body(status: int, body: bytes) -> str:
    assert 400 <= status < 500, (status, body)
    assert b"Traceback" not in body, body
    error = json.loads(body)["error"]
    assert error["code"] in ERRORS and ERRORS[error["code"]].http_status == status, error
    assert error["message"] and "\n" not in error["message"], error
    return str(error["code"])


@pytest.mark.parametrize("attack", REST_ATTACKS, ids=list(REST_ATTACKS))
async def test_each_hostile_exec_body_is_a_4xx(gateway: TestClient[Any, Any], sandbox: str, attack: str) -> None:
    body = REST_ATTACKS[attack]
    resp = await gateway.post(f"/v1/sandboxes/{sandbox}/exec", data=body, headers=AUTH)
    assert _check_error_body(resp.status, await resp.read()) == "bad_request"
    resp = await gateway.post(f"/v1/sandboxes/{sandbox}/exec", json={"code": "print(6 * 7)"}, headers=AUTH)
    assert resp.status == 200 and (await resp.json())["stdout"] == "42\n"


@pytest.mark.parametrize("attack", ["deep list", "deep object", "lone surrogate in code", "NaN timeout"])
async def test_each_hostile_create_body_is_a_4xx(gateway: TestClient[Any, Any], attack: str) -> None:
    body = REST_ATTACKS[attack].replace('"code": "1", ', "").replace('"code"', '"runtime"')
    resp = await gateway.post("/v1/sandboxes", data=body, headers=AUTH)
    assert _check_error_body(resp.status, await resp.read()) == "bad_request"


@pytest.mark.parametrize("path", ["x" * 256, "dir/" + "y" * 300])
async def test_hostile_file_names_are_a_4xx(gateway: TestClient[Any, Any], sandbox: str, path: str) -> None:
    for method in ("PUT", "GET"):
        resp = await gateway.request(method, f"/v1/sandboxes/{sandbox}/files/{path}", data=b"x", headers=AUTH)
        assert _check_error_body(resp.status, await resp.read()) == "bad_request", (method, path)
    resp = await gateway.put(f"/v1/sandboxes/{sandbox}/files/ok.txt", data=b"fine", headers=AUTH)
    assert resp.status == 201, await resp.text()


async def test_upload_to_a_directory_path_is_a_4xx(gateway: TestClient[Any, Any], sandbox: str) -> None:
    resp = await gateway.put(f"/v1/sandboxes/{sandbox}/files/dir/", data=b"x", headers=AUTH)
    assert _check_error_body(resp.status, await resp.read()) == "bad_request"


async def test_the_longest_legal_file_name_uploads(gateway: TestClient[Any, Any], sandbox: str) -> None:
    """255 bytes is a legal name: the upload's temporary name must not push it past the limit."""
    name = "é" * 127 + "z"  # 255 bytes of UTF-8
    resp = await gateway.put(f"/v1/sandboxes/{sandbox}/files/d/{name}", data=b"long", headers=AUTH)
    assert resp.status == 201, await resp.text()
    resp = await gateway.get(f"/v1/sandboxes/{sandbox}/files/d/{name}", headers=AUTH)
    assert resp.status == 200 and await resp.read() == b"long"


# -- item 4: an exec that never started -----------------------------------------------------------

@pytest.mark.parametrize(("body", "code"), [
    ({"code": "print(1)", "cwd": "no/such/dir"}, "not_found"),
    ({"code": "print(1)", "cwd": "a\0b"}, "bad_request"),
])
async def test_rest_exec_that_never_started_is_a_4xx(
    gateway: TestClient[Any, Any], sandbox: str, body: dict[str, Any], code: str
) -> None:
    resp = await gateway.post(f"/v1/sandboxes/{sandbox}/exec", json=body, headers=AUTH)
    assert _check_error_body(resp.status, await resp.read()) == code


async def test_ws_exec_that_never_started_answers_an_error(gateway: TestClient[Any, Any], sandbox: str) -> None:
    session = await _session(gateway, sandbox)
    await session.send({"id": 1, "op": "exec.start", "code": "print(1)", "cwd": "no/such/dir"})
    assert await session.error_of(1) == "not_found"
    await session.send({"id": 2, "op": "exec.start", "code": "print(1)", "cwd": "a\0b"})
    assert await session.error_of(2) == "bad_request"
    await session.send({"id": 3, "op": "exec.start", "code": "print(1)"})
    assert (await session.reply_to(3))["ev"] == "start"


# -- item 5: the Origin check ---------------------------------------------------------------------

async def test_origin_must_match_the_gateways_own_scheme_too(gateway: TestClient[Any, Any], sandbox: str) -> None:
    url = f"/v1/sandboxes/{sandbox}/ws"
    own = f"{gateway.server.host}:{gateway.server.port}"
    for origin in (f"https://{own}", f"ws://{own}", f"wss://{own}", f"file://{own}", f"http://{own}.evil.net",
                   "null", f"http://user@{own}"):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await gateway.ws_connect(url, headers={**AUTH, "Origin": origin})
        assert refused.value.status == 403, origin
    for origin in (f"http://{own}", ALLOWED):
        ws = await gateway.ws_connect(url, headers={**AUTH, "Origin": origin})
        await ws.close()


# -- item 3: connections that never finish their head; one address holding many -----------------

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"


class GuardedTestServer(TestServer):
    """The gateway served as `sandgate serve` serves it: through the connection guard."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return make_runner(self.app, self.app[SETTINGS], **kwargs)


async def _guarded(aiohttp_client: Any, **settings: Any) -> TestClient[Any, Any]:
    app = create_app(Settings(api_keys={KEY: "tenant"}, blocked_plugins=("microvm", "pod"), default_runtime="wasm",
                              reap_interval_s=3600.0, runtimes={"wasm": {"pool_size": 1}}, **settings))
    return await aiohttp_client(GuardedTestServer(app))  # type: ignore[no-any-return]


async def _connect(client: TestClient[Any, Any], source: str = "127.0.0.1") -> tuple[asyncio.StreamReader,
                                                                                       asyncio.StreamWriter]:
    return await asyncio.open_connection(client.server.host, client.server.port, local_addr=(source, 0))


async def _closed_by_gateway(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sent until it closed the connection (a hang fails at DEADLINE)."""
    async with asyncio.timeout(DEADLINE):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def test_connections_that_never_finish_their_head_are_closed(aiohttp_client: Any) -> None:
    client = await _guarded(aiohttp_client, http_header_timeout_s=0.5)
    partial = []
    for i in range(200):
        reader, writer = await _connect(client)
        if i % 2:  # half send part of a head, half nothing at all
            writer.write(b"GET /v1/sandboxes HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        partial.append((reader, writer))
    # A client that sends its head in time is served, on a connection opened after all of them.
    reader, writer = await _connect(client)
    writer.write(HEALTHZ)
    assert (await reader.readline()).startswith(b"HTTP/1.1 200"), "a prompt client is served"
    closed = await asyncio.gather(*(_closed_by_gateway(r) for r, _ in partial))
    assert closed == [b""] * 200, "closed without an answer"
    for _, w in (*partial, (reader, writer)):
        w.close()


async def test_an_idle_keep_alive_connection_is_closed(aiohttp_client: Any) -> None:
    client = await _guarded(aiohttp_client, http_idle_timeout_s=0.5)
    reader, writer = await _connect(client)
    writer.write(HEALTHZ)
    answer = await _closed_by_gateway(reader)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"}"), answer
    writer.close()


async def test_one_address_past_its_bound_is_refused_and_others_get_through(aiohttp_client: Any) -> None:
    client = await _guarded(aiohttp_client, max_connections_per_address=3)
    held = [await _connect(client) for _ in range(3)]
    reader, writer = await _connect(client)
    writer.write(HEALTHZ)
    assert await _closed_by_gateway(reader) == b"", "the fourth connection from one address is closed at accept"
    writer.close()
    # Another address is not affected (the loopback range is 127/8: 127.0.0.2 is this machine too).
    reader, writer = await _connect(client, source="127.0.0.2")
    writer.write(HEALTHZ)
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    # A connection the gateway closes frees its place (the gateway drops its count before the FIN).
    reader, writer = held.pop()
    writer.write(HEALTHZ.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert (await _closed_by_gateway(reader)).startswith(b"HTTP/1.1 200")
    writer.close()
    reader, writer = await _connect(client)
    writer.write(HEALTHZ)
    assert (await reader.readline()).startswith(b"HTTP/1.1 200"), "the freed place is taken"
    for _, w in (*held, (reader, writer)):
        w.close()


@pytest.mark.parametrize("bad", [{"http_header_timeout_s": 0}, {"http_idle_timeout_s": -1.0},
                                 {"max_connections_per_address": -1}, {"http_header_timeout_s": "10"}])
def test_connection_settings_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Settings(**bad)


async def test_a_refused_request_of_a_client_that_left_ends_quietly(
    gateway: TestClient[Any, Any], sandbox: str
) -> None:
    """The error reply to a client whose connection is already closing must not escape the request's
    task ("Task exception was never retrieved"); bench/soak.py met it when hostile tenants left."""
    from gateway.web.app import SESSIONS
    from guest_agent import schema

    client = await _session(gateway, sandbox)
    await client.still_answers()
    (server_session,) = gateway.app[SESSIONS]
    transport = server_session.ws._req.transport  # type: ignore[attr-defined]
    transport.close()  # the client's connection is going away
    refused = schema.parse({"id": 7, "op": "exec.signal", "tag": "none", "signal": "SIGKILL"}, schema.CLIENT)
    async with asyncio.timeout(DEADLINE):
        await server_session.run(refused)  # not_found, and no way left to say so: returns quietly


@pytest.mark.parametrize(("code", "refused"), [("not_found", True), ("bad_request", True), ("guest_died", False),
                                               ("timeout", False), ("guest_protocol", False)])
def test_only_the_agents_refusal_counts_as_never_started(code: str, refused: bool) -> None:
    """An end before any start is a refusal only when the agent refused; an agent killed by its own
    exec dies before reporting the start, and that exec did run (the pod runtime's test met it)."""
    from gateway.sessions.execs import refused_before_start

    assert refused_before_start({"ev": "end", "error": {"code": code, "message": "m"}}) is refused
    assert refused_before_start({"ev": "end", "exit_code": 0}) is False
