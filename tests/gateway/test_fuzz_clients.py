"""Fuzzing the client legs (issue 9) with Hypothesis: random client messages (JSON and msgpack) into a
live WebSocket, random bodies into every REST route, of a real `sandgate serve` process on the real
WASM runtime.

What must hold for every example: a reply (a deadline per message turns a hang into a failure), and
that reply is a result, a stream that ends, or an error whose code is in the error table and is not
`internal` (a crash); REST never answers 500; the session still answers a ping afterwards; and the
gateway's log shows no traceback at the end.

Hypothesis profiles (`SANDGATE_FUZZ_PROFILE`): `ci` (the default) is deterministic, `derandomize=True`
with no example database, so every run tries the same examples; `deep` is random with ten times the
examples, for a longer hunt by hand.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import urllib.parse
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import ClientConnection, connect

from gateway.protocol.client import JSON, MSGPACK
from guest_agent import schema
from guest_agent.wire import ERRORS, MAX_REQUEST_ID
from tests.serving import Served, serve

pytestmark = [pytest.mark.wasm, pytest.mark.slow, pytest.mark.usefixtures("wasm_compiled")]

KEY = "fuzz-clients-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: Seconds for any one reply; the gateway answers in milliseconds (an exec in well under a second).
DEADLINE = 20.0
PING_ID = MAX_REQUEST_ID - 1

settings.register_profile("ci", derandomize=True, database=None, max_examples=120, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("deep", parent=settings.get_profile("ci"), derandomize=False, max_examples=1200)
FUZZ = settings(settings.get_profile(os.environ.get("SANDGATE_FUZZ_PROFILE", "ci")))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    config = tmp_path_factory.mktemp("fuzz") / "sandgate.toml"
    # Few sandboxes per tenant: a fuzzed create body of {} is valid, and each would start an agent.
    config.write_text(f'api_keys = "{KEY}:tenant"\ndefault_runtime = "wasm"\n'
                      '[quotas]\nmax_sandboxes = 3\n[runtimes.wasm]\npool_size = 1\n')
    env = {**os.environ, "SANDGATE_BLOCKED_PLUGINS": "microvm,pod", "SANDGATE_API_KEYS": ""}
    with serve(env, "--config", str(config)) as served:
        yield served
        log = "".join(served.output)
    assert "Traceback" not in log and "never retrieved" not in log, log[-5000:]


@pytest.fixture(scope="module")
def sandbox(gateway: Served) -> str:
    return str(gateway.call(KEY, "POST", "/v1/sandboxes", {})["id"])


# -- strategies ----------------------------------------------------------------------------------

#: Text with what decoders trip on: lone surrogates, controls, NUL, non-BMP characters.
TEXT = st.one_of(st.sampled_from(["\ud800", "a\udfffb", "\x00", "\U0001f600", "é" * 130, "SIGINT\udc00"]),
                 st.text(st.characters(codec=None, categories=["L", "N", "P", "S", "Zs", "Cc", "Cs"]), max_size=24))
PATHS = st.sampled_from(["a.txt", "dir/b.bin", "/work/c", "", ".", "..", "../x", "/etc/passwd", "dir/", "a//b",
                         "x" * 300, "a\0b", "nul\x7f"])
CODE = st.sampled_from(["print(1)", "1/0", "import sys; sys.exit(3)", "print(input())", "import os; os.listdir('.')"])
HOSTILE_NUMBERS = st.one_of(st.integers(min_value=-(2**80), max_value=2**80),
                            st.sampled_from([-1, 0, 2**31, 2**63, 2**64, -(2**63) - 1]),
                            st.floats(allow_nan=True, allow_infinity=True))
JSONISH = st.recursive(st.none() | st.booleans() | HOSTILE_NUMBERS | TEXT,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                       max_leaves=12)


def _typed(f: schema.Field) -> st.SearchStrategy[Any]:
    """Values of the field's own types, near its bounds."""
    choices: list[st.SearchStrategy[Any]] = []
    for kind in f.kinds:
        if kind is str:
            choices.append(PATHS if f.name in ("path", "src", "dst", "cwd") else CODE if f.name == "code" else TEXT)
        elif kind is int:
            choices.append(st.integers(min_value=-2, max_value=70000))
        elif kind is float:
            choices.append(st.floats(min_value=-1, max_value=5))
        elif kind is bool:
            choices.append(st.booleans())
        elif kind is bytes:
            choices.append(st.binary(max_size=64))
        elif kind is list:
            choices.append(st.lists(TEXT, max_size=3))
        elif kind is dict:
            choices.append(st.dictionaries(TEXT, TEXT | HOSTILE_NUMBERS, max_size=3))
    return st.one_of(choices)


HOSTILE = st.one_of(HOSTILE_NUMBERS, TEXT, JSONISH, st.binary(max_size=16))


@st.composite
def client_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A request of a client-leg op (sandbox.destroy left out: the session must outlive the example)
    with its fields of their own types, then at most one mutation: a field of any type or value, a
    junk op or id, or unknown fields. Mostly-valid messages reach past the first check, where the
    bugs that lose replies live."""
    ops = [op for op in schema.OPS.values() if op.leg != schema.AGENT and op.name != "sandbox.destroy"]
    op = draw(st.sampled_from(ops))
    message: dict[str, Any] = {"id": draw(st.integers(min_value=1, max_value=1000)), "op": op.name}
    for f in op.fields:
        if f.required or draw(st.booleans()):
            message[f.name] = draw(_typed(f))
    mutation = draw(st.sampled_from(["field", "field", "none", "op", "id", "extra"]))
    if mutation == "field" and op.fields:
        message[draw(st.sampled_from([f.name for f in op.fields]))] = draw(HOSTILE)
    elif mutation == "op":
        message["op"] = draw(st.sampled_from([op.name.upper(), "guest.setup", None, 7]) | TEXT)
    elif mutation == "id":
        message["id"] = draw(st.sampled_from([None, -1, 0, 2**31, True, "1", 2**70, 1.5]))
    elif mutation == "extra":
        message.update(draw(st.dictionaries(TEXT, HOSTILE, min_size=1, max_size=3)))
    return message


def _id_of(message: Any) -> int | None:
    rid = message.get("id") if isinstance(message, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < MAX_REQUEST_ID else None


def _json_payload(message: dict[str, Any]) -> str:
    message = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in message.items()}
    return json.dumps(message)


def _msgpack_payload(message: dict[str, Any]) -> bytes:
    # Lone surrogates go out as their (invalid) UTF-8 bytes; integers past msgpack's range cannot.
    def fit(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return max(-(2**63), min(value, 2**64 - 1))
        if isinstance(value, list):
            return [fit(v) for v in value]
        if isinstance(value, dict):
            return {fit(k): fit(v) for k, v in value.items()}
        return value

    packed: bytes = msgpack.packb(fit(message), unicode_errors="surrogatepass")
    return packed


# -- the WebSocket leg ---------------------------------------------------------------------------

def _session(gateway: Served, sandbox: str, subprotocol: str) -> ClientConnection:
    return connect(f"ws://127.0.0.1:{gateway.port}/v1/sandboxes/{sandbox}/ws", additional_headers=AUTH,
                   subprotocols=[subprotocol], open_timeout=DEADLINE, max_size=None)  # type: ignore[list-item]


def _receive(ws: ClientConnection, binary: bool) -> dict[str, Any]:
    raw = ws.recv(timeout=DEADLINE)
    message = msgpack.unpackb(raw) if binary else json.loads(raw)
    assert isinstance(message, dict), message
    error = message.get("error")
    if error is not None:
        assert error["code"] in ERRORS and error["code"] != "internal", message
        assert isinstance(error["message"], str) and "Traceback" not in error["message"], message
    return message


def _answer(ws: ClientConnection, binary: bool, request_id: int | None) -> dict[str, Any]:
    """Read up to the message that ends the request: its result, its error, or its stream's end (an
    error for a message whose id could not be read comes with id null)."""
    while True:
        message = _receive(ws, binary)
        if message.get("id") not in (request_id, None):
            continue
        if "result" in message or "error" in message or message.get("ev") == "end":
            return message


def _exchange(gateway: Served, sandbox: str, subprotocol: str, payload: str | bytes, request_id: int | None) -> None:
    binary = subprotocol == MSGPACK
    with _session(gateway, sandbox, subprotocol) as ws:
        ws.send(payload)
        _answer(ws, binary, request_id)
        ping = {"id": PING_ID, "op": "ping"}
        ws.send(msgpack.packb(ping) if binary else json.dumps(ping))
        assert _answer(ws, binary, PING_ID).get("result") == {}, "the session answers a ping afterwards"


@FUZZ
@given(message=client_messages())
def test_fuzzed_json_messages_are_answered(gateway: Served, sandbox: str, message: dict[str, Any]) -> None:
    _exchange(gateway, sandbox, JSON, _json_payload(message), _id_of(message))


@FUZZ
@given(message=client_messages())
def test_fuzzed_msgpack_messages_are_answered(gateway: Served, sandbox: str, message: dict[str, Any]) -> None:
    _exchange(gateway, sandbox, MSGPACK, _msgpack_payload(message), _id_of(message))


@FUZZ
@given(payload=st.one_of(st.text(max_size=64), JSONISH.map(json.dumps),
                         st.integers(1, 3000).map(lambda n: "[" * n), st.integers(1, 3000).map(lambda n: '{"a":' * n)))
def test_fuzzed_json_text_is_answered(gateway: Served, sandbox: str, payload: str) -> None:
    _exchange(gateway, sandbox, JSON, payload, None)


@FUZZ
@given(payload=st.one_of(st.binary(max_size=64), JSONISH.map(lambda v: _msgpack_payload({"v": v})),
                         st.integers(1, 3000).map(lambda n: b"\x91" * n + b"\xc0")))
def test_fuzzed_msgpack_bytes_are_answered(gateway: Served, sandbox: str, payload: bytes) -> None:
    _exchange(gateway, sandbox, MSGPACK, payload, None)


# -- the REST leg --------------------------------------------------------------------------------

ROUTES = [("POST", "/v1/sandboxes"), ("GET", "/v1/sandboxes"), ("GET", "/v1/runtimes"), ("GET", "/healthz"),
          ("GET", "/v1/protocol"), ("GET", "/v1/sandboxes/{sid}"), ("GET", "/v1/sandboxes/{sid}/metrics"),
          ("POST", "/v1/sandboxes/{sid}/exec"), ("PUT", "/v1/sandboxes/{sid}/files/{path}"),
          ("GET", "/v1/sandboxes/{sid}/files/{path}"), ("DELETE", "/v1/sandboxes/{other}"),
          ("GET", "/v1/sandboxes/{sid}/ws"), ("PATCH", "/v1/sandboxes/{sid}")]
EXEC_FIELDS = [f.name for f in schema.OPS["exec.start"].fields]
BODIES = st.one_of(
    st.dictionaries(st.sampled_from([*EXEC_FIELDS, "runtime", "memory_mb", "ttl", "metadata", "template"]) | TEXT,
                    JSONISH | CODE, max_size=5).map(lambda d: json.dumps(d).encode()),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
    st.integers(1, 3000).map(lambda n: b"[" * n),
)
URL_PATHS = st.one_of(PATHS, TEXT).map(lambda p: urllib.parse.quote(p.encode("utf-8", "surrogatepass"), safe="/"))


@FUZZ
@given(route=st.sampled_from(ROUTES), body=BODIES, path=URL_PATHS,
       other=st.sampled_from(["sb_madeup", "sb_", "x", "%00", "sb_" + "a" * 200]))
def test_fuzzed_rest_requests_never_answer_500(gateway: Served, sandbox: str, route: tuple[str, str], body: bytes,
                                               path: str, other: str) -> None:
    method, template = route
    target = template.format(sid=sandbox, path=path or "x", other=other)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=DEADLINE)
    try:
        conn.request(method, target, body=body, headers={**AUTH, "Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    assert resp.status != 500 and resp.status < 600, (resp.status, raw[:500])
    if resp.status >= 400:
        error = json.loads(raw)["error"]
        assert error["code"] in ERRORS and error["code"] != "internal", error
        assert ERRORS[error["code"]].http_status == resp.status or resp.status in (404, 405), (resp.status, error)
        assert "\n" not in error["message"] and "Traceback" not in error["message"], error


def test_profiles_are_deterministic_in_ci() -> None:
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None
