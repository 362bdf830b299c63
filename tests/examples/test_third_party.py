"""The third-party path for real: pip-install the example package, start `sandgate serve` in a
fresh process, and use the runtime it found through its entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.serving import serve

ROOT = Path(__file__).resolve().parents[2]
KEY = "tp-key"


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
    config = tmp_path / "sandgate.toml"
    config.write_text('[plugins]\nblocked = ["wasm", "microvm"]\n')  # only the installed runtime, for speed
    env = {**os.environ, "PYTHONPATH": str(target), "SANDGATE_API_KEYS": f"{KEY}:tenant",
           "SANDGATE_BLOCKED_PLUGINS": ""}  # the config file's list, not serve()'s default
    with serve(env, "--config", str(config)) as gateway:
        runtimes = gateway.call(KEY, "GET", "/v1/runtimes")
        assert [r["id"] for r in runtimes["runtimes"]] == ["example-local"]
        sandbox = gateway.call(KEY, "POST", "/v1/sandboxes", {"runtime": "example-local"})
        done = gateway.call(KEY, "POST", f"/v1/sandboxes/{sandbox['id']}/exec",
                            {"language": "python", "code": "print('from a plugin')"})
        assert done["stdout"] == "from a plugin\n"
        assert gateway.call(KEY, "DELETE", f"/v1/sandboxes/{sandbox['id']}") is None
        gateway.stop()
