"""`sandgate serve` as users run it: the generated key, a WASM sandbox, and a SIGTERM that drains and
leaves no process or directory behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(port: int, key: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


def test_serve_prints_a_key_and_sigterm_cleans_up(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "SANDGATE_API_KEYS"}
    env["SANDGATE_STATE_DIR"] = str(tmp_path / "state")
    with subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        key = None
        for line in proc.stdout:
            found = re.search(r"API key for this run \(tenant 'default'\): (\S+)", line)
            key = found.group(1) if found else key
            if "Running on" in line:
                break
        assert key, "serve prints a generated key when none is configured"
        sandbox = _call(port, key, "POST", "/v1/sandboxes", {"runtime": "wasm"})
        done = _call(port, key, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                     {"language": "python", "code": "open('/work/keep.txt', 'w').write('x'); print('ok')"})
        assert done["stdout"] == "ok\n"
        pid = _call(port, key, "GET", f"/v1/sandboxes/{sandbox['id']}/metrics")["host"]["pid"]
        work_dirs = [p for p in (tmp_path / "state" / "wasm").rglob("keep.txt")]
        assert len(work_dirs) == 1
        proc.send_signal(signal.SIGTERM)
        log = proc.stdout.read()
        assert proc.wait(timeout=60) == 0, log
    assert not Path(f"/proc/{pid}").exists(), "the sandbox's launcher is gone"
    assert not list((tmp_path / "state" / "wasm").rglob("*")), f"every sandbox and pool directory is gone: {log}"
