"""The IDE's preview panel in headless Chromium: a microVM sandbox's `http.server`, published from
the panel's port field and shown in its frame through the port's token exchange; the frame's page
(the sandbox's, untrusted) cannot reach the IDE page."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import KEY, Shots, need_runtime
from tests.browser.ide import log_in, start_sandbox
from tests.serving import Served

pytestmark = [pytest.mark.browser, pytest.mark.microvm, pytest.mark.timeout(600)]

#: Binds, says so, and leaves a server behind in its own session (so the exec ends once it listens):
#: the page tries to reach the IDE page that frames it, and writes what it found into its title.
SERVER = r"""
import http.server, os, sys
os.makedirs("/tmp/site", exist_ok=True)
with open("/tmp/site/index.html", "w") as f:
    f.write("<h1 id='hello'>hello from the sandbox</h1><script>"
            "let reached = 'no'; try { reached = String(parent.sessionStorage.length); } catch (e) {}"
            "document.getElementById('hello').dataset.parent = reached;</script>")
server = http.server.ThreadingHTTPServer(("127.0.0.1", 8000), lambda *a: http.server.SimpleHTTPRequestHandler(
    *a, directory="/tmp/site"))
if os.fork():
    print("listening")
    sys.exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
server.serve_forever()
"""


def test_preview_panel_shows_a_published_port(page: Any, gateway: Served, runtimes: dict[str, Any],
                                              shots: Shots) -> None:
    need_runtime(runtimes, "microvm")
    base = f"http://127.0.0.1:{gateway.port}"
    log_in(page, base, KEY)
    sandbox_id = start_sandbox(page, "microvm")
    started = gateway.call(KEY, "POST", f"/v1/sandboxes/{sandbox_id}/exec",
                           {"command": ["python3", "-c", SERVER]})
    assert started["stdout"] == "listening\n", started
    page.fill("#preview-port", "8000")
    page.click("#preview-open")
    frame = page.locator("#preview-frame")
    expect(frame).to_be_visible()
    expect(frame).to_have_attribute("sandbox", "allow-scripts allow-forms allow-popups allow-modals allow-downloads")
    hello = page.frame_locator("#preview-frame").locator("#hello")
    expect(hello).to_have_text("hello from the sandbox")
    expect(hello).to_have_attribute("data-parent", "no")  # the IDE's storage is out of its reach
    link = page.locator("#preview-tab")
    assert link.get_attribute("href").startswith(f"{base}/v1/sandboxes/{sandbox_id}/ports/8000/?token=")
    assert link.get_attribute("rel") == "noopener noreferrer"
    shots.take(page, "preview-microvm")
    page.click("#preview-close")
    expect(frame).to_be_hidden()
