"""The agent without threads (the WASI code paths, run on the host) and with pure-Python msgpack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.wire import PROTOCOL_VERSION
from tests.guest_agent.agent_harness import AgentClient, SubprocessAgent, agent_env


@pytest.fixture
def single(root: Path) -> Iterator[AgentClient]:
    agent = SubprocessAgent(root, "--single-thread")
    yield agent.client
    agent.stop()


def test_single_thread_capabilities(single: AgentClient) -> None:
    result = single.request("hello", version=PROTOCOL_VERSION)
    assert result["capabilities"] == ["exec.python", "exec.stdin", "fs", "fs.watch", "metrics"]


def test_single_thread_refuses_processes(single: AgentClient) -> None:
    assert single.error("exec.start", exec_id="p", command=["true"])["code"] == "unsupported"
    assert single.request("ping") == {}


def test_single_thread_python_streams_and_reads_stdin_from_the_channel(single: AgentClient) -> None:
    rid, _ = single.start(
        exec_id="w",
        language="python",
        code="print('ask', flush=True)\nprint(input() * 2)",
        stdin_open=True,
    )
    assert single.event(rid)["data"] == b"ask\n"
    # The exec is blocked in input(): the agent reads frames right there.
    assert single.request("ping") == {}
    assert single.request("exec.list")["execs"][0]["running"] is True
    busy = single.error("fs.stat", path=".")
    assert busy["code"] == "busy" and busy["retryable"] is True
    assert single.error("exec.start", exec_id="other", language="python", code="1")["code"] == "busy"
    single.request("exec.input", exec_id="w", data=b"ab\n")
    events = single.events(rid)
    assert events[0]["data"] == b"abab\n"
    assert events[-1]["exit_code"] == 0
    assert single.request("fs.stat", path=".")["type"] == "dir"  # served again


def test_single_thread_requests_queue_while_python_runs(single: AgentClient) -> None:
    rid = single.send("exec.start", exec_id="q", language="python", code="sum(range(10**6))")
    ping = single.send("ping")
    assert [e["ev"] for e in single.events(rid)][-1] == "end"
    assert single.next_for(ping) == {"id": ping, "result": {}}


def test_single_thread_stdin_eof_and_timeout(single: AgentClient) -> None:
    rid, _ = single.start(
        exec_id="e", language="python", code="import sys\nprint(sys.stdin.read())", stdin=b"given", stdin_open=True
    )
    single.request("exec.close_stdin", exec_id="e")
    assert single.events(rid)[0]["data"] == b"given\n"
    result = single.python("import time\nwhile True:\n    print('tick')", timeout=0.2)
    assert result.end["error"]["code"] == "timeout"
    assert "TimeoutError" in result.stderr
    assert single.python("'alive'").stdout == "'alive'\n"


def test_single_thread_fs_read_stream(single: AgentClient, root: Path) -> None:
    (root / "f").write_bytes(b"x" * 200_000)
    rid = single.send("fs.read", path="f")
    events = [single.event(rid)]
    while events[-1]["ev"] != "end":
        events.append(single.event(rid))
    assert events[-1]["bytes"] == 200_000


def test_pure_python_msgpack(root: Path) -> None:
    agent = SubprocessAgent(root, env=agent_env(MSGPACK_PUREPYTHON="1"))
    client = agent.client
    try:
        assert "exec.python" in client.request("hello", version=PROTOCOL_VERSION)["capabilities"]
        result = client.python("import msgpack\nmsgpack.Packer.__module__")
        assert result.stdout == "'msgpack.fallback'\n"
        payload = bytes(range(256)) * 1000
        client.request("fs.write", path="p", data=payload)
        rid = client.send("fs.read", path="p")
        data = b""
        while (ev := client.event(rid))["ev"] != "end":
            data += ev.get("data", b"")
        assert data == payload
        assert client.run(command=["echo", "ok"]).stdout == "ok\n"
    finally:
        agent.stop()
