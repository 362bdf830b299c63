"""The third-party path for real: pip-install the example package, start `sandgate serve` in a
fresh process, and use the runtime it found through its entry point."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": "Bearer tp-key", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None


def test_installed_example_runtime_is_found_through_its_entry_point(tmp_path: Path) -> None:
    target = tmp_path / "site"
    source = tmp_path / "src"  # a copy: building in place would leave egg-info on the test path
    shutil.copytree(ROOT / "examples" / "sandgate-example-runtime", source)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, timeout=300,
    )
    assert list(target.glob("sandgate_example_runtime-*.dist-info"))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(target), "SANDGATE_API_KEYS": "tp-key:tenant"}
    config = tmp_path / "sandgate.toml"
    config.write_text('[plugins]\nblocked = ["wasm"]\n')  # only the installed runtime, for speed
    with subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    ) as proc:
        _use_gateway(proc, port)


def _use_gateway(proc: subprocess.Popen[str], port: int) -> None:
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # aiohttp prints this once it listens
            if "Running on" in line:
                break
        else:
            raise AssertionError("the gateway exited before listening")
        status, runtimes = _call(port, "GET", "/v1/runtimes")
        assert [r["id"] for r in runtimes["runtimes"]] == ["example-local"]
        status, sandbox = _call(port, "POST", "/v1/sandboxes", {"runtime": "example-local"})
        assert status == 201
        status, done = _call(port, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                             {"language": "python", "code": "print('from a plugin')"})
        assert done["stdout"] == "from a plugin\n"
        status, _ = _call(port, "DELETE", f"/v1/sandboxes/{sandbox['id']}")
        assert status == 204
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0, "SIGTERM drains and exits cleanly"
