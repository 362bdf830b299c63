"""The JavaScript side under Node: the unit tests in tests/js, and the README's JavaScript client
example run for real against `sandgate serve`, imported by its package name."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import sandgate_example_runtime
from aiohttp.test_utils import TestServer

from gateway.config import Functions
from gateway.web.app import create_app
from tests.client.conftest import KEY as LOCAL_KEY
from tests.client.conftest import OTHER_KEY as LOCAL_OTHER_KEY
from tests.client.conftest import only, settings
from tests.serving import Served, serve

ROOT = Path(__file__).resolve().parents[2]
KEY = "js-test-key"
OTHER_KEY = "js-test-key-other-tenant"
NODE = shutil.which("node")
FUNCTIONS_TESTS = ROOT / "tests" / "js" / "functions.test.mjs"


def _node() -> str:
    if NODE is None:
        pytest.skip("node is not installed: the JavaScript tests need Node.js 20+")
    return NODE


def _websocket_flags(node: str) -> list[str]:
    """Node 20 has WebSocket behind a flag; later versions have it on."""
    has_it = subprocess.run([node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
                            timeout=30).returncode == 0
    return [] if has_it else ["--experimental-websocket"]


def test_js_unit_tests() -> None:
    done = subprocess.run([_node(), "--test", str(ROOT / "tests" / "js" / "pyconsole.test.mjs")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^# fail 0$", done.stdout, re.M), done.stdout


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Served]:
    env = {**os.environ, "SANDGATE_API_KEYS": f"{KEY}:js,{OTHER_KEY}:js-other",
           "SANDGATE_STATE_DIR": str(tmp_path / "state"), "SANDGATE_DATA_DIR": str(tmp_path / "data")}
    with serve(env) as served:
        yield served
        served.stop()


@pytest.mark.wasm
@pytest.mark.usefixtures("wasm_compiled")
def test_readme_javascript_example(gateway: Served, tmp_path: Path) -> None:
    node = _node()
    readme = (ROOT / "README.md").read_text()
    [block] = [b for b in re.findall(r"```js\n(.*?)```", readme, re.S) if "@sandgate/client" in b]
    # Installed the way the README says (a package in node_modules), found by its name.
    package = tmp_path / "node_modules" / "@sandgate"
    package.mkdir(parents=True)
    (package / "client").symlink_to(ROOT / "gateway" / "web" / "js")
    (tmp_path / "demo.mjs").write_text(block.replace("127.0.0.1:8080", f"127.0.0.1:{gateway.port}"))
    done = subprocess.run([node, *_websocket_flags(node), "demo.mjs"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "KEY": KEY})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("0\n1\n2\n"), done.stdout
    assert "exitCode: 0" in done.stdout and "hi from JS" in done.stdout, done.stdout
    assert gateway.call(KEY, "GET", "/v1/sandboxes")["sandboxes"] == [], "the example destroyed its sandbox"


@pytest.mark.wasm
@pytest.mark.usefixtures("wasm_compiled")
def test_js_client_against_the_gateway(gateway: Served) -> None:
    """tests/js/client.test.mjs: a stalled connection found out by its ping, a stream resumed, a
    sandbox destroyed while the client was cut off, a watch resumed, bad input, display bundles on
    both wires, volumes and absolute paths over REST."""
    node = _node()
    env = {**os.environ, "SANDGATE_TEST_URL": f"http://127.0.0.1:{gateway.port}", "SANDGATE_TEST_KEY": KEY}
    done = subprocess.run([node, *_websocket_flags(node), "--test", str(ROOT / "tests" / "js" / "client.test.mjs")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^# pass 6$", done.stdout, re.M), done.stdout


def _passed(output: str, count: int) -> None:
    assert re.search(rf"^# pass {count}$", output, re.M) and re.search(r"^# fail 0$", output, re.M), output


@pytest.mark.wasm
@pytest.mark.usefixtures("wasm_compiled")
def test_js_functions_on_wasm(gateway: Served) -> None:
    """tests/js/functions.test.mjs on real WASM sandboxes, JavaScript functions and test mode included
    (the tests that wait on host files need the example runtime: skipped here)."""
    node = _node()
    env = {**os.environ, "SANDGATE_TEST_URL": f"http://127.0.0.1:{gateway.port}", "SANDGATE_TEST_KEY": KEY,
           "SANDGATE_TEST_OTHER_KEY": OTHER_KEY, "SANDGATE_TEST_RUNTIME": "wasm"}
    done = subprocess.run([node, *_websocket_flags(node), "--test", str(FUNCTIONS_TESTS)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    _passed(done.stdout, 6)


async def test_js_functions_on_the_example_runtime(aiohttp_server: Callable[..., Awaitable[TestServer]],
                                                   tmp_path: Path) -> None:
    """The same file against an in-process gateway on the example runtime, whose calls can wait for
    a file the JavaScript test creates: a full function queue (429 with retryAfter) and a running
    execution are produced without timing."""
    node = _node()
    app = create_app(settings(blocked_plugins=only("example-local"), default_runtime="example-local",
                              functions=Functions(queue_per_instance=1, queue_wait_s=30.0)),
                     plugins=[sandgate_example_runtime])
    server = await aiohttp_server(app)
    env = {**os.environ, "SANDGATE_TEST_URL": f"http://127.0.0.1:{server.port}", "SANDGATE_TEST_KEY": LOCAL_KEY,
           "SANDGATE_TEST_OTHER_KEY": LOCAL_OTHER_KEY, "SANDGATE_TEST_RUNTIME": "example-local",
           "SANDGATE_TEST_FLAGS": str(tmp_path)}
    flags = await asyncio.to_thread(_websocket_flags, node)
    proc = await asyncio.create_subprocess_exec(node, *flags, "--test", str(FUNCTIONS_TESTS), env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    async with asyncio.timeout(110):
        output = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, output
    _passed(output, 6)


async def test_js_ports(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    """tests/js/ports.test.mjs: `sandbox.ports` against an in-process gateway whose runtime (the
    agent as a host process, tests/gateway/test_ports.py's) publishes ports; the "sandbox's server"
    is one of this test's on the host's loopback."""
    from aiohttp import web

    from tests.gateway.test_ports import _Plugin

    async def serve_page(request: web.Request) -> web.Response:
        return web.Response(text=f"served {request.path}")

    node = _node()
    guest_app = web.Application()
    guest_app.router.add_get("/{tail:.*}", serve_page)
    guest = await aiohttp_server(guest_app, host="127.0.0.1")
    app = create_app(settings(blocked_plugins=("wasm", "microvm", "pod"), default_runtime="local-ports"),
                     plugins=[_Plugin()])
    server = await aiohttp_server(app)
    env = {**os.environ, "SANDGATE_TEST_URL": f"http://127.0.0.1:{server.port}", "SANDGATE_TEST_KEY": LOCAL_KEY,
           "SANDGATE_TEST_PORT": str(guest.port)}
    flags = await asyncio.to_thread(_websocket_flags, node)
    proc = await asyncio.create_subprocess_exec(node, *flags, "--test", str(ROOT / "tests" / "js" / "ports.test.mjs"),
                                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    async with asyncio.timeout(110):
        output = (await proc.communicate())[0].decode()
    assert proc.returncode == 0, output
    _passed(output, 1)
