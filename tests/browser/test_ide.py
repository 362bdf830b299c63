"""The IDE page in headless Chromium against a real gateway: log in, terminal, edit and run, files."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

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
from tests.serving import Served

# A bound against hangs, not a timing: the first test also starts the gateway, which may make a
# microVM snapshot under emulation.
pytestmark = [pytest.mark.browser, pytest.mark.wasm, pytest.mark.timeout(600)]

#: wasm: the Python console; example-local and microvm: a shell on a real PTY.
RUNTIMES = ["wasm", "example-local", "microvm"]


def base(gateway: Served) -> str:
    return f"http://127.0.0.1:{gateway.port}"


def test_login_keeps_the_key_out_of_urls(page: Any, gateway: Served, shots: Shots) -> None:
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("websocket", lambda ws: urls.append(ws.url))
    page.goto(base(gateway) + "/")
    page.fill("#api-key", "not-a-key")
    page.click("#login button[type=submit]")
    expect(page.locator("#status")).to_contain_text("unauthorized")
    expect(page.locator("#session")).to_be_hidden()

    log_in(page, base(gateway), KEY)
    start_sandbox(page, "wasm")
    assert page.evaluate("sessionStorage.getItem('sandgate.apiKey')") == KEY
    assert page.evaluate("Object.keys(localStorage).length") == 0, "the key is kept per tab, never in localStorage"
    assert page.locator("#api-key").input_value() == "", "the typed key is cleared from the form"
    assert any("/ws" in url for url in urls), urls
    for url in [*urls, page.url]:
        assert KEY not in url, f"the API key leaked into a URL: {url}"
    shots.take(page, "logged-in")

    page.reload()  # the tab keeps its key and its sandbox
    expect(page.locator("#conn")).to_have_attribute("data-state", "online")
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


@pytest.mark.parametrize(("runtime", "wire"), [("wasm", "json"), ("wasm", "msgpack"),
                                               ("example-local", "json"), ("microvm", "json")])
def test_terminal(page: Any, gateway: Served, runtimes: dict[str, Any], shots: Shots, runtime: str,
                  wire: str) -> None:
    need_runtime(runtimes, runtime)
    log_in(page, base(gateway), KEY, wire)
    sandbox_id = start_sandbox(page, runtime)
    # What the sandbox can do is known once it runs (its agent's hello), not from the runtime list.
    capabilities = gateway.call(KEY, "GET", f"/v1/sandboxes/{sandbox_id}")["capabilities"]
    assert has_pty(page) == ("exec.pty" in capabilities)
    if has_pty(page):
        type_in_terminal(page, "echo $((6*7)) && tty")
        expect(page.locator(".xterm-rows")).to_contain_text("42")
        expect(page.locator(".xterm-rows")).to_contain_text("/dev/pts/")
        # The PTY follows the terminal's size: shrink the page, then ask the PTY.
        before = page.evaluate("window.sandgateIDE.size()")
        page.set_viewport_size({"width": 900, "height": 640})
        page.wait_for_function("(before) => window.sandgateIDE.size().join() !== before.join()"
                               " && window.sandgateIDE.settled()", arg=before)
        rows, cols = page.evaluate("window.sandgateIDE.size()")
        type_in_terminal(page, "stty size")
        wait_for_terminal(page, f"\n{rows} {cols}")
        # A reload re-attaches the running shell and replays its screen from the first event.
        page.reload()
        expect(page.locator("#conn")).to_have_attribute("data-state", "online")
        wait_for_terminal(page, f"\n{rows} {cols}")
        type_in_terminal(page, "echo again-$((2+3))")
        wait_for_terminal(page, "again-5")
    else:
        console_idle(page)
        type_in_terminal(page, "x = 6 * 7")
        console_idle(page)
        type_in_terminal(page, "x")
        expect(page.locator(".xterm-rows")).to_contain_text("42")
        console_idle(page)
        for line in ("for i in range(3):", "    print('row', i)", ""):  # a block runs after its empty line
            type_in_terminal(page, line)
        wait_for_terminal(page, "row 0\nrow 1\nrow 2")
        console_idle(page)
        type_in_terminal(page, "name = input('who? ')")
        wait_for_terminal(page, "who? ")
        type_in_terminal(page, "Ada")  # goes to the running statement's stdin
        console_idle(page)
        type_in_terminal(page, "name.upper()")
        wait_for_terminal(page, "'ADA'")
        console_idle(page)
        type_in_terminal(page, "1 / 0")
        wait_for_terminal(page, "ZeroDivisionError: division by zero")
        console_idle(page)
        type_in_terminal(page, "while True: pass")
        expect(page.locator("#terminal")).to_have_attribute("data-busy", "1")
        page.keyboard.press("Control+C")  # stops it (WASM restarts the agent; files are kept)
        console_idle(page)
        type_in_terminal(page, "6 * 9")
        wait_for_terminal(page, "\n54")
    expect(page.locator('[data-metric="uptime"]')).not_to_have_text("–")
    expect(page.locator('[data-metric="memory"]')).not_to_have_text("–")
    shots.take(page, "terminal")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_edit_and_run_python_and_javascript(page: Any, gateway: Served, runtimes: dict[str, Any], shots: Shots,
                                            runtime: str) -> None:
    need_runtime(runtimes, runtime)
    log_in(page, base(gateway), KEY)
    sandbox_id = start_sandbox(page, runtime)
    capabilities = gateway.call(KEY, "GET", f"/v1/sandboxes/{sandbox_id}")["capabilities"]
    if not has_pty(page):
        console_idle(page)
    edit_file(page, "src/main.py", "total = sum(range(10))\nprint('python says', total)\n")
    page.click("#run-python")
    wait_for_terminal(page, "python says 45")
    expect(page.locator('#tree .entry[data-path="src/main.py"]')).to_be_visible()

    # JavaScript runs in the runtime's engine (WASM: QuickJS) or, on a shell, with the image's `node`;
    # only the host-process runtime is known to have one.
    if "exec.javascript" in capabilities or runtime == "example-local":
        if not has_pty(page):
            console_idle(page)
        edit_file(page, "hello.js", "const xs = [1, 2, 3].map((x) => x * 2);\nconsole.log('js says', xs.join(','));\n")
        page.click("#run-js")
        wait_for_terminal(page, "js says 2,4,6")
        expect(page.locator('#tree .entry[data-path="hello.js"]')).to_be_visible()

    # Reopening a file from the tree brings back what was saved.
    page.fill("#editor", "")
    page.click('#tree .entry[data-path="src/main.py"] .name')
    expect(page.locator("#editor")).to_have_value("total = sum(range(10))\nprint('python says', total)\n")
    expect(page.locator("#path")).to_have_value("src/main.py")
    shots.take(page, "ran")


def test_upload_and_download(page: Any, gateway: Served, shots: Shots, tmp_path: Path) -> None:
    blob = os.urandom(300_000) + bytes(range(256))  # binary, not UTF-8, several chunks
    log_in(page, base(gateway), KEY)
    sandbox_id = start_sandbox(page, "wasm")
    page.set_input_files("#upload", files=[{"name": "data.bin", "mimeType": "application/octet-stream",
                                            "buffer": blob}])
    row = page.locator('#tree .entry[data-path="data.bin"]')
    expect(row).to_be_visible()
    expect(page.locator("#status")).to_contain_text("Uploaded data.bin")

    request = urllib.request.Request(f"{base(gateway)}/v1/sandboxes/{sandbox_id}/files/data.bin",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.read() == blob, "the sandbox holds exactly the uploaded bytes"

    row.hover()
    with page.expect_download() as download_info:
        row.locator("button[aria-label='download data.bin']").click()
    download = download_info.value
    assert download.suggested_filename == "data.bin"
    target = tmp_path / "downloaded.bin"
    download.save_as(target)
    assert target.read_bytes() == blob
    shots.take(page, "files")

    row.hover()
    row.locator("button[aria-label='delete data.bin']").click()
    expect(row).to_have_count(0)


def test_page_works_without_xterm(page: Any, gateway: Served, shots: Shots) -> None:
    """A pip-only install has no node_modules: the page says so and falls back to a plain console."""
    page.route("**/static/vendor/**", lambda route: route.fulfill(status=404, body="not installed"))
    log_in(page, base(gateway), KEY)
    expect(page.locator("#terminal .notice")).to_contain_text("npm ci")
    start_sandbox(page, "wasm")
    console_idle(page)
    box = page.get_by_label("terminal input")
    box.fill("6 * 7")
    box.press("Enter")
    page.wait_for_function("() => window.sandgateIDE.terminalText().includes('\\n42')")
    assert ">>> 6 * 7" in terminal_text(page)
    shots.take(page, "no-xterm")


#: Python that displays a real PNG (a 3x2 red image, made with the stdlib), and HTML whose script
#: would mark the IDE page if it ever ran there.
RICH_PROGRAM = """import struct, zlib
def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
rows = b''.join(b'\\x00' + b'\\xff\\x00\\x00' * 3 for _ in range(2))
png = (b'\\x89PNG\\r\\n\\x1a\\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 3, 2, 8, 2, 0, 0, 0))
       + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))
print('drawing')
display({'image/png': png, 'text/plain': 'red'}, raw=True)
class Table:
    def _repr_html_(self):
        return ("<b id='cell'>rich cell</b>"
                "<script>parent.document.title = 'pwned'; document.body.dataset.ran = 1</script>")
Table()
"""


# The runtimes whose IDE runs the editor's Python in the agent (a console, no PTY): on a PTY runtime
# the Run button types `python3 file` into the shell, whose output is the terminal's alone.
@pytest.mark.parametrize("runtime", ["wasm"])
def test_rich_output_shows_inline_and_html_stays_sandboxed(page: Any, gateway: Served, runtimes: dict[str, Any],
                                                           shots: Shots, runtime: str) -> None:
    need_runtime(runtimes, runtime)
    log_in(page, base(gateway), KEY)
    start_sandbox(page, runtime)
    console_idle(page)
    title = page.title()
    edit_file(page, "rich.py", RICH_PROGRAM)
    page.click("#run-python")
    wait_for_terminal(page, "drawing")
    panel = page.locator("#rich-output")
    expect(panel).to_be_visible()
    image = panel.locator('figure[data-mime="image/png"] img')
    expect(image).to_have_attribute("alt", "red")
    page.wait_for_function("(img) => img.complete && img.naturalWidth === 3 && img.naturalHeight === 2",
                           arg=image.element_handle())
    frame = panel.locator('figure[data-mime="text/html"] iframe')
    expect(frame).to_have_attribute("sandbox", "")
    expect(page.frame_locator('#rich-items iframe').locator("#cell")).to_have_text("rich cell")
    assert page.frame_locator('#rich-items iframe').locator("body").get_attribute("data-ran") is None, \
        "the html's script did not run, not even inside its frame"
    assert page.title() == title, "nor did it reach the IDE page"
    assert page.locator("#cell").count() == 0, "the html is never part of the IDE's own DOM"
    shots.take(page, f"rich-output-{runtime}")
    page.click("#rich-clear")
    expect(panel).to_be_hidden()
