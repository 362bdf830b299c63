"""Rich output (display bundles) through the SDK, against a real gateway and real WASM sandboxes:
the WebSocket's Display events and `on_display`, and the REST results' `display` lists."""

from __future__ import annotations

import pytest

from gateway.client import AsyncClient, Display, Exited, Output, Started
from tests.client.conftest import KEY

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

RICH = ("class Chart:\n"
        "    def __repr__(self):\n        return 'Chart()'\n"
        "    def _repr_png_(self):\n        return b'\\x89PNG\\r\\n\\x1a\\nfake'\n"
        "    def _repr_json_(self):\n        return {'points': [1, 2]}\n")


def check_chart(display: Display) -> None:
    assert display.text == "Chart()" and display.png == b"\x89PNG\r\n\x1a\nfake"
    assert display.json == {"points": [1, 2]} and display.html is None
    assert display.mime_types == ["text/plain", "image/png", "application/json"]


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_display_events_results_and_callback(gateway_url: str, encoding: str) -> None:
    async with AsyncClient(gateway_url, KEY, encoding=encoding) as client:
        sandbox = await client.create_sandbox(runtime="wasm")
        try:
            seen: list[Display] = []
            done = await sandbox.exec(code=RICH + "print('a')\ndisplay(Chart())\nprint('b')\nChart()",
                                      on_display=seen.append)
            assert done.stdout == "a\nb\n" and done.ok
            assert len(done.display) == 2 and seen == done.display
            for display in done.display:
                check_chart(display)
            events = [event async for event in await sandbox.start(code=RICH + "print('x')\ndisplay(Chart())")]
            assert [type(e) for e in events] == [Started, Output, Display, Exited]
            assert [e.seq for e in events] == [0, 1, 2, 3]  # type: ignore[union-attr]
            ran = await client.execute(code=RICH + "Chart()", runtime="wasm")
            [display] = ran.display
            check_chart(display)
            called = await sandbox.invoke("f", code=RICH + "def f():\n    display(Chart())\n    return 1\n")
            assert called.ok and called.result == 1
            [display] = called.display
            check_chart(display)
            started = await sandbox.start_execution(code=RICH + "Chart()")
            info = await sandbox.get_execution(started.id, wait=True, timeout=30)
            [display] = info.display
            check_chart(display)
        finally:
            await sandbox.destroy()

