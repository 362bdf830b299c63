"""The rich-output suite: Python's display events (guest_agent/display.py) through the real gateway
and real sandboxes of one runtime, on every way a client gets an exec's output: REST exec,
/v1/execute, the executions API, invoke, and the WebSocket (both subprotocols, and exec.attach's
replay).

A runtime's tests subclass `DisplayConformance` like `RuntimeConformance` (see conformance.py).
The objects displayed are plain classes with `_repr_*_` methods, so the suite needs nothing but
the agent's Python; matplotlib and pandas are the datascience template's own tests.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from gateway.protocol.client import JSON, MSGPACK
from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures, output
from gateway.testing.functions import get, post

#: A class with rich representations, and one displayed explicitly between two prints.
RICH = ("class Rich:\n"
        "    def __repr__(self):\n        return 'Rich()'\n"
        "    def _repr_html_(self):\n        return '<table><tr><td>rich</td></tr></table>'\n"
        "    def _repr_png_(self):\n        return b'\\x89PNG\\r\\n\\x1a\\n' + bytes(range(256))\n"
        "    def _repr_json_(self):\n        return {'rows': [1, 2]}\n")
EXPLICIT = RICH + "print('before')\ndisplay(Rich())\nprint('after')\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))


def check_rich(bundle: dict[str, Any]) -> None:
    """`bundle` is Rich()'s: every value text, the PNG base64, the JSON as JSON text."""
    assert bundle["text/plain"] == "Rich()"
    assert bundle["text/html"] == "<table><tr><td>rich</td></tr></table>"
    assert base64.b64decode(bundle["image/png"], validate=True) == PNG
    assert json.loads(bundle["application/json"]) == {"rows": [1, 2]}


class DisplayConformance(GatewayFixtures):
    """Subclass with `runtime = "<id>"`."""

    async def test_rest_exec_result_lists_display_bundles(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], code=RICH + "Rich()")
        assert done["exit_code"] == 0, done
        assert done["stdout"] == "", "a value with rich representations is displayed, not printed"
        [bundle] = done["display"]
        check_rich(bundle)
        done = await gateway.exec(sandbox["id"], code=EXPLICIT + "display(42)\n[1, 2]")
        assert done["stdout"] == "before\nafter\n[1, 2]\n", done
        assert [b["text/plain"] for b in done["display"]] == ["Rich()", "42"]
        plain = await gateway.exec(sandbox["id"], code="print('hi')")
        assert plain["display"] == []

    async def test_display_builtin_persists_and_errors_are_the_users(self, gateway: Gateway,
                                                                     sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], code="display(raw=True)\ndisplay({'text/html': 1}, 2, raw=True)")
        assert done["exit_code"] == 1 and "TypeError" in done["stderr"], done
        assert done["display"] == [{"text/plain": ""}], "what was displayed before the error stays"

    @pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])
    async def test_websocket_display_events_in_order_and_replayed(self, gateway: Gateway, sandbox: dict[str, Any],
                                                                  subprotocol: str) -> None:
        ws = await gateway.ws(sandbox["id"], subprotocol)
        events = await ws.stream("exec.start", code=EXPLICIT, tag="rich")
        assert [e["ev"] for e in events] == ["start", "data", "display", "data", "end"], events
        assert [e["seq"] for e in events] == list(range(5))
        check_rich(events[2]["bundle"])
        assert output(events) == b"before\nafter\n"
        replay = await ws.stream("exec.attach", tag="rich", from_seq=2)
        assert replay[0]["result"]["first_seq"] == 2
        assert replay[1]["ev"] == "display" and replay[1]["bundle"] == events[2]["bundle"]
        await ws.ws.close()

    async def test_execute_executions_and_invoke_carry_display(self, gateway: Gateway,
                                                               sandbox: dict[str, Any]) -> None:
        done = await post(gateway, "/v1/execute", {"runtime": gateway.runtime, **gateway.options,
                                                   "code": RICH + "Rich()"})
        [bundle] = done["display"]
        check_rich(bundle)
        started = await post(gateway, f"/v1/sandboxes/{sandbox['id']}/executions", {"code": EXPLICIT}, status=202)
        path = f"/v1/sandboxes/{sandbox['id']}/executions/{started['id']}"
        info = await get(gateway, f"{path}?wait=true&timeout=30")
        assert info["state"] == "completed", info
        [bundle] = info["display"]
        check_rich(bundle)
        later = await get(gateway, f"{path}?output_offset={info['output_offset']}")
        assert later["display"] == [], "a poll from the offset gets only what came after"
        code = RICH + "def chart(n):\n    display(Rich())\n    return n * 2\n"
        called = await post(gateway, f"/v1/sandboxes/{sandbox['id']}/invoke",
                            {"code": code, "function": "chart", "args": [21]})
        assert called["status"] == "success" and called["result"] == 42, called
        [bundle] = called["display"]
        check_rich(bundle)


async def exec_display(gateway: Gateway, sandbox_id: str, code: str, **body: Any) -> dict[str, Any]:
    """A REST exec that must succeed; its result."""
    resp = await gateway.client.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": code, **body}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    done: dict[str, Any] = await resp.json()
    assert done["exit_code"] == 0, done
    return done
