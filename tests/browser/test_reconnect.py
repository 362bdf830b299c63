"""Cut the browser's network mid-stream and check that the output resumes with nothing lost or doubled.

The page reaches the gateway through a proxy the test cuts. The program streams numbered lines in
three phases, each released by a line on its stdin, so what happens while the page is cut off is
decided by the test, not by timing:

1. phase 1 (lines 0-99) streams to the page; the program waits for stdin;
2. the test cuts the network and waits until the page shows that it is reconnecting;
3. on its own connection to the gateway the test releases phase 2 (lines 100-199) and watches it
   being produced, all while the page is cut off;
4. the test restores the network: the page reconnects and replays phase 2 from its last sequence number;
5. the user presses Enter in the page (stdin after the reconnect) for phase 3 (lines 200-299).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from playwright.sync_api import expect
from websockets.sync.client import connect

from tests.browser.conftest import KEY, Shots, need_runtime
from tests.browser.ide import (
    console_idle,
    edit_file,
    has_pty,
    log_in,
    start_sandbox,
    terminal_text,
    type_in_terminal,
    wait_for_terminal,
)
from tests.browser.proxy import CuttableProxy
from tests.serving import Served

pytestmark = [pytest.mark.browser, pytest.mark.wasm, pytest.mark.timeout(600)]

PROGRAM = """\
import sys
for phase in range(3):
    if phase:
        sys.stdin.readline()
    for i in range(phase * 100, phase * 100 + 100):
        print(f"line {i:04d}", flush=True)
print("all done", flush=True)
"""


def release_phase_two(gateway: Served, sandbox_id: str) -> None:
    """On the test's own connection: send the running program a line, and wait until the gateway
    has the phase's last line (so it was produced while the page was cut off)."""
    with connect(f"ws://127.0.0.1:{gateway.port}/v1/sandboxes/{sandbox_id}/ws", subprotocols=["sandgate.v1.json"],
                 additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=30) as ws:

        def call(op: str, request_id: int, **fields: Any) -> dict[str, Any]:
            ws.send(json.dumps({"id": request_id, "op": op, **fields}))
            while True:
                message = json.loads(ws.recv(timeout=60))
                if message.get("id") == request_id and "ev" not in message:
                    assert "error" not in message, message
                    return message["result"]  # type: ignore[no-any-return]

        execs = call("exec.list", 1)["execs"]
        [program] = [e for e in execs if e["running"] and e["tag"] in ("ide-run", "ide-terminal")]
        call("exec.input", 2, exec_id=program["exec_id"], data=base64.b64encode(b"\n").decode())
        call("exec.attach", 3, exec_id=program["exec_id"], from_seq=0)
        seen = b""
        while b"line 0199" not in seen:
            message = json.loads(ws.recv(timeout=60))
            assert message.get("ev") != "end", f"the program ended early: {message}"
            if message.get("ev") == "data":
                seen += base64.b64decode(message["data"])


@pytest.mark.parametrize(("runtime", "wire"), [("wasm", "json"), ("wasm", "msgpack"),
                                               ("example-local", "json"), ("microvm", "json")])
def test_output_resumes_after_the_network_is_cut(page: Any, gateway: Served, runtimes: dict[str, Any],
                                                 proxy: CuttableProxy, shots: Shots, runtime: str,
                                                 wire: str) -> None:
    need_runtime(runtimes, runtime)
    log_in(page, f"http://127.0.0.1:{proxy.port}", KEY, wire)
    sandbox_id = start_sandbox(page, runtime)
    if not has_pty(page):
        console_idle(page)
    edit_file(page, "count.py", PROGRAM)
    page.click("#run-python")
    wait_for_terminal(page, "line 0099")

    proxy.cut()
    conn = page.locator("#conn")
    expect(conn).to_have_attribute("data-state", "reconnecting")
    shots.take(page, "reconnecting")
    release_phase_two(gateway, sandbox_id)
    assert "line 0100" not in terminal_text(page), "the page was cut off while phase 2 ran"

    proxy.restore()
    expect(conn).to_have_attribute("data-state", "online")
    expect(conn).to_have_attribute("data-reconnects", "1")
    expect(page.locator("#status")).to_contain_text("stream(s) resumed")
    wait_for_terminal(page, "line 0199")

    type_in_terminal(page, "")  # stdin after the reconnect releases phase 3
    wait_for_terminal(page, "all done")
    shots.take(page, "resumed")

    numbered = [line.strip() for line in terminal_text(page).splitlines() if line.strip().startswith("line ")]
    assert numbered == [f"line {i:04d}" for i in range(300)], "every line exactly once, in order"
    assert proxy.refused > 0, "the page tried to reconnect while the network was down"
