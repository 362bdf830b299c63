"""Handshake, liveness, dispatch errors, framing errors and the agent's exit."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tty
from pathlib import Path

from guest_agent import languages
from guest_agent.wire import PROTOCOL_VERSION, encode_frame, pack
from tests.guest_agent.agent_harness import (
    READ_TIMEOUT,
    AgentClient,
    SubprocessAgent,
    agent_env,
    wait_gone,
)

HOST_CAPABILITIES = [
    "exec.python",
    # the languages whose programs this host has (tests/guest_agent/test_agent_languages.py)
    *(f"exec.{lang}" for lang in languages.offered_by_programs(shutil.which) if lang != "python"),
    "exec.process",
    "exec.stdin",
    "exec.signal",
    "exec.pty",
    "exec.concurrent",
    "fs",
    "fs.watch",
    "metrics",
    "net.connect",
]


def test_hello_advertises_the_host_capabilities(client: AgentClient) -> None:
    result = client.request("hello", version=PROTOCOL_VERSION)
    assert result["version"] == PROTOCOL_VERSION
    assert result["agent"].startswith("sandgate-guest/")
    assert result["capabilities"] == HOST_CAPABILITIES
    assert result["platform"] == "linux"
    assert result["max_frame"] == 1 << 20


def test_hello_with_another_version_is_unsupported(client: AgentClient) -> None:
    assert client.error("hello", version=99)["code"] == "unsupported"
    assert client.request("ping") == {}


def test_ping(client: AgentClient) -> None:
    assert client.request("ping") == {}


def test_unknown_op(client: AgentClient) -> None:
    error = client.error("exec.teleport")
    assert error["code"] == "unknown_op"
    assert error["retryable"] is False


def test_bad_fields_are_bad_request_and_the_agent_goes_on(client: AgentClient) -> None:
    cases: list[tuple[str, dict[str, object]]] = [
        ("fs.stat", {}),
        ("fs.stat", {"path": 5}),
        ("fs.write", {"path": "a", "data": "not bytes"}),
        ("fs.list", {"path": ".", "depth": 0}),
        ("hello", {"version": "1"}),
        ("exec.start", {"exec_id": "a", "command": ["true"], "code": "1", "language": "python"}),
        ("exec.start", {"exec_id": "a"}),
        ("exec.start", {"command": ["true"]}),
        ("exec.start", {"exec_id": "a", "command": []}),
        ("exec.start", {"exec_id": "a", "command": ["true"], "env": {"A": 1}}),
        ("exec.start", {"exec_id": "a", "command": ["true"], "timeout": -1}),
        ("exec.start", {"exec_id": "a", "command": ["true"], "pty": {"rows": 0, "cols": 80}}),
        ("exec.signal", {"exec_id": "a", "signal": "SIGNOPE"}),
        ("exec.input", {"exec_id": "a"}),
    ]
    for op, fields in cases:
        error = client.error(op, **fields)
        assert error["code"] == "bad_request", (op, fields, error)
    assert client.request("ping") == {}


def test_messages_that_are_not_requests(client: AgentClient) -> None:
    client.write(encode_frame({"id": "seven", "op": "ping"}))
    assert client.next_for(None)["error"]["code"] == "bad_request"
    client.write(encode_frame({"id": 3, "result": {}}))
    assert client.next_for(3)["error"]["code"] == "bad_request"
    client.write(encode_frame({"op": "ping"}))
    assert client.next_for(None)["error"]["code"] == "bad_request"
    assert client.request("ping") == {}


def test_unknown_exec_ids_are_not_found(client: AgentClient) -> None:
    for op, extra in [
        ("exec.input", {"data": b"x"}),
        ("exec.close_stdin", {}),
        ("exec.signal", {"signal": "SIGTERM"}),
        ("exec.resize", {"rows": 2, "cols": 2}),
    ]:
        assert client.error(op, exec_id="nope", **extra)["code"] == "not_found"


def test_exec_list_shows_running_and_finished_execs(client: AgentClient) -> None:
    done = client.run(exec_id="done", command="exit 3", tag="t1")
    assert done.exit_code == 3
    rid, start = client.start(exec_id="live", command=["cat"], stdin_open=True)
    execs = {e["exec_id"]: e for e in client.request("exec.list")["execs"]}
    assert execs["done"] == {
        "exec_id": "done",
        "tag": "t1",
        "pid": done.events[0]["pid"],
        "running": False,
        "exit_code": 3,
    }
    assert execs["live"]["running"] is True and execs["live"]["pid"] == start["pid"]
    client.request("exec.close_stdin", exec_id="live")
    assert client.events(rid)[-1]["exit_code"] == 0
    assert client.request("exec.list")["execs"][-1]["running"] is False


def test_a_running_exec_id_cannot_be_reused(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="same", command=["cat"], stdin_open=True)
    assert client.error("exec.start", exec_id="same", command=["true"])["code"] == "exists"
    client.request("exec.close_stdin", exec_id="same")
    client.events(rid)
    assert client.run(exec_id="same", command=["true"]).exit_code == 0


def test_metrics(client: AgentClient) -> None:
    metrics = client.request("metrics")
    assert set(metrics) == {"uptime_s", "cpu_s", "memory_bytes", "disk_bytes", "execs_running"}
    assert metrics["uptime_s"] >= 0
    assert metrics["execs_running"] == 0
    assert isinstance(metrics["memory_bytes"], int) and metrics["memory_bytes"] > 0
    assert isinstance(metrics["disk_bytes"], int)
    rid, _ = client.start(command=["cat"], stdin_open=True, exec_id="m")
    assert client.request("metrics")["execs_running"] == 1
    client.request("exec.close_stdin", exec_id="m")
    client.events(rid)


def test_malformed_frame_closes_the_channel(proc_agent: SubprocessAgent) -> None:
    client = proc_agent.client
    assert client.request("ping") == {}
    body = b"\x93\x01\x02\x03"  # a msgpack array, not a map
    client.write(struct.pack(">I", len(body)) + body)
    said = client.read_until_eof()
    assert [m["error"]["code"] for m in said] == ["bad_frame"]
    assert proc_agent.wait() == 2


def test_undecodable_frame_closes_the_channel(proc_agent: SubprocessAgent) -> None:
    client = proc_agent.client
    body = pack({"id": 1, "op": "ping"}) + b"\xc1"  # trailing garbage
    client.write(struct.pack(">I", len(body)) + body)
    assert [m["error"]["code"] for m in client.read_until_eof()] == ["bad_frame"]
    assert proc_agent.wait() == 2


def test_frame_above_max_frame_is_refused_before_its_body(proc_agent: SubprocessAgent) -> None:
    client = proc_agent.client
    client.write(struct.pack(">I", (1 << 20) + 1) + b"\x80")  # header only: no body is needed
    assert [m["error"]["code"] for m in client.read_until_eof()] == ["frame_too_large"]
    assert proc_agent.wait() == 2


def test_eof_exits_0_and_kills_every_process(root: Path) -> None:
    agent = SubprocessAgent(root)
    client = agent.client
    _, running = client.start(command=["sleep", "100"])
    # A finished exec that left a background process behind (its group is killed too).
    left = client.run(command="sleep 100 >/dev/null 2>&1 & echo $!")
    orphan = int(left.stdout)
    agent.close_input()
    assert agent.wait() == 0
    assert wait_gone(running["pid"])
    assert wait_gone(orphan)
    agent.stop()


def test_device_channel(root: Path) -> None:
    # A pty stands in for a serial port, opened by path.
    master, slave = os.openpty()
    tty.setraw(slave)  # before the agent is up too: else the pty echoes our first request back
    proc = subprocess.Popen(
        [sys.executable, "-m", "guest_agent", "--root", str(root), "--device", os.ttyname(slave)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=agent_env(),
    )
    try:
        client = AgentClient(master, master)
        assert client.request("ping") == {}
        binary = bytes(range(256)) * 4  # every byte value survives: no line discipline
        client.request("fs.write", path="b", data=binary)
        assert client.python("open('b', 'rb').read() == bytes(range(256)) * 4").stdout == "True\n"
    finally:
        proc.kill()
        proc.wait(READ_TIMEOUT)
        os.close(master)
        os.close(slave)


def test_fd_channel(root: Path) -> None:
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guest_agent",
            "--root",
            str(root),
            "--fd-in",
            str(to_agent_r),
            "--fd-out",
            str(from_agent_w),
        ],
        pass_fds=(to_agent_r, from_agent_w),
        stdin=subprocess.DEVNULL,
        env=agent_env(),
    )
    os.close(to_agent_r)
    os.close(from_agent_w)
    client = AgentClient(from_agent_r, to_agent_w)
    assert client.request("ping") == {}
    os.close(to_agent_w)
    assert proc.wait(READ_TIMEOUT) == 0
    os.close(from_agent_r)
