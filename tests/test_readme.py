"""The README's usage examples, run for real against `sandgate serve`: documentation that works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import Served, serve

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
KEY = "readme-test-key"

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


def _block(language: str, starts: str) -> str:
    for block in re.findall(rf"```{language}\n(.*?)```", README, re.S):
        if block.startswith(starts):
            return str(block)
    raise AssertionError(f"no {language} block starting with {starts!r} in README.md")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Served]:
    env = {**os.environ, "SANDGATE_API_KEYS": f"{KEY}:readme", "SANDGATE_STATE_DIR": str(tmp_path / "state")}
    with serve(env) as served:
        yield served
        served.stop()


@pytest.mark.usefixtures("wasm_interpreters")
def test_curl_examples(gateway: Served, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's curl examples cannot run here")
    script = _block("sh", "export KEY=").replace("export KEY=sg_...", f"export KEY={KEY}")
    script = script.replace("localhost:8080", f"localhost:{gateway.port}")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script + "\necho SB=$SB"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"stdout": "3.15' in done.stdout and '"stdout": "42\\n"' in done.stdout
    assert '"stdout": "3.2.0\\n"' in done.stdout and '"stdout": "8.2.0"' in done.stdout
    assert '"stdout": "54\\n"' in done.stdout, done.stdout  # the C example
    assert (tmp_path / "copy.csv").read_text() == "a,b\n1,2\n"
    assert '"guest"' in done.stdout and '"disk_bytes"' in done.stdout


def test_websocket_example(gateway: Served) -> None:
    sandbox_id = gateway.call(KEY, "POST", "/v1/sandboxes", {"runtime": "wasm"})["id"]
    code = _block("python", "import asyncio, json, os, websockets").replace("8080", str(gateway.port))
    env = {**os.environ, "KEY": KEY, "SB": sandbox_id}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    events = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert "'ev': 'start'" in events[0] and "'ev': 'end'" in events[-1] and "'exit_code': 0" in events[-1]


def test_python_sdk_example(gateway: Served) -> None:
    code = _block("python", "from gateway.client import")
    env = {**os.environ, "SANDGATE_URL": f"http://127.0.0.1:{gateway.port}", "SANDGATE_API_KEY": KEY}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines == ["42", "A,B", "1,2", "['data.csv'] 8", "timeout False"], done.stdout
    assert gateway.call(KEY, "GET", "/v1/sandboxes")["sandboxes"] == [], "the with block destroyed it"


def _run_python(block: str, gateway: Served) -> list[str]:
    env = {**os.environ, "SANDGATE_URL": f"http://127.0.0.1:{gateway.port}", "SANDGATE_API_KEY": KEY}
    done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, block + done.stderr
    return done.stdout.splitlines()


#: The functions section's Python blocks (by their first line) and what each prints.
FUNCTION_EXAMPLES = {
    "# invoke:": ["success 42 adding 2 40", "error TypeError"],
    "# ephemeral:": ["42", "hello", "[]"],
    "# deployed functions:": ["1 True", "2 False", "3 False"],
    "# background executions:": ["step 0", "step 1", "step 2", "completed", "cancelled"],
    "# code cache:": ["7", "[1]"],
}


def test_functions_examples(gateway: Served) -> None:
    for starts, expected in FUNCTION_EXAMPLES.items():
        assert _run_python(_block("python", starts), gateway) == expected, starts
    assert gateway.call(KEY, "GET", "/v1/sandboxes")["sandboxes"] == [], "every example cleaned up"
    assert gateway.call(KEY, "GET", "/v1/functions")["functions"] == []


def test_test_mode_example(gateway: Served) -> None:
    assert _run_python(_block("python", "# test mode:"), gateway) == ["False 1 1", "['test_wrong']"]


def test_cli_example(gateway: Served, tmp_path: Path) -> None:
    # `sandgate` is this checkout's CLI (an installed console script may be another copy).
    script = f'sandgate() {{ {sys.executable} -m gateway.cli "$@"; }}\n' + _block("sh", "# sandgate functions")
    env = {**os.environ, "SANDGATE_URL": f"http://127.0.0.1:{gateway.port}", "SANDGATE_API_KEY": KEY,
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert '"result": 42' in done.stdout and '"cold": true' in done.stdout and '"result": 3' in done.stdout
    assert gateway.call(KEY, "GET", "/v1/functions")["functions"] == []
