"""The real agent inside WASM: CPython-for-WASI in wasmtime, through the WASM launcher, with the
host's work folder preopened at /work and stdin/stdout as the channel."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest_agent.agent_harness import AgentClient, SubprocessAgent

pytestmark = pytest.mark.wasm

WASI_CAPABILITIES = ["exec.python", "exec.stdin", "fs", "fs.watch", "metrics"]


@pytest.fixture(scope="session")
def agent_dir() -> Path:
    from plugins.common import TerminalProgress
    from plugins.wasm import artifacts
    from plugins.wasm.agent_dir import stage_agent_dir

    artifacts.ensure_compiled("python", TerminalProgress())  # minutes, the first time
    return stage_agent_dir()


@pytest.fixture
def wasm_agent(root: Path, agent_dir: Path) -> Iterator[SubprocessAgent]:
    from plugins.wasm import artifacts

    argv = [sys.executable, "-m", "plugins.wasm.launcher", "--work", str(root),
            "--agent-dir", str(agent_dir), "--", "python", "-m", "guest_agent", "--root", "/work"]
    agent = SubprocessAgent(root, argv=argv, env=artifacts.child_env())
    yield agent
    agent.stop()


@pytest.fixture
def wasm(wasm_agent: SubprocessAgent) -> AgentClient:
    return wasm_agent.client


def test_hello_is_wasi_without_processes(wasm: AgentClient) -> None:
    result = wasm.request("hello", version=1)
    assert result["platform"] == "wasi"
    assert result["capabilities"] == WASI_CAPABILITIES
    assert wasm.error("exec.start", exec_id="p", command=["ls"])["code"] == "unsupported"
    metrics = wasm.request("metrics")
    assert metrics["execs_running"] == 0 and metrics["memory_bytes"] is None


def test_python_exec_streams_output_and_reads_stdin_from_exec_input(wasm: AgentClient) -> None:
    rid, start = wasm.start(
        exec_id="w", language="python",
        code="import sys\nprint(sys.platform, flush=True)\nname = input()\nprint('hi', name)\nname",
        stdin_open=True,
    )
    assert start["pid"] is None
    assert wasm.event(rid)["data"] == b"wasi\n"  # streamed while the exec waits for stdin
    assert wasm.request("ping") == {}  # answered from inside the stdin read
    assert wasm.error("fs.stat", path=".")["code"] == "busy"
    wasm.request("exec.input", exec_id="w", data=b"wasm\n")
    events = wasm.events(rid)
    assert [e.get("data") for e in events] == [b"hi wasm\n", b"'wasm'\n", None]
    assert [e["seq"] for e in events] == [2, 3, 4]
    assert events[-1]["exit_code"] == 0
    # The namespace persisted; errors are tracebacks with exit code 1.
    assert wasm.python("name.upper()").stdout == "'WASM'\n"
    failed = wasm.python("1/0")
    assert failed.exit_code == 1 and "ZeroDivisionError" in failed.stderr
    assert wasm.python("raise SystemExit(3)").exit_code == 3


def test_fs_ops(wasm: AgentClient, root: Path) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB: several chunks
    assert wasm.request("fs.mkdir", path="d/e") == {}
    assert wasm.request("fs.write", path="d/e/f.bin", data=payload, truncate=True)["size"] == len(payload)
    assert (root / "d" / "e" / "f.bin").read_bytes() == payload
    rid = wasm.send("fs.read", path="/work/d/e/f.bin")
    data, ev = b"", wasm.event(rid)
    assert ev == {"id": rid, "ev": "start", "seq": 0, "size": len(payload)}
    while (ev := wasm.event(rid))["ev"] != "end":
        data += ev["data"]
    assert data == payload and ev["bytes"] == len(payload)
    assert wasm.request("fs.stat", path="d")["type"] == "dir"
    listing = wasm.request("fs.list", path="d", depth=3)["entries"]
    assert [e["path"] for e in listing] == ["e", "e/f.bin"]
    assert wasm.request("fs.move", src="d/e/f.bin", dst="g.bin") == {}
    assert (root / "g.bin").exists()
    assert wasm.error("fs.remove", path="d")["code"] == "io_error"
    assert wasm.request("fs.remove", path="d", recursive=True) == {}
    assert wasm.error("fs.stat", path="d")["code"] == "not_found"
    assert sorted(p.name for p in root.iterdir()) == ["g.bin"]


def test_path_escapes_are_refused(wasm: AgentClient, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (root / "link").symlink_to(outside / "secret")
    assert wasm.error("fs.read", path="../etc/passwd")["code"] == "path_escape"
    assert wasm.error("fs.stat", path="/etc")["code"] == "path_escape"
    assert wasm.error("fs.read", path="link")["code"] == "path_escape"
    assert wasm.error("fs.write", path="link", data=b"x")["code"] == "path_escape"
    assert (outside / "secret").read_text() == "secret"


def test_eof_exits_cleanly(wasm_agent: SubprocessAgent) -> None:
    assert wasm_agent.client.request("ping") == {}
    wasm_agent.close_input()
    assert wasm_agent.wait() == 0


def test_test_mode_runs_the_staged_pytest_and_stops_at_the_timeout(wasm: AgentClient, root: Path) -> None:
    """One thread: the deadline is checked where the exec writes output, inside a test here; the
    run must end there, or the second spinning test would hold the agent for ever."""
    from tests.guest_agent.test_testrun import CODE, run_tests

    result, report = run_tests(wasm, root, CODE, "def test_add():\n    assert add(1, 2) == 4\n", name="first")
    assert report is not None and "assert 3 == 4" in report["tests"][0]["error"], result.stderr
    spin = "def test_spin_1():\n    while True:\n        print('spinning')\n\n" \
           "def test_spin_2():\n    while True:\n        print('still spinning')\n"
    result, report = run_tests(wasm, root, CODE, spin, name="spin", timeout=1.0)
    assert result.end["error"]["code"] == "timeout" and report is None
    assert "still spinning" not in result.stdout
    _, report = run_tests(wasm, root, CODE, "def test_add():\n    assert add(1, 2) == 3\n", name="after")
    assert report is not None and report["success"] is True
