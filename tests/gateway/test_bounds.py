"""The gateway's memory stays bounded whatever a guest or a slow client does (issue 9).

Every test runs a real gateway (pytest-aiohttp) on the real WASM runtime. Hostile guests are real
guest code: in the WASM runtime, guest Python runs inside the agent's process, so it can find the
agent's `Channel` and write frames the agent never meant to send (`FORGE` below). What the gateway
holds is read from its own structures (a REST exec's collector and replay buffer, the agent
stream's queue, the replay budgets): sizes, never timings.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Limits, Settings
from gateway.sessions.sandbox import Sandbox
from gateway.web.app import MANAGER, create_app
from guest_agent.protocol import event_size

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

KEY = "bounds-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEADLINE = 60.0
MiB = 1 << 20
LIMITS = Limits(exec_timeout_s=60.0, replay_bytes=256 << 10, replay_sandbox_bytes=1 * MiB,
                replay_gateway_bytes=MiB + MiB // 2)
#: Guest code that finds the agent's channel and the exec's stream id: `ch.event(rid, ev, **fields)`
#: then sends any event with the next sequence number, exactly as a patched agent would.
FORGE = ("import gc\n"
         "ch = next(o for o in gc.get_objects() if type(o).__name__ == 'Channel' and hasattr(o, 'leg'))\n"
         "rid = next(iter(ch.leg._out_streams))\n")


@pytest.fixture
async def gateway(aiohttp_client: Any) -> TestClient[Any, Any]:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("microvm", "pod"), default_runtime="wasm",
                        keepalive_s=0.05, client_send_timeout_s=3600.0, reap_interval_s=3600.0,
                        runtimes={"wasm": {"pool_size": 1}}, limits=LIMITS)
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


async def _create(gateway: TestClient[Any, Any]) -> Sandbox:
    resp = await gateway.post("/v1/sandboxes", json={}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return gateway.app[MANAGER].get("tenant", (await resp.json())["id"])


async def _exec(gateway: TestClient[Any, Any], sandbox: Sandbox, code: str, **body: Any) -> dict[str, Any]:
    resp = await gateway.post(f"/v1/sandboxes/{sandbox.id}/exec", json={"code": code, **body}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        msg = await ws.receive()
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data)
    return json.loads(msg.data)  # type: ignore[no-any-return]


# -- REST exec output (issue 9, High 2) ----------------------------------------------------------


async def test_rest_exec_keeps_a_capped_head_of_each_stream_and_counts_the_rest(
    gateway: TestClient[Any, Any],
) -> None:
    sandbox = await _create(gateway)
    code = ("import sys\nblock = 'o' * 65536\nfor _ in range(128):\n    sys.stdout.write(block)\n"
            "for _ in range(48):\n    sys.stderr.write('e' * 65536)\n"
            "_ = open('/work/ran-to-the-end', 'w').write('yes')\n")
    resp = await gateway.post(f"/v1/sandboxes/{sandbox.id}/exec", json={"code": code}, headers=AUTH)
    assert resp.status == 200
    body = await resp.read()
    done = json.loads(body)
    assert done["exit_code"] == 0 and "error" not in done, done.get("error")
    limit = LIMITS.exec_stream_output_bytes
    assert done["stdout"] == "o" * limit and done["stderr"] == "e" * limit
    assert done["dropped_bytes"] == {"stdout": 8 * MiB - limit, "stderr": 3 * MiB - limit}
    assert done["truncated"] and done["stdout_truncated"] and done["stderr_truncated"]
    assert len(body) < 2 * limit + 4096, "the answer holds the capped heads, not the 11 MiB"
    record = sandbox.execs[done["exec_id"]]
    assert record.buffer.bytes <= LIMITS.replay_bytes, "its replay keeps the newest events up to its cap"
    after = await _exec(gateway, sandbox, "print(open('/work/ran-to-the-end').read())")
    assert after["stdout"] == "yes\n", "the exec ran to its end while its output was dropped"
    small = await _exec(gateway, sandbox, "print('hi')")
    assert small["stdout"] == "hi\n" and not small["truncated"] and not small["stdout_truncated"]
    assert small["dropped_bytes"] == {"stdout": 0, "stderr": 0}


# -- replay of finished execs (High 3) --------------------------------------------------------


def _deep_size(event: dict[str, Any]) -> int:
    """An upper estimate of what a buffered event holds: the dict, each value, the deque slot."""
    return sys.getsizeof(event) + sum(sys.getsizeof(v) for v in event.values()) + 8


async def test_replay_is_bounded_per_sandbox_and_gateway_oldest_finished_first(
    gateway: TestClient[Any, Any],
) -> None:
    manager = gateway.app[MANAGER]
    many_lines = "for i in range(3000):\n    print(i)\n"  # ~1.1 MB of buffered events, real bytes
    first = await _create(gateway)
    ids = [(await _exec(gateway, first, many_lines))["exec_id"] for _ in range(5)]
    records = [first.execs[i] for i in ids]
    data = next(e for e in records[-1].buffer.since(0)[0] if e["ev"] == "data")
    assert event_size(data) >= _deep_size(data), "a buffered event is charged what it really costs"
    assert first.replay_budget is not None
    assert first.replay_budget.used == sum(r.buffer.bytes for r in first.execs.values()) <= LIMITS.replay_sandbox_bytes
    assert len(records[0].buffer) == 1, "the oldest finished exec gave its buffer up first (its end stays)"
    assert records[-1].buffer.bytes > LIMITS.replay_bytes // 2, "the newest kept its replay"

    ws = await gateway.ws_connect(f"/v1/sandboxes/{first.id}/ws", headers=AUTH)
    await ws.send_json({"id": 1, "op": "exec.attach", "exec_id": ids[0], "from_seq": 0})
    reply = await _receive(ws)
    end_seq = records[0].buffer.next_seq - 1
    assert reply["result"]["lost"] == [0, end_seq - 1], "the attach says what was dropped"
    end = await _receive(ws)
    assert end["ev"] == "end" and end["exit_code"] == 0 and end["seq"] == end_seq
    await ws.close()

    second = await _create(gateway)
    for _ in range(3):
        await _exec(gateway, second, many_lines)
    everything = [r for s in (first, second) for r in s.execs.values()]
    assert manager.replay_budget.used == sum(r.buffer.bytes for r in everything) <= LIMITS.replay_gateway_bytes
    kept = [len(r.buffer) > 1 for r in records]
    assert kept == sorted(kept) and kept.count(False) >= 2, "the gateway's budget took the oldest finished first"
    assert all(len(r.buffer) > 1 for r in second.execs.values()), "the newer sandbox's execs kept theirs"


# -- oversized data events and queued bytes (High 4) ---------------------------------------------


async def test_a_data_event_above_the_chunk_size_ends_the_agent_with_guest_protocol(
    gateway: TestClient[Any, Any],
) -> None:
    sandbox = await _create(gateway)
    done = await _exec(gateway, sandbox, FORGE + "ch.event(rid, 'data', fd='stdout', data=b'x' * (900 * 1024))\n"
                                                "import time\ntime.sleep(600)\n")
    assert done["error"]["code"] == "guest_protocol" and "921600 bytes" in done["error"]["message"], done
    assert done["stdout"] == ""
    after = await _exec(gateway, sandbox, "print('still serving')")
    assert after["stdout"] == "still serving\n"


async def test_a_stalled_client_holds_a_bounded_number_of_bytes(gateway: TestClient[Any, Any]) -> None:
    """A WebSocket client that stops reading: the exec's events wait for it, the gateway's queue for
    the agent's stream fills to its byte bound, and the guest is held back in its pipe."""
    sandbox = await _create(gateway)
    stuck = await gateway.ws_connect(f"/v1/sandboxes/{sandbox.id}/ws", headers=AUTH, max_msg_size=0)
    stuck_transport = stuck._response.connection.transport  # type: ignore[union-attr]
    assert stuck_transport is not None
    stuck_transport.pause_reading()  # this client stops reading: the gateway's sends to it block
    await stuck.send_json({"id": 1, "op": "exec.start", "tag": "flood",
                           "code": "import sys\nwhile True:\n    sys.stdout.write('x' * 60000 + '\\n')\n"})
    viewer = await gateway.ws_connect(f"/v1/sandboxes/{sandbox.id}/ws", headers=AUTH)
    await viewer.send_json({"id": 1, "op": "exec.attach", "tag": "flood", "from_seq": 0})
    assert "result" in await _receive(viewer)
    # A keepalive to the reading viewer proves the stream is held up by the stalled client.
    while (await _receive(viewer))["ev"] != "keepalive":
        pass
    (stream,) = sandbox.agent._streams.values()
    assert stream.queued_bytes <= stream.max_bytes == LIMITS.agent_stream_queue_bytes
    record = sandbox.execs["e1"]
    assert record.buffer.bytes <= LIMITS.replay_bytes
    await viewer.close()
    stuck_transport.abort()
    resp = await gateway.delete(f"/v1/sandboxes/{sandbox.id}", headers=AUTH)
    assert resp.status == 204


# -- only the gateway decides that an exec ended (Medium) ------------------------------------------


async def test_a_forged_end_does_not_end_the_exec_while_the_guest_runs_on(gateway: TestClient[Any, Any]) -> None:
    sandbox = await _create(gateway)
    done = await _exec(gateway, sandbox, FORGE + "ch.event(rid, 'end', exit_code=0, signal=None, duration_ms=1.0)\n"
                                                "while True:\n    pass\n", timeout=2)
    assert done["exit_code"] is None and done["error"]["code"] == "timeout", done
    assert sandbox.describe()["execs_running"] == 0
    after = await _exec(gateway, sandbox, "print('back')")
    assert after["stdout"] == "back\n"
    assert sandbox.restarts == 1, "the spinning agent was stopped, not left running"


async def test_a_forged_end_seen_by_a_websocket_client_ends_only_when_the_gateway_says(
    gateway: TestClient[Any, Any],
) -> None:
    sandbox = await _create(gateway)
    ws = await gateway.ws_connect(f"/v1/sandboxes/{sandbox.id}/ws", headers=AUTH)
    await ws.send_json({"id": 1, "op": "exec.start", "timeout": 2,
                        "code": FORGE + "print('forging', flush=True)\n"
                                        "ch.event(rid, 'end', exit_code=0, signal=None, duration_ms=1.0)\n"
                                        "while True:\n    pass\n"})
    events = [await _receive(ws)]
    while events[-1].get("ev") != "end":
        events.append(await _receive(ws))
        if events[-1].get("ev") == "data":
            assert sandbox.describe()["execs_running"] == 1
    assert events[-1]["error"]["code"] == "timeout" and events[-1]["exit_code"] is None, events[-1]


@pytest.mark.parametrize(("fields", "what"), [
    ({"exit_code": b"\x00"}, "exit_code"),
    ({"exit_code": 0, "signal": [1]}, "signal"),
    ({"exit_code": 0, "error": {"code": "nope", "message": "x"}}, "error"),
    ({"exit_code": True}, "exit_code"),
])
async def test_mistyped_end_fields_end_the_agent_with_guest_protocol(
    gateway: TestClient[Any, Any], fields: dict[str, Any], what: str
) -> None:
    sandbox = await _create(gateway)
    done = await _exec(gateway, sandbox, FORGE + f"ch.event(rid, 'end', **{fields!r})\nimport time\ntime.sleep(600)\n")
    assert done["error"]["code"] == "guest_protocol" and what in done["error"]["message"], done
    assert done["exit_code"] is None


# -- event-loop fairness (High 5) ----------------------------------------------------------------


async def test_a_flooding_sandbox_decodes_at_most_its_share_per_turn_of_the_event_loop(
    gateway: TestClient[Any, Any],
) -> None:
    """A guest printing tiny lines as fast as it can: between two turns of the event loop (seen by a
    probe task that yields at every turn), the gateway decodes at most one turn's share of frames
    from it, so every other task (other tenants' requests) runs between its shares. (Latencies under
    such floods are measured by bench/flood_fairness.py.)"""
    sandbox = await _create(gateway)
    await _exec(gateway, sandbox, "1")
    flood = asyncio.ensure_future(_exec(gateway, sandbox, "for i in range(20000):\n    print(i)\n"))
    per_turn: list[int] = []
    last = 0
    while not flood.done():
        await asyncio.sleep(0)  # one turn of the loop
        streams = list(sandbox.agent._leg._in_streams.values())
        decoded = streams[0].next_seq if streams else 0
        if decoded >= last:
            per_turn.append(decoded - last)
        last = decoded
    done = await flood
    assert done["exit_code"] == 0 and done["stdout"].startswith("0\n1\n"), done
    assert sum(per_turn) > 10_000, "the probe saw the flood decoded"
    share = LIMITS.agent_turn_events
    assert max(per_turn) <= 2 * share, f"a turn decoded {max(per_turn)} frames of one sandbox (share {share})"


# -- display events (rich output, issue 16) --------------------------------------------------------


@pytest.mark.parametrize(("bundle", "what"), [
    ("'<b>'", "field 'bundle' must be a map, not str"),
    ({}, "a map of 1..16 MIME types"),
    ({"text/plain": b"bytes"}, "must be a string, not bytes"),
    ({"text/html": "<b>"}, "has no text/plain"),
    ({"text/plain": "x", "not a type": "y"}, "is not a MIME type"),
    ({"text/plain": "x", "image/png": "%%%%"}, "image/png value is not base64"),
    ({"text/plain": "x", **{f"text/x{i}": "" for i in range(16)}}, "a map of 1..16 MIME types"),
    ({"text/plain": "x", "text/html": "y" * (960 * 1024)}, "a display event of 983060 bytes (at most 983040)"),
])
async def test_a_malformed_display_event_ends_the_agent_with_guest_protocol(
    gateway: TestClient[Any, Any], bundle: Any, what: str
) -> None:
    sandbox = await _create(gateway)
    done = await _exec(gateway, sandbox, FORGE + "print('first', flush=True)\n"
                                                f"ch.event(rid, 'display', bundle={bundle!r})\n"
                                                "import time\ntime.sleep(600)\n")
    assert done["error"]["code"] == "guest_protocol" and what in done["error"]["message"], done
    assert done["stdout"] == "first\n" and done["display"] == [], "what came before is kept, nothing after"
    after = await _exec(gateway, sandbox, "display(7)")
    assert after["display"] == [{"text/plain": "7"}], "a restarted agent serves on"


async def test_display_events_are_bounded_per_exec_and_charged_in_replay(gateway: TestClient[Any, Any]) -> None:
    """A guest that sends display events past the per-exec bound (16 MiB of bundles) breaks the
    protocol; below it, each buffered display event is charged what it costs, within the replay cap."""
    from guest_agent.schema import MAX_EXEC_DISPLAY_BYTES

    sandbox = await _create(gateway)
    code = (FORGE + "big = 'y' * (900 * 1024)\n"
            f"for i in range({MAX_EXEC_DISPLAY_BYTES // (900 * 1024) + 1}):\n"
            "    ch.event(rid, 'display', bundle={'text/plain': str(i), 'text/html': big})\n"
            "import time\ntime.sleep(600)\n")
    done = await _exec(gateway, sandbox, code)
    assert done["error"]["code"] == "guest_protocol" and "display events of more than" in done["error"]["message"]
    assert len(done["display"]) == MAX_EXEC_DISPLAY_BYTES // (900 * 1024), "those below the bound were delivered"
    record = sandbox.execs[done["exec_id"]]
    assert record.buffer.bytes <= LIMITS.replay_bytes
    done = await _exec(gateway, sandbox, "display({'text/html': 'é' * 30000, 'image/png': 'AAAA'}, raw=True)")
    [event] = [e for e in sandbox.execs[done["exec_id"]].buffer.since(0)[0] if e["ev"] == "display"]
    deep = _deep_size(event) + sum(sys.getsizeof(k) + sys.getsizeof(v) + 64 for k, v in event["bundle"].items())
    assert event_size(event) >= deep, "a buffered display event is charged what it really costs"
