"""Outbound HTTP from WASM sandboxes (`sandgate.fetch`, urllib), attacked from real guests through a
real gateway: the policy proxy decides (allowlists, raw addresses, names resolving to private
ranges, no network), secrets are filled on the host for their bound host only and never reach the
guest, a policy change applies to a running sandbox, and the door takes hostile input.

"The internet" is the `egress_upstream` fixture (tests/net/upstream.py: servers on 203.0.113.10
and .11 in a network namespace, needs root). The gateway keeps one warm launcher, so creates with
the default limits take it (its network attached at take) and the rest start cold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import subprocess
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Limits, NetworkAccess, Settings
from gateway.egress import forward
from gateway.testing.conformance import AUTH, KEY, Gateway, output
from gateway.web.app import MANAGER, create_app
from plugins.wasm import artifacts, fetch, launcher
from plugins.wasm.agent_dir import stage_agent_dir
from plugins.wasm.guest.sandgate import wire
from tests.net.upstream import ADDRESS, API, LOOPBACK, OTHER, OTHER_ADDRESS, PORT, PRIVATE, TLS_PORT, Upstream

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

SECRET_VALUE = "real-key-7f3a9c"
SECRETS = [{"env": "API_KEY", "value": SECRET_VALUE, "hosts": [API]}]
#: The gateway's response cap for these tests: fetch_max_response_mb.
CAP = 1 << 20

#: Defined in the guest before each test's code: `probe(url, **fetch_args)` is what came of one
#: fetch, as JSON-able data.
PROBE = r"""
import json, os, sandgate

def probe(url, **kwargs):
    try:
        r = sandgate.fetch(url, **kwargs)
        return {"status": r.status, "body": r.text, "headers": dict(r.headers.items())}
    except sandgate.Refused as e:
        return {"refused": e.status, "reason": e.reason}
    except sandgate.FetchError as e:
        return {"error": e.kind, "message": e.message}
"""


@pytest.fixture
def upstream(egress_upstream: Upstream) -> Upstream:
    return egress_upstream


@pytest.fixture
async def gateway(aiohttp_client: Any, upstream: Upstream) -> Gateway:
    assert upstream.ca is not None
    settings = Settings(api_keys={KEY: "tenant-a"}, limits=Limits(exec_timeout_s=60.0), reap_interval_s=3600.0,
                        blocked_plugins=("microvm", "pod"), default_runtime="wasm",
                        network=NetworkAccess(nameservers=(upstream.nameserver,),
                                              upstream_ca_file=str(upstream.ca.ca_file)),
                        runtimes={"wasm": {"pool_size": 1, "fetch_max_response_mb": CAP >> 20}})
    client = await aiohttp_client(create_app(settings))
    return Gateway(client, "wasm", {})


async def run(gateway: Gateway, sandbox_id: str, code: str) -> Any:
    """Run `code` (after PROBE) in the sandbox; what its last line printed, as JSON."""
    done = await gateway.exec(sandbox_id, language="python", code=PROBE + code, timeout=30)
    assert done["exit_code"] == 0, done["stderr"] or done
    return json.loads(done["stdout"].splitlines()[-1])


async def test_the_policy_decides_what_a_fetch_reaches(gateway: Gateway, upstream: Upstream) -> None:
    manager = gateway.client.app[MANAGER]
    runtime = manager.runtimes["wasm"]
    await asyncio.wait_for(runtime.pool.wait_full(), 60)
    pooled = list(runtime.pool.ready)
    sandbox = await gateway.create(network={"allow": [API, PRIVATE, LOOPBACK]})
    sid = sandbox["id"]
    assert manager.get("tenant-a", sid).backend is pooled[0], "a network sandbox takes the warm launcher"
    results = await run(gateway, sid, f"""
print(json.dumps({{
    "http": probe("http://{API}:{PORT}/hello"),
    "https": probe("https://{API}:{TLS_PORT}/hello"),
    "unlisted": probe("http://{OTHER}:{PORT}/hello"),
    "raw": probe("https://{OTHER_ADDRESS}:{TLS_PORT}/hello"),
    "private": probe("http://{PRIVATE}:{PORT}/hello"),
    "loopback": probe("http://{LOOPBACK}:{PORT}/hello"),
    "missing": probe("http://{API}:{PORT}/nothing-here"),
}}))
""")
    assert results["http"]["status"] == 200 and results["http"]["body"] == f"hello from {ADDRESS}\n"
    assert results["https"]["status"] == 200 and results["https"]["body"] == f"hello from {ADDRESS}\n"
    assert results["missing"]["status"] == 404, "an upstream's error status is a response, not a refusal"
    assert results["unlisted"] == {"refused": 403, "reason": f"{OTHER}:{PORT} is not in the allow list"}
    assert results["raw"]["refused"] == 403 and "not in the allow list" in results["raw"]["reason"]
    for name in ("private", "loopback"):
        assert results[name]["refused"] == 403 and "public addresses only" in results[name]["reason"], results
    network = manager.get("tenant-a", sid).spec.egress
    assert network is not None and network.counters.refusals == 4 and network.counters.connections == 3


async def test_secrets_are_filled_on_the_host_for_their_host_only(gateway: Gateway, upstream: Upstream) -> None:
    sandbox = await gateway.create(network={"allow": [API, OTHER]}, secrets=SECRETS, memory_mb=200)  # cold
    sid = sandbox["id"]
    results = await run(gateway, sid, f"""
key = os.environ["API_KEY"]
bound = probe("https://{API}:{TLS_PORT}/echo/a?k=" + key, method="POST",
              headers={{"Authorization": "Bearer " + key}}, json={{"key": key}})
elsewhere = probe("https://{OTHER}:{TLS_PORT}/echo", headers={{"X-Key": key}})
plain = probe("http://{API}:{PORT}/echo", headers={{"X-Key": key}})
open("/work/response.json", "w").write(json.dumps(bound))
print(json.dumps({{"key": key, "env": dict(os.environ), "bound": bound, "elsewhere": elsewhere,
                   "plain": plain}}))
""")
    key = results["key"]
    assert key.startswith("sandgate-secret-") and SECRET_VALUE not in json.dumps(results)
    seen = [r for r in upstream.received() if r["path"].startswith("/echo/a")][-1]
    assert seen["tls"] and seen["headers"]["Authorization"] == f"Bearer {SECRET_VALUE}"
    assert seen["path"] == f"/echo/a?k={SECRET_VALUE}" and json.loads(seen["body"]) == {"key": SECRET_VALUE}
    echoed = json.loads(results["bound"]["body"])  # the upstream echoed it: the guest sees its placeholder
    assert echoed["headers"]["Authorization"] == f"Bearer {key}"
    assert results["elsewhere"]["refused"] == 403 and "bound to" in results["elsewhere"]["reason"]
    assert results["plain"]["refused"] == 403 and "HTTPS only" in results["plain"]["reason"]
    assert not any("X-Key" in r["headers"] for r in upstream.received()), "a refused placeholder was sent"
    files = await gateway.exec(sid, language="python", code=(
        "import os\nfor d, _, fs in os.walk('/work'):\n"
        "    for f in fs: print(open(os.path.join(d, f), errors='replace').read())"))
    assert key in files["stdout"] and SECRET_VALUE not in files["stdout"]
    # An exec stopped in the middle of a fetch restarts the agent (a new launcher): the sandbox keeps
    # its network and its secrets' placeholders.
    stuck = await gateway.exec(sid, language="python", timeout=1,
                               code=f"import sandgate; sandgate.fetch('http://{API}:{PORT}/slow', timeout=60)")
    assert stuck["error"]["code"] == "timeout", stuck
    again = await run(gateway, sid, f"""
print(json.dumps(probe("https://{API}:{TLS_PORT}/echo/b", headers={{"X-Again": os.environ["API_KEY"]}})))
""")
    assert again["status"] == 200 and json.loads(again["body"])["headers"]["X-Again"] == key
    assert [r for r in upstream.received() if r["path"] == "/echo/b"][-1]["headers"]["X-Again"] == SECRET_VALUE
    assert gateway.client.app[MANAGER].get("tenant-a", sid).restarts == 1


async def test_urllib_fetches_through_the_door(gateway: Gateway, upstream: Upstream) -> None:
    sandbox = await gateway.create(network={"allow": [API]})
    results = await run(gateway, sandbox["id"], f"""
import urllib.error, urllib.request
out = {{}}
with urllib.request.urlopen("http://{API}:{PORT}/hello", timeout=10) as r:
    out["http"] = [r.status, r.read().decode(), r.headers["Content-Type"], r.geturl()]
req = urllib.request.Request("https://{API}:{TLS_PORT}/echo/u", data=b"x=1", headers={{"X-Test": "yes"}})
with urllib.request.build_opener().open(req) as r:
    seen = json.loads(r.read())
    out["https"] = [r.status, seen["method"], seen["headers"].get("X-test"), seen["body"]]
with urllib.request.urlopen("https://{API}:{TLS_PORT}/bytes/200000") as r:
    out["lines"] = len(r.read(1000)) + len(r.read())
try:
    urllib.request.urlopen("http://{API}:{PORT}/nothing-here")
except urllib.error.HTTPError as e:
    out["404"] = [e.code, e.read().decode()]
try:
    urllib.request.urlopen("https://{OTHER}:{TLS_PORT}/hello")
except urllib.error.URLError as e:
    out["refused"] = [type(e.reason).__name__, e.reason.status, e.reason.reason]
print(json.dumps(out))
""")
    assert results["http"] == [200, f"hello from {ADDRESS}\n", "text/plain", f"http://{API}:{PORT}/hello"]
    assert results["https"] == [200, "POST", "yes", "x=1"]
    assert results["lines"] == 200000
    assert results["404"] == [404, "no such path\n"]
    assert results["refused"] == ["Refused", 403, f"{OTHER}:{TLS_PORT} is not in the allow list"]


async def test_a_sandbox_without_a_network_reaches_nothing(gateway: Gateway, upstream: Upstream) -> None:
    manager = gateway.client.app[MANAGER]
    await asyncio.wait_for(manager.runtimes["wasm"].pool.wait_full(), 60)
    for body in ({}, {"network": "none", "memory_mb": 200}):  # the warm launcher, and a cold one
        sandbox = await gateway.create(**body)
        before = len(upstream.received())
        results = await run(gateway, sandbox["id"], f"""
import urllib.request
try:
    urllib.request.urlopen("http://{ADDRESS}:{PORT}/echo")
    shim = "reached"
except OSError as e:
    shim = str(e)
print(json.dumps({{"fetch": probe("https://{API}:{TLS_PORT}/echo"), "shim": shim}}))
""")
        assert results["fetch"] == {"refused": 403, "reason": "the sandbox has no network"}, body
        assert "the sandbox has no network" in results["shim"]
        assert len(upstream.received()) == before


async def test_a_policy_change_applies_to_a_running_sandbox(gateway: Gateway, upstream: Upstream) -> None:
    sandbox = await gateway.create(network={"allow": [API]})
    sid = sandbox["id"]
    network = gateway.client.app[MANAGER].get("tenant-a", sid).spec.egress
    assert network is not None
    code = f"print(json.dumps([probe('http://{API}:{PORT}/hello'), probe('http://{OTHER}:{PORT}/hello')]))"
    before = await run(gateway, sid, code)
    assert before[0]["status"] == 200 and before[1]["refused"] == 403
    # A response being read when the policy changes is cut: the guest reads /slow (a byte a second)
    # and says so; the policy changes; its next read fails.
    ws = await gateway.ws(sid)
    request_id = await ws.send("exec.start", language="python", code=PROBE + f"""
r = sandgate.fetch("http://{API}:{PORT}/slow", stream=True, timeout=20)
print("reading", r.read(1), flush=True)
try:
    while r.read(1):
        pass
    print("ended")
except sandgate.FetchError as e:
    print("cut:", e.kind)
""")
    while True:
        event = await ws.receive_for(request_id)
        assert event.get("ev") != "end", event
        if event.get("ev") == "data" and b"reading" in event["data"]:
            break
    patched = await gateway.client.patch(f"/v1/sandboxes/{sid}", json={"network": {"allow": [OTHER]}}, headers=AUTH)
    assert patched.status == 200 and network.counters.refusals == 2  # the cut read counts as a refusal
    assert output(await ws.collect(request_id)) == b"cut: error\n"
    await ws.ws.close()
    after = await run(gateway, sid, code)
    assert after[0]["refused"] == 403 and after[1]["status"] == 200


async def test_the_door_bounds_what_a_guest_asks(gateway: Gateway, upstream: Upstream,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sandbox = await gateway.create(network={"allow": [API]})
    sid = sandbox["id"]
    results = await run(gateway, sid, f"""
import _host, msgpack
from sandgate import wire
out = {{}}
def door(frame):
    return msgpack.unpackb(_host.call(frame))
out["garbage"] = [door(f)["kind"] for f in (b"", b"\\xc1", b"\\x93\\x01\\x02\\x03", msgpack.packb({{"op": "nope"}}),
                                            msgpack.packb({{"op": "open", "url": "http://x/", "method": "GET"}}),
                                            msgpack.packb({{"op": "read", "id": 99, "size": 10}}))]
out["huge"] = door(bytes(wire.MAX_FRAME + 1))["kind"]
out["bad_header"] = door(msgpack.packb({{"op": "open", "method": "GET", "url": "http://{API}:{PORT}/echo",
                                        "headers": [["X", "a\\r\\nInjected: 1"]], "timeout": 5}}))["message"]
held = [sandgate.fetch("http://{API}:{PORT}/slow", stream=True) for _ in range(wire.MAX_OPEN)]
out["one_more"] = probe("http://{API}:{PORT}/hello")
held.pop().close()
out["after_close"] = probe("http://{API}:{PORT}/hello")["status"]
out["capped"] = probe("http://{API}:{PORT}/bytes/{CAP + 1}")
out["at_cap"] = len(sandgate.fetch("http://{API}:{PORT}/bytes/{CAP}").body)
try:
    sandgate.fetch("http://{API}:{PORT}/slow", timeout=0.2).body
except sandgate.FetchTimeout as e:
    out["timeout"] = e.kind
out["open_at_end"] = len(held)
print(json.dumps(out))
""")
    assert results["garbage"] == ["bad_request"] * 6
    assert results["huge"] == "too_large"
    assert "CR, LF or NUL" in results["bad_header"]
    assert results["one_more"]["error"] == "busy"
    assert results["after_close"] == 200
    assert results["capped"]["error"] == "too_large" and results["at_cap"] == CAP
    assert results["timeout"] == "timeout"
    assert not any("Injected" in r["headers"] for r in upstream.received())
    # Many refused calls: each is counted (and the log bounded by the network's own limit).
    network = gateway.client.app[MANAGER].get("tenant-a", sid).spec.egress
    assert network is not None
    before = network.counters.refusals
    flood = await run(gateway, sid, f"""
print(json.dumps(sum(1 for _ in range(100) if "refused" in probe("http://{OTHER}:{PORT}/hello"))))
""")
    assert flood == 100 and network.counters.refusals == before + 100
    # Responses the guest dropped unread (closed, timed out, past the cap) end quietly on the gateway:
    # no fault to log (a guest doing it in a loop would fill the gateway's log).
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize(("options", "expected"), [
    ((), "refused: sandgate egress refused the request (403): the sandbox has no network (this launcher was "
         "given no handoff socket)"),
    (("--handoff-fd", "97"), "error: the host could not answer"),  # not an open fd
])
def test_a_launcher_without_a_working_handoff_fails_the_fetch_not_the_guest(options: tuple[str, ...],
                                                                            expected: str) -> None:
    code = ("import sandgate\ntry:\n    sandgate.fetch('http://example.org/')\nexcept sandgate.FetchError as e:\n"
            "    print(e.kind + ': ' + str(e))")
    done = subprocess.run([sys.executable, "-m", "plugins.wasm.launcher", "--agent-dir", str(stage_agent_dir()),
                           *options, "--", "python", "-c", code], env=artifacts.child_env(), capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith(expected), done.stdout


def test_the_launcher_and_the_proxy_agree_on_the_refusal_mark() -> None:
    assert tuple(part.encode() for part in fetch.REFUSAL_HEADER) == forward.REFUSAL_HEADER


# -- the door without a guest: hostile frames and pointers ------------------------------------------------


INTEGERS = st.integers(-(2**63), 2**64 - 1)  # what msgpack packs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda m: msgpack.packb(m, use_bin_type=True), st.recursive(
        st.none() | st.booleans() | INTEGERS | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12)),
    st.builds(lambda op, extra: msgpack.packb({"op": op, **extra}, use_bin_type=True),
              st.sampled_from(["open", "read", "close"]),
              st.dictionaries(st.sampled_from(["id", "size", "method", "url", "headers", "body", "timeout"]),
                              st.none() | INTEGERS | st.floats() | st.text(max_size=30) | st.binary(max_size=10)
                              | st.lists(st.lists(st.text(max_size=5), max_size=3), max_size=3), max_size=7)),
))
def test_any_frame_gets_an_answer(frame: bytes) -> None:
    answer = wire.decode(fetch.Door(None, CAP).answer(frame))
    assert isinstance(answer["ok"], bool)
    if not answer["ok"]:
        assert answer["kind"] in wire.KINDS and isinstance(answer["message"], str)


#: A module that calls `host.call` with whatever pointers it is given, and whose `host_alloc`
#: answers a fixed address (or 0: no memory), for the door's bounds checks.
DOOR_WAT = """
(module
  (import "host" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $alloc (mut i32) (i32.const 1024))
  (func (export "host_alloc") (param i32) (result i32) (global.get $alloc))
  (func (export "set_alloc") (param i32) (global.set $alloc (local.get 0)))
  (func (export "try") (param i32 i32 i32 i32) (result i32)
    (call $call (local.get 0) (local.get 1) (local.get 2) (local.get 3))))
"""
PAGE = 65536


@pytest.fixture(scope="module")
def door_module() -> Any:
    import wasmtime

    engine = wasmtime.Engine()
    return engine, wasmtime.Module(engine, DOOR_WAT)


ADDRESSES = st.one_of(st.integers(0, PAGE), st.integers(0, 2**32 - 1))


def _signed(n: int) -> int:
    return n - (1 << 32) if n >= 1 << 31 else n


@settings(max_examples=300, deadline=None)
@given(ptr=ADDRESSES, length=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)), out=ADDRESSES,
       alloc=ADDRESSES)
def test_the_door_never_reads_or_writes_outside_guest_memory(door_module: Any, ptr: int, length: int, out: int,
                                                           alloc: int) -> None:
    import wasmtime

    engine, module = door_module
    store = wasmtime.Store(engine)
    linker = wasmtime.Linker(engine)
    linker.define_func("host", "call", launcher._ft([wasmtime.ValType.i32()] * 4, [wasmtime.ValType.i32()]),
                       fetch.Door(None, CAP), access_caller=True)
    exports = linker.instantiate(store, module).exports(store)
    exports["set_alloc"](store, _signed(alloc))
    memory = exports["memory"]
    memory.write(store, msgpack.packb({"op": "close", "id": 1}), 0)
    before = bytes(memory.read(store, 0, PAGE))
    status = exports["try"](store, _signed(ptr), _signed(length), _signed(out), _signed((out + 4) & 0xFFFFFFFF))
    after = bytes(memory.read(store, 0, PAGE))
    assert memory.data_len(store) == PAGE
    if ptr + length > PAGE or out + 8 > PAGE:
        assert status == fetch.HOST_FAULT and after == before
        return
    answer = fetch.Door(None, CAP).answer(before[ptr:ptr + length])
    if not 0 < alloc <= PAGE - len(answer):
        assert status == fetch.HOST_FAULT
        return
    assert status == 0
    assert struct.unpack("<II", after[out:out + 8]) == (alloc, len(answer))
    if out + 8 <= alloc or alloc + len(answer) <= out:  # (else its address was written over it)
        assert after[alloc:alloc + len(answer)] == answer
