"""The JavaScript side under Node: the unit tests in tests/js, and the README's JavaScript client
example run for real against `sandgate serve`, imported by its package name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import Served, serve

ROOT = Path(__file__).resolve().parents[2]
KEY = "js-test-key"
NODE = shutil.which("node")


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
    env = {**os.environ, "SANDGATE_API_KEYS": f"{KEY}:js", "SANDGATE_STATE_DIR": str(tmp_path / "state")}
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
    sandbox destroyed while the client was cut off, bad input."""
    node = _node()
    env = {**os.environ, "SANDGATE_TEST_URL": f"http://127.0.0.1:{gateway.port}", "SANDGATE_TEST_KEY": KEY}
    done = subprocess.run([node, *_websocket_flags(node), "--test", str(ROOT / "tests" / "js" / "client.test.mjs")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^# pass 3$", done.stdout, re.M), done.stdout
