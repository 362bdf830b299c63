"""A page from another origin cannot open a session, even with a valid key, unless that origin is on
the gateway's allowlist (`SANDGATE_ALLOWED_ORIGINS`, set by the `gateway` fixture).

Both pages are served by real HTTP servers on loopback; the browser itself sets the Origin header.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.protocol.client import JSON, bearer_subprotocol
from tests.browser.conftest import KEY, Shots
from tests.serving import Served, free_port

pytestmark = [pytest.mark.browser, pytest.mark.wasm, pytest.mark.timeout(600)]

PAGE = b"<!doctype html><meta charset=utf-8><title>another site</title><p>another site"
#: Opens a WebSocket as any page can, and says how it went: "open:<subprotocol>" or "closed:<code>".
TRY_SESSION = """([url, protocols]) => new Promise((resolve) => {
  const ws = new WebSocket(url, protocols);
  ws.onopen = () => { resolve("open:" + ws.protocol); ws.close(); };
  ws.onclose = (event) => resolve("closed:" + event.code);
})"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _site(port: int) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def allowed_site(allowed_origin_port: int) -> Iterator[str]:
    yield from _site(allowed_origin_port)


@pytest.fixture
def other_site() -> Iterator[str]:
    yield from _site(free_port())


def test_disallowed_origin_cannot_open_a_session(page: Any, gateway: Served, allowed_site: str, other_site: str,
                                                 shots: Shots) -> None:
    # Any runtime will do: the Origin is checked before the sandbox is looked at.
    sandbox = gateway.call(KEY, "POST", "/v1/sandboxes", {"runtime": "example-local"})
    url = f"ws://127.0.0.1:{gateway.port}/v1/sandboxes/{sandbox['id']}/ws"
    protocols = [JSON, bearer_subprotocol(KEY)]

    page.goto(allowed_site + "/")
    assert page.evaluate(TRY_SESSION, [url, protocols]) == f"open:{JSON}", "the allowlisted origin connects"

    page.goto(other_site + "/")
    assert page.evaluate(TRY_SESSION, [url, protocols]) == "closed:1006", "the upgrade is refused (403)"
    shots.take(page, "refused")
    gateway.call(KEY, "DELETE", f"/v1/sandboxes/{sandbox['id']}")
