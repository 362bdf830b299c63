"""SIGTERM with execs in flight (issue 9, Medium): a real `sandgate serve` process.

The shutdown must end in-flight execs by its deadline (the CLI's 30 s `shutdown_timeout`), answer a
REST exec's caller (its partial output and `unavailable`), end a WebSocket exec's stream, and stop
the guests; before the fix a REST exec held the shutdown for its own timeout with its guest running.
Also when the shutdown comes before the exec's `start` came through: that exec may have run, so it is
no refusal (a plain, retryable 503) but an exec result like any other.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.config import Settings
from gateway.web.app import MANAGER, create_app
from tests.serving import Served, serve

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

KEY = "shutdown-key"
#: Well under the CLI's 30 s shutdown timeout: the execs must be ended, not waited out.
DEADLINE = 20.0
SPIN = "print('started', flush=True)\nwhile True:\n    pass\n"


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        for child in map(int, text.split()):
            found |= {child, *_children(child)}
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status


def _wait_printed(gateway: Served, sandbox_id: str) -> None:
    """Until the sandbox's exec has printed `started` (one request after another, within a deadline).
    Not just until it counts as running: it does from the moment the gateway sent it, before its
    guest ran a line, and a SIGTERM then would find no output to answer with."""
    deadline = time.monotonic() + DEADLINE
    while True:
        listed = gateway.call(KEY, "GET", f"/v1/sandboxes/{sandbox_id}/executions")["executions"]
        if listed and gateway.call(KEY, "GET", f"/v1/sandboxes/{sandbox_id}/executions/{listed[0]['id']}")[
                "stdout"] == "started\n":
            return
        assert time.monotonic() < deadline, "the exec never printed"


def test_sigterm_ends_in_flight_rest_and_websocket_execs_and_stops_their_guests(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDGATE_")}
    env.update(SANDGATE_API_KEYS=f"{KEY}:tenant", SANDGATE_STATE_DIR=str(tmp_path / "state"))
    with serve(env) as gateway:
        rest_sb = gateway.call(KEY, "POST", "/v1/sandboxes", {"runtime": "wasm"})["id"]
        ws_sb = gateway.call(KEY, "POST", "/v1/sandboxes", {"runtime": "wasm"})["id"]
        answer: dict[str, Any] = {}
        caller = threading.Thread(target=lambda: answer.update(gateway.call(
            KEY, "POST", f"/v1/sandboxes/{rest_sb}/exec", {"code": SPIN, "timeout": 600})))
        caller.start()
        with connect(f"ws://127.0.0.1:{gateway.port}/v1/sandboxes/{ws_sb}/ws",
                     additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=DEADLINE) as ws:
            ws.send(json.dumps({"id": 1, "op": "exec.start", "code": SPIN}))
            started = [json.loads(ws.recv(timeout=DEADLINE)) for _ in range(2)]
            assert started[1]["ev"] == "data" and base64.b64decode(started[1]["data"]) == b"started\n", started
            _wait_printed(gateway, rest_sb)
            guests = _children(gateway.proc.pid)
            assert guests, "the sandboxes' launchers run under the gateway"

            gateway.proc.terminate()
            gateway.proc.wait(timeout=DEADLINE)
            caller.join(timeout=DEADLINE)
            assert gateway.proc.returncode == 0, "".join(gateway.output)
            assert answer["error"]["code"] == "unavailable" and answer["stdout"] == "started\n", answer
            assert answer["exit_code"] is None
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=DEADLINE)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001, closed.value
        assert not [pid for pid in guests if _alive(pid)], "every guest stopped with the gateway"


@pytest.fixture
async def gateway(aiohttp_client: Any) -> TestClient[Any, Any]:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("microvm", "pod"), default_runtime="wasm",
                        reap_interval_s=3600.0, runtimes={"wasm": {"pool_size": 0}})
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


async def test_a_rest_exec_stopped_by_the_shutdown_before_its_start_came_through_gets_its_result(
        gateway: TestClient[Any, Any]) -> None:
    """The WASM agent takes one request at a time: while it is stuck writing a file nobody reads
    (the gateway stops reading its channel once that stream's queue is full), the exec sent after
    it waits unread, so the shutdown finds it without a `start`. Before the fix the caller got a
    plain 503 `unavailable`, retryable: as if the agent had refused it, when the gateway cannot
    know whether the guest ran it (here it did not; a `start` still on its way is the same case)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    resp = await gateway.post("/v1/sandboxes", json={}, headers=auth)
    assert resp.status == 201, await resp.text()
    sid = (await resp.json())["id"]
    # Far more than the stream's queue, the channel's reader and the pipe hold between them.
    resp = await gateway.put(f"/v1/sandboxes/{sid}/files/blob", data=io.BytesIO(bytes(16 << 20)), headers=auth)
    assert resp.status == 201, await resp.text()
    manager = gateway.app[MANAGER]
    await manager.read_file(manager.get("tenant", sid), "blob")  # a stream nobody reads
    async with asyncio.timeout(DEADLINE):
        caller = asyncio.create_task(gateway.post(f"/v1/sandboxes/{sid}/exec", json={"code": "print('ran')"},
                                                  headers=auth))
        while (await (await gateway.get(f"/v1/sandboxes/{sid}", headers=auth)).json())["execs_running"] != 1:
            assert not caller.done(), await (await caller).text()
        await manager.drain()  # what SIGTERM starts with (gateway/web/app.py)
        resp = await caller
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["error"]["code"] == "unavailable" and answer["exit_code"] is None, answer
    assert answer["stdout"] == "", answer
