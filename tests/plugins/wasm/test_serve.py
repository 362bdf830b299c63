"""`sandgate serve` as users run it: the generated key, a WASM sandbox, and a SIGTERM that drains and
leaves no process or directory behind."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.serving import serve

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


def test_serve_prints_a_key_and_sigterm_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SANDGATE_API_KEYS"}
    env["SANDGATE_STATE_DIR"] = str(tmp_path / "state")
    with serve(env) as gateway:
        found = re.search(r"API key for this run \(tenant 'default'\): (\S+)", gateway.banner)
        assert found, "serve prints a generated key when none is configured"
        key = found.group(1)
        sandbox = gateway.call(key, "POST", "/v1/sandboxes", {"runtime": "wasm"})
        done = gateway.call(key, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                            {"language": "python", "code": "open('/work/keep.txt', 'w').write('x'); print('ok')"})
        assert done["stdout"] == "ok\n"
        host = gateway.call(key, "GET", f"/v1/sandboxes/{sandbox['id']}/metrics")["host"]
        pid, holder = host["pid"], host["holder_pid"]
        # /work is a tmpfs only the sandbox's disk holder sees: not on the host's disk.
        assert not list((tmp_path / "state" / "wasm").rglob("keep.txt"))
        assert len(list(Path(f"/proc/{holder}/root/{tmp_path}/state/wasm").rglob("keep.txt"))) == 1
        log = gateway.stop()
    assert not Path(f"/proc/{pid}").exists(), "the sandbox's launcher is gone"
    assert not Path(f"/proc/{holder}").exists(), "the sandbox's disk holder is gone"
    assert not list((tmp_path / "state" / "wasm").rglob("*")), f"every sandbox and pool directory is gone: {log}"
