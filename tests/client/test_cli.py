"""The CLI's client commands (`sandgate invoke`, `test`, `functions`, `executions`, `cache`) as users
run them: `python -m gateway.cli` subprocesses against `sandgate serve` running as a real subprocess
with the WASM runtime, the gateway and key from SANDGATE_URL and SANDGATE_API_KEY."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serving import Served, serve

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

KEY = "cli-test-key"
ADD = "def add(a, b=0):\n    print('adding', a, b)\n    return a + b\n"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    env = {**os.environ, "SANDGATE_API_KEYS": f"{KEY}:cli", "SANDGATE_STATE_DIR": str(tmp_path_factory.mktemp("s"))}
    with serve(env) as served:
        yield served
        served.stop()


class Cli:
    def __init__(self, gateway: Served, cwd: Path) -> None:
        self.env = {**os.environ, "SANDGATE_URL": f"http://127.0.0.1:{gateway.port}", "SANDGATE_API_KEY": KEY}
        self.cwd = cwd

    def run(self, *args: str, status: int = 0, stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                              timeout=120, cwd=self.cwd, input=stdin, env=env or self.env)
        assert done.returncode == status, (args, done.returncode, done.stdout, done.stderr)
        return done

    def json(self, *args: str, status: int = 0, stdin: str | None = None) -> Any:
        return json.loads(self.run(*args, status=status, stdin=stdin).stdout)


@pytest.fixture
def cli(gateway: Served, tmp_path: Path) -> Cli:
    (tmp_path / "add.py").write_text(ADD)
    return Cli(gateway, tmp_path)


def test_functions_deploy_list_get_invoke_delete(cli: Cli) -> None:
    deployed = cli.json("functions", "deploy", "adder", "--file", "add.py", "--function", "add", "--runtime", "wasm",
                        "--max-instances", "2", "--env", "MODE=cli")
    assert deployed["name"] == "adder" and deployed["max_instances"] == 2 and deployed["env"] == {"MODE": "cli"}
    assert [f["name"] for f in cli.json("functions", "list")["functions"]] == ["adder"]
    done = cli.json("functions", "invoke", "adder", "--args", "[2]", "--kwargs", '{"b": 40}')
    assert (done["status"], done["result"], done["cold"], done["stdout"]) == ("success", 42, True, "adding 2 40\n")
    assert cli.json("functions", "get", "adder")["instances"][0]["id"] == done["instance"]
    failed = cli.json("functions", "invoke", "adder", "--args", '["a", 1]', status=1)
    assert failed["status"] == "error" and failed["error"]["type"] == "TypeError", "a failed call exits 1"
    cli.run("functions", "delete", "adder")
    gone = cli.run("functions", "get", "adder", status=1)
    assert gone.stderr.startswith("sandgate functions get: not_found: ") and gone.stdout == ""


def test_invoke_and_test(cli: Cli, gateway: Served) -> None:
    done = cli.json("invoke", "add", "--file", "-", "--args", "[1, 2]", "--runtime", "wasm", stdin=ADD)
    assert (done["status"], done["result"]) == ("success", 3)
    sandbox = gateway.call(KEY, "POST", "/v1/sandboxes", {"runtime": "wasm"})["id"]
    done = cli.json("invoke", "greet", "--sandbox", sandbox, "--language", "javascript", "--args", '["ada"]',
                    "--code", "function greet(name) { return 'hi ' + name; }")
    assert done["result"] == "hi ada"
    late = cli.json("invoke", "f", "--sandbox", sandbox, "--timeout", "1",
                    "--code", "def f():\n    while True:\n        pass\n", status=1)
    assert late["status"] == "timeout"

    (cli.cwd / "tests.js").write_text("test('adds', () => { assert.is(add(1, 2), 3); });\n")
    js = "function add(a, b) { return a + b; }"
    report = cli.json("test", "--sandbox", sandbox, "--language", "javascript", "--code", js, "--tests", "tests.js")
    assert report["success"] is True and report["summary"]["passed"] == 1
    (cli.cwd / "wrong.js").write_text("test('wrong', () => { assert.is(add(1, 1), 3); });\n")
    report = cli.json("test", "--runtime", "wasm", "--language", "javascript", "--code", js, "--tests", "wrong.js",
                      status=1)
    assert report["summary"]["failed"] == 1, "a failing test exits 1"
    assert [s["id"] for s in gateway.call(KEY, "GET", "/v1/sandboxes")["sandboxes"]] == [sandbox], \
        "the test's own sandbox was destroyed"
    gateway.call(KEY, "DELETE", f"/v1/sandboxes/{sandbox}")


def test_executions_and_cache(cli: Cli, gateway: Served) -> None:
    sandbox = gateway.call(KEY, "POST", "/v1/sandboxes", {"runtime": "wasm"})["id"]
    started = cli.json("executions", "start", sandbox, "--code", "print('one')\nprint('two')", "--tag", "job")
    done = cli.json("executions", "get", sandbox, started["id"], "--wait", "--timeout", "60")
    assert (done["state"], done["stdout"], done["tag"]) == ("completed", "one\ntwo\n", "job")
    rest = cli.json("executions", "get", sandbox, started["id"], "--output-offset", str(done["output_offset"]))
    assert rest["stdout"] == ""
    followed = cli.run("executions", "start", sandbox, "--code", "import sys\nprint('out')\nprint('err', "
                       "file=sys.stderr)\nraise SystemExit(3)", "--follow", status=3)
    assert followed.stdout == "out\n" and followed.stderr.startswith("err\n")
    assert "failed (exit 3)" in followed.stderr
    spin = cli.json("executions", "start", sandbox, "--code", "while True: pass")
    assert cli.json("executions", "cancel", sandbox, spin["id"])["state"] == "cancelled"
    listed = cli.json("executions", "list", sandbox, "--state", "completed")["executions"]
    assert [e["id"] for e in listed] == [started["id"]]

    entries = cli.json("cache", "list")["entries"]
    digest = next(e["hash"] for e in entries if e["bytes"] == len("while True: pass"))
    ran = cli.json("executions", "start", sandbox, "--code-ref", digest, "--timeout", "1")
    assert cli.json("executions", "get", sandbox, ran["id"], "--wait")["state"] == "timeout"
    cli.run("cache", "delete", digest)
    assert cli.run("cache", "delete", digest, status=1).stderr.startswith("sandgate cache delete: not_found")
    cli.run("cache", "clear")
    assert cli.json("cache", "list") == {"entries": []}
    gateway.call(KEY, "DELETE", f"/v1/sandboxes/{sandbox}")


def test_usage_errors(cli: Cli) -> None:
    no_key = cli.run("functions", "list", status=1, env={k: v for k, v in cli.env.items() if k != "SANDGATE_API_KEY"})
    assert "SANDGATE_API_KEY" in no_key.stderr
    assert "is not JSON" in cli.run("invoke", "f", "--code", "1", "--args", "[1,", status=2).stderr
    assert "JSON array" in cli.run("functions", "invoke", "f", "--args", "{}", status=2).stderr
    assert "give the code" in cli.run("invoke", "f", status=2).stderr
    assert "NAME=VALUE" in cli.run("functions", "deploy", "f", "--code", "1", "--env", "X", status=2).stderr
    refused = cli.run("functions", "deploy", "bad name", "--code", ADD, "--function", "add", status=1)
    assert refused.stderr.startswith("sandgate functions deploy: bad_request: ")
    cli.run("functions", "wat", status=2)  # argparse's own refusal
