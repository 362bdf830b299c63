"""SIGTERM with execs in flight (issue 9, Medium): a real `sandgate serve` process.

The shutdown must end in-flight execs by its deadline (the CLI's 30 s `shutdown_timeout`), answer a
REST exec's caller (its partial output and `unavailable`), end a WebSocket exec's stream, and stop
the guests; before the fix a REST exec held the shutdown for its own timeout with its guest running.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

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


def _wait_running(gateway: Served, sandbox_id: str) -> None:
    """Until the gateway reports the exec running (one request after another, within a deadline)."""
    deadline = time.monotonic() + DEADLINE
    while gateway.call(KEY, "GET", f"/v1/sandboxes/{sandbox_id}")["execs_running"] != 1:
        assert time.monotonic() < deadline, "the exec never started"


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
            _wait_running(gateway, rest_sb)
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
