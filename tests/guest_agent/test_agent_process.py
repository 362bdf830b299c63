"""Process execs: argv, shell strings, stdin, env, cwd, signals, timeouts, ptys."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.guest_agent.agent_harness import AgentClient, SubprocessAgent, wait_gone


def test_argv(client: AgentClient) -> None:
    result = client.run(command=["echo", "hello", "two words"])
    assert (result.exit_code, result.signal, result.stdout) == (0, None, "hello two words\n")
    assert isinstance(result.events[0]["pid"], int)
    assert result.end["duration_ms"] >= 0 and "error" not in result.end


def test_shell_string_exit_code(client: AgentClient) -> None:
    assert client.run(command="exit 5").exit_code == 5


def test_stderr_is_separate(client: AgentClient) -> None:
    result = client.run(command="echo out; echo err >&2")
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_command_not_found(client: AgentClient) -> None:
    error = client.error("exec.start", exec_id="nf", command=["definitely-not-a-command-xyz"])
    assert error["code"] == "not_found"


def test_stdin_field(client: AgentClient) -> None:
    assert client.run(command=["cat"], stdin=b"piped\x00bytes").out() == b"piped\x00bytes"


def test_stdin_via_exec_input(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="cat", command=["cat"], stdin=b"a", stdin_open=True)
    assert client.event(rid)["data"] == b"a"  # echoed while stdin is still open
    client.request("exec.input", exec_id="cat", data=b"b")
    assert client.event(rid)["data"] == b"b"
    client.request("exec.close_stdin", exec_id="cat")
    assert client.event(rid)["exit_code"] == 0
    assert client.error("exec.input", exec_id="cat", data=b"x")["code"] == "not_found"


def test_stdin_is_closed_by_default(client: AgentClient) -> None:
    assert client.run(command=["cat"]).out() == b""


def test_env_is_merged_over_a_minimal_env(client: AgentClient, root: object) -> None:
    result = client.run(command="echo $GREETING; echo $HOME; echo $LANG; echo ${TERM:-none}", env={"GREETING": "hi"})
    greeting, home, lang, term = result.stdout.splitlines()
    assert (greeting, lang, term) == ("hi", "C.UTF-8", "none")
    assert home == str(root)


def test_cwd_defaults_to_the_root_and_may_be_relative(client: AgentClient, root: object) -> None:
    assert client.run(command=["pwd"]).stdout == f"{root}\n"
    client.request("fs.mkdir", path="sub/dir")
    assert client.run(command=["pwd"], cwd="sub/dir").stdout == f"{root}/sub/dir\n"
    assert client.error("exec.start", exec_id="c", command=["pwd"], cwd="missing")["code"] == "not_found"
    client.request("fs.write", path="f", data=b"")
    assert client.error("exec.start", exec_id="c", command=["pwd"], cwd="f")["code"] == "not_a_directory"


def test_sigterm_reports_the_signal(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="s", command=["sleep", "100"])
    assert client.request("exec.signal", exec_id="s", signal="SIGTERM") == {}
    end = client.event(rid)
    assert (end["ev"], end["exit_code"], end["signal"]) == ("end", None, "SIGTERM")


def test_signal_reaches_the_whole_process_group(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="g", command="sleep 100 & echo $!; wait")
    child = int(client.event(rid)["data"])
    client.request("exec.signal", exec_id="g", signal=9)
    assert client.event(rid)["signal"] == "SIGKILL"
    assert wait_gone(child)


def test_timeout_kills_the_process_group(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="t", command="sleep 100 & echo $!; sleep 100", timeout=0.5)
    child = int(client.event(rid)["data"])
    end = client.event(rid)
    assert end["ev"] == "end"
    assert end["error"]["code"] == "timeout"
    assert (end["exit_code"], end["signal"]) == (None, "SIGKILL")
    assert wait_gone(child)


def test_exec_ends_when_the_process_exits_even_if_a_descendant_holds_its_pipes(
    client: AgentClient,
) -> None:
    result = client.run(command="sleep 100 & echo started")
    assert (result.exit_code, result.stdout) == (0, "started\n")


def test_heavy_output_arrives_whole_in_order(client: AgentClient) -> None:
    size = 5_000_000
    result = client.run(
        command=[sys.executable, "-c", f"import sys; sys.stdout.buffer.write(bytes(range(256)) * {size // 256})"]
    )
    data = [e["data"] for e in result.events if e["ev"] == "data"]
    assert all(len(d) <= 64 * 1024 for d in data)
    assert result.out() == bytes(range(256)) * (size // 256)


def test_stdin_that_is_not_read_is_bounded(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="full", command=["sleep", "100"], stdin_open=True)
    chunk = b"x" * (512 * 1024)
    for _ in range(8):  # the pipe (64 KiB) and the agent's buffer (1 MiB) fill up
        reply = client.call("exec.input", exec_id="full", data=chunk)
        if "error" in reply:
            break
    assert reply["error"]["code"] == "busy" and reply["error"]["retryable"] is True
    client.request("exec.signal", exec_id="full", signal="SIGKILL")
    assert client.event(rid)["signal"] == "SIGKILL"


def test_concurrent_processes(client: AgentClient) -> None:
    first, _ = client.start(exec_id="a", command=["cat"], stdin_open=True)
    second = client.run(command=["echo", "b"])
    assert second.stdout == "b\n"
    client.request("exec.close_stdin", exec_id="a")
    assert client.event(first)["exit_code"] == 0


# -- pty ----------------------------------------------------------------------------------------


def test_pty_is_a_terminal(client: AgentClient) -> None:
    result = client.run(
        command=[
            sys.executable,
            "-c",
            "import os, sys; print(sys.stdin.isatty(), sys.stdout.isatty(), os.environ['TERM'])",
        ],
        pty={"rows": 24, "cols": 80},
    )
    assert result.exit_code == 0
    assert {e["fd"] for e in result.events if e["ev"] == "data"} == {"pty"}
    assert result.out("pty").replace(b"\r\n", b"\n") == b"True True xterm-256color\n"


def test_pty_resize_is_seen_by_the_child(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="tty", command="stty size; read line; stty size", pty={"rows": 24, "cols": 80})
    out = b""
    while b"24 80" not in out:
        out += client.event(rid)["data"]
    client.request("exec.resize", exec_id="tty", rows=40, cols=100)
    client.request("exec.input", exec_id="tty", data=b"\n")
    while True:
        ev = client.event(rid)
        if ev["ev"] == "end":
            break
        out += ev["data"]
    assert ev["exit_code"] == 0
    assert b"40 100" in out


def test_sigwinch_reaches_the_foreground_process(client: AgentClient) -> None:
    code = (
        "import os, signal\n"
        # Blocked, then waited for: a SIGWINCH between 'ready' and the wait stays pending instead of
        # running a handler before the wait (which then waited forever).
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGWINCH})\n"
        "print('ready', flush=True)\n"
        "signal.sigwait({signal.SIGWINCH})\n"
        "os.write(1, b'winch\\n')\n"
    )
    rid, _ = client.start(exec_id="w", command=[sys.executable, "-c", code], pty={"rows": 5, "cols": 5})
    out = b""
    while b"ready" not in out:
        out += client.event(rid)["data"]
    client.request("exec.resize", exec_id="w", rows=6, cols=7)
    while True:
        ev = client.event(rid)
        if ev["ev"] == "end":
            break
        out += ev["data"]
    assert b"winch" in out and ev["exit_code"] == 0


def test_ctrl_c_typed_into_the_pty_interrupts_the_foreground_job(client: AgentClient) -> None:
    _ctrl_c_interrupts_the_foreground_job(client)


def test_ctrl_c_works_in_an_agent_started_with_sigint_ignored(tmp_path: Path) -> None:
    # A background job (`.ci/run &`) starts with SIGINT and SIGQUIT ignored, and an ignored signal
    # stays ignored across exec: the agent must not hand that on to the processes it starts.
    agent_cmd = f'trap "" INT QUIT; exec "{sys.executable}" -m guest_agent --root "{tmp_path}"'
    agent = SubprocessAgent(tmp_path, argv=["/bin/sh", "-c", agent_cmd])
    try:
        _ctrl_c_interrupts_the_foreground_job(agent.client)
    finally:
        agent.stop()


def _ctrl_c_interrupts_the_foreground_job(client: AgentClient) -> None:
    # The job says "go" once it runs: a ^C typed before the shell forked it would be caught and
    # deferred by the shell (dash does under -c) and so would not show that it reached the job.
    job = "import time; print('go', flush=True); time.sleep(100)"
    script = f'"$0" -c "{job}"; echo not reached'
    rid, _ = client.start(
        exec_id="cc", command=["/bin/sh", "-c", script, sys.executable], pty={"rows": 24, "cols": 80}
    )
    out = b""
    while b"go" not in out:
        out += client.event(rid)["data"]
    client.request("exec.input", exec_id="cc", data=b"\x03")
    while (ev := client.event(rid))["ev"] != "end":
        out += ev["data"]
    assert ev["signal"] == "SIGINT" or ev["exit_code"] == 130
    assert b"not reached" not in out


def test_resize_without_pty_is_refused(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="np", command=["cat"], stdin_open=True)
    assert client.error("exec.resize", exec_id="np", rows=1, cols=1)["code"] == "bad_request"
    client.request("exec.close_stdin", exec_id="np")
    client.events(rid)


def test_close_stdin_on_a_pty_sends_eof(client: AgentClient) -> None:
    rid, _ = client.start(exec_id="pe", command=["cat"], pty={"rows": 24, "cols": 80})
    client.request("exec.input", exec_id="pe", data=b"line\n")
    client.request("exec.close_stdin", exec_id="pe")
    events = [e for e in client.events(rid)]
    assert events[-1]["exit_code"] == 0
    assert b"line" in b"".join(e.get("data", b"") for e in events)
