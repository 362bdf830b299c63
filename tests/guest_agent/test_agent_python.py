"""In-interpreter Python execs."""

from __future__ import annotations

from tests.guest_agent.agent_harness import AgentClient


def test_default_namespace_persists(client: AgentClient) -> None:
    assert client.python("x = 41").exit_code == 0
    result = client.python("x + 1")
    assert (result.exit_code, result.stdout) == (0, "42\n")


def test_fresh_namespace_is_new_every_time(client: AgentClient) -> None:
    assert client.python("y = 1", namespace="fresh").exit_code == 0
    result = client.python("y", namespace="fresh")
    assert result.exit_code == 1
    assert "NameError" in result.stderr
    assert "NameError" in client.python("y").stderr  # nor did it land in "default"


def test_named_namespaces_are_separate(client: AgentClient) -> None:
    client.python("z = 'a'", namespace="a")
    client.python("z = 'b'", namespace="b")
    assert client.python("z", namespace="a").stdout == "'a'\n"
    assert client.python("z", namespace="b").stdout == "'b'\n"
    assert client.python("__name__", namespace="fresh").stdout == "'__main__'\n"


def test_last_expression_is_printed_like_a_repl(client: AgentClient) -> None:
    assert client.python("print('a')\n'b'").stdout == "a\n'b'\n"
    assert client.python("None").stdout == ""
    assert client.python("x = 3").stdout == ""
    assert client.python("def f():\n    return 5\nf()").stdout == "5\n"
    assert client.python("").exit_code == 0


def test_exception_prints_a_traceback_without_agent_frames(client: AgentClient) -> None:
    result = client.python("def f():\n    return 1 / 0\n\nf()")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Traceback (most recent call last):\n")
    assert "ZeroDivisionError: division by zero" in result.stderr
    assert "return 1 / 0" in result.stderr  # the source line is shown
    assert "guest_agent" not in result.stderr


def test_syntax_error(client: AgentClient) -> None:
    result = client.python("x = (")
    assert result.exit_code == 1
    assert "SyntaxError" in result.stderr
    assert "guest_agent" not in result.stderr and "Traceback" not in result.stderr


def test_system_exit_is_honoured(client: AgentClient) -> None:
    assert client.python("raise SystemExit(3)").exit_code == 3
    assert client.python("import sys; sys.exit()").exit_code == 0
    result = client.python("import sys; sys.exit('bye')")
    assert (result.exit_code, result.stderr) == (1, "bye\n")
    assert client.request("ping") == {}  # the agent itself did not exit


def test_output_is_streamed_before_the_exec_ends(client: AgentClient) -> None:
    rid, _ = client.start(
        language="python",
        code="print('one')\nprint('two', end='', flush=True)\nline = input()\nprint(line.upper())",
        stdin_open=True,
    )
    assert client.event(rid)["data"] == b"one\n"
    assert client.event(rid)["data"] == b"two"
    # The exec now waits for stdin: what we received cannot have been collected at the end.
    client.request("exec.input", exec_id="x1", data=b"three\n")
    events = client.events(rid)
    assert [e["seq"] for e in events] == [3, 4]
    assert events[0]["data"] == b"THREE\n"
    assert events[1]["exit_code"] == 0


def test_each_line_is_its_own_data_event_with_consecutive_seq(client: AgentClient) -> None:
    result = client.python("import sys\nfor i in range(3):\n    print(i)\nprint('e', file=sys.stderr)")
    data = [e for e in result.events if e["ev"] == "data"]
    assert [(e["fd"], e["data"]) for e in data] == [
        ("stdout", b"0\n"),
        ("stdout", b"1\n"),
        ("stdout", b"2\n"),
        ("stderr", b"e\n"),
    ]
    assert [e["seq"] for e in result.events] == [0, 1, 2, 3, 4, 5]


def test_large_output_is_chunked(client: AgentClient) -> None:
    result = client.python("import sys\nsys.stdout.write('x' * 300_000)\nn = sys.stdout.buffer.write(b'!')")
    chunks = [e["data"] for e in result.events if e["ev"] == "data"]
    assert len(chunks) >= 5
    assert all(len(c) <= 64 * 1024 for c in chunks)
    assert result.out() == b"x" * 300_000 + b"!"


def test_stdin_from_the_field(client: AgentClient) -> None:
    result = client.python("import sys\nprint(sys.stdin.read()[::-1])", stdin=b"abc")
    assert result.stdout == "cba\n"
    assert client.python("input()").stderr.endswith("EOFError: EOF when reading a line\n")


def test_stdin_from_exec_input_until_close(client: AgentClient) -> None:
    rid, start = client.start(
        language="python",
        code="import sys\nprint(len(sys.stdin.read()))",
        stdin=b"ab",
        stdin_open=True,
    )
    assert start["pid"] is None
    client.request("exec.input", exec_id="x1", data=b"cd")
    client.request("exec.input", exec_id="x1", data=b"\xc3\xa9")
    client.request("exec.close_stdin", exec_id="x1")
    events = client.events(rid)
    assert events[0]["data"] == b"5\n"
    assert client.error("exec.input", exec_id="x1", data=b"late")["code"] == "not_found"


def test_input_after_close_stdin_is_refused(client: AgentClient) -> None:
    rid, _ = client.start(language="python", code="input()\ninput()", stdin_open=True)
    client.request("exec.input", exec_id="x1", data=b"a\n")
    client.request("exec.close_stdin", exec_id="x1")
    error = client.error("exec.input", exec_id="x1", data=b"b\n")
    # the exec may already have ended on the EOF, or still be unwinding
    assert error["code"] in ("bad_request", "not_found")
    assert "EOFError" in b"".join(e.get("data", b"") for e in client.events(rid)).decode()


def test_python_execs_run_concurrently(client: AgentClient) -> None:
    waiting, _ = client.start(exec_id="waits", language="python", code="print(input())", stdin_open=True)
    other = client.python("'meanwhile'")
    assert other.stdout == "'meanwhile'\n"
    client.request("exec.input", exec_id="waits", data=b"done\n")
    assert client.events(waiting)[0]["data"] == b"done\n"


def test_sigint_interrupts_a_python_exec(client: AgentClient) -> None:
    rid, _ = client.start(language="python", code="print('ready', flush=True)\nwhile True:\n    pass")
    assert client.event(rid)["data"] == b"ready\n"
    client.request("exec.signal", exec_id="x1", signal="SIGINT")
    events = client.events(rid)
    assert "KeyboardInterrupt" in b"".join(e.get("data", b"") for e in events).decode()
    assert (events[-1]["exit_code"], events[-1]["signal"]) == (None, "SIGINT")


def test_sigint_interrupts_a_read_of_stdin(client: AgentClient) -> None:
    rid, _ = client.start(language="python", code="input()", stdin_open=True)
    client.request("exec.signal", exec_id="x1", signal=2)
    assert client.events(rid)[-1]["signal"] == "SIGINT"


def test_sigterm_ends_a_python_exec_without_a_traceback(client: AgentClient) -> None:
    rid, _ = client.start(language="python", code="print('go', flush=True)\nwhile True:\n    pass")
    client.event(rid)
    client.request("exec.signal", exec_id="x1", signal="TERM")
    events = client.events(rid)
    assert [e["ev"] for e in events] == ["end"]
    assert (events[0]["exit_code"], events[0]["signal"]) == (None, "SIGTERM")


def test_other_signals_mean_nothing_to_python(client: AgentClient) -> None:
    rid, _ = client.start(language="python", code="input()", stdin_open=True)
    assert client.error("exec.signal", exec_id="x1", signal="SIGUSR1")["code"] == "unsupported"
    client.request("exec.close_stdin", exec_id="x1")
    client.events(rid)


def test_timeout_interrupts_a_busy_loop(client: AgentClient) -> None:
    result = client.python("while True:\n    pass", timeout=0.3)
    assert result.end["error"]["code"] == "timeout"
    assert "TimeoutError" in result.stderr
    assert client.python("'alive'").stdout == "'alive'\n"


def test_timeout_abandons_an_exec_stuck_in_a_c_call(pclient: AgentClient) -> None:
    # time.sleep cannot be interrupted on a thread: the stream ends after the grace period.
    result = pclient.python("import time\ntime.sleep(120)", timeout=0.2)
    assert result.end["error"]["code"] == "timeout"
    assert result.exit_code is None
    assert pclient.python("'alive'").stdout == "'alive'\n"


def test_user_threads_write_to_their_exec(client: AgentClient) -> None:
    result = client.python(
        "import threading\nt = threading.Thread(target=print, args=('from a thread',))\nt.start(); t.join()"
    )
    assert result.stdout == "from a thread\n"


def test_cwd_and_env_of_a_python_exec(pclient: AgentClient) -> None:
    pclient.request("fs.mkdir", path="sub")
    result = pclient.python(
        "import os\nprint(os.getcwd().endswith('/sub'), os.environ['K'])", cwd="sub", env={"K": "v"}
    )
    assert result.stdout == "True v\n"


def test_unsupported_language(client: AgentClient) -> None:
    error = client.error("exec.start", exec_id="j", language="cobol", code="1")
    assert error["code"] == "unsupported"
