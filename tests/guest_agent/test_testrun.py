"""Test mode (guest_agent/testrun.py): real pytest run by a real agent, through ordinary Python execs.

Each test runs against two agents: one from the checkout (the venv's pytest), and one from a
folder staged as the runtimes stage it (plugins.common.agent_files) and run with `python -P -S`,
so that only the staged pytest and its trimmed dependencies can be imported.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest_agent.agent_harness import AgentClient, Result, SubprocessAgent, agent_env

CODE = "def add(a, b):\n    return a + b\n"


def source(code: str, tests: str, report: str) -> str:
    """The exec the gateway runs for a test request."""
    return (f'__import__("guest_agent.testrun", fromlist=["run_tests"]).run_tests('
            f"code={code!r}, tests={tests!r}, report={report!r})")


def run_tests(client: AgentClient, root: Path, code: str, tests: str, name: str = "r",
              **fields: Any) -> tuple[Result, dict[str, Any] | None]:
    """(the exec, its report or None when it wrote none)."""
    report = f".sandgate/run/{name}.json"
    result = client.python(source(code, tests, report), **fields)
    path = root / report
    return result, json.loads(path.read_text()) if path.exists() else None


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent folder as the pod test cluster stages it (the WASM one adds bytecode)."""
    from plugins.common import agent_files

    folder = tmp_path_factory.mktemp("staged")
    for rel, host_file in agent_files().items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host_file, folder / rel)
    return folder


@pytest.fixture(params=["checkout", "staged"])
def agent(request: pytest.FixtureRequest, root: Path, staged: Path) -> Iterator[AgentClient]:
    if request.param == "checkout":
        proc = SubprocessAgent(root)
    else:
        # -S: no site-packages (the venv's pytest); -P: not the checkout's guest_agent either.
        argv = [sys.executable, "-P", "-S", "-m", "guest_agent", "--root", str(root)]
        proc = SubprocessAgent(root, argv=argv, env=agent_env(PYTHONPATH=str(staged)))
    yield proc.client
    proc.stop()


def test_passing_tests_call_the_code(agent: AgentClient, root: Path) -> None:
    tests = "def test_add():\n    assert add(1, 2) == 3\n\ndef test_neg():\n    assert add(-1, 1) == 0\n"
    result, report = run_tests(agent, root, CODE, tests)
    assert result.exit_code == 0, result.stderr
    assert report is not None
    assert report["success"] is True and report["error"] is None
    assert report["summary"] == {"total": 2, "passed": 2, "failed": 0, "skipped": 0}
    assert [t["name"] for t in report["tests"]] == ["test_add", "test_neg"]
    for entry in report["tests"]:
        assert entry["passed"] is True and entry["skipped"] is False and entry["error"] is None
        assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] >= 0
    assert "2 passed" in result.stdout  # pytest's own summary line is the exec's output
    assert list((root / ".sandgate/tests").iterdir()) == []  # the private folder is gone


def test_a_failing_assert_carries_pytests_message(agent: AgentClient, root: Path) -> None:
    tests = "def test_add():\n    assert add(1, 2) == 4\n\ndef test_ok():\n    assert add(2, 2) == 4\n"
    result, report = run_tests(agent, root, CODE, tests)
    assert result.exit_code == 0
    assert report is not None and report["success"] is False and report["error"] is None
    assert report["summary"] == {"total": 2, "passed": 1, "failed": 1, "skipped": 0}
    failed = report["tests"][0]
    assert (failed["name"], failed["passed"], failed["skipped"]) == ("test_add", False, False)
    assert "assert 3 == 4" in failed["error"]  # assertion rewriting: the value, not just the source
    assert "+  where 3 = add(1, 2)" in failed["error"]


def test_skips_and_expected_failures_carry_their_reason(agent: AgentClient, root: Path) -> None:
    tests = (
        "import pytest\n\n"
        "@pytest.mark.skip(reason='not on Tuesdays')\ndef test_marked():\n    assert False\n\n"
        "def test_inside():\n    pytest.skip('decided at run time')\n\n"
        "@pytest.mark.xfail(reason='known bug')\ndef test_known():\n    assert add(1, 1) == 3\n"
    )
    _, report = run_tests(agent, root, CODE, tests)
    assert report is not None
    assert report["summary"] == {"total": 3, "passed": 0, "failed": 0, "skipped": 3}
    assert report["success"] is True  # skips are not failures
    assert [(t["name"], t["skipped"], t["passed"], t["error"]) for t in report["tests"]] == [
        ("test_marked", True, False, "not on Tuesdays"),
        ("test_inside", True, False, "decided at run time"),
        ("test_known", True, False, "xfail: known bug"),
    ]


def test_parametrized_tests_and_classes_are_named_by_node(agent: AgentClient, root: Path) -> None:
    tests = (
        "import pytest\n\n"
        "@pytest.mark.parametrize('x, y', [(1, 2), (2, 4), (3, 7)])\n"
        "def test_double(x, y):\n    assert add(x, x) == y\n\n"
        "class TestAdd:\n    def test_zero(self):\n        assert add(0, 0) == 0\n"
    )
    _, report = run_tests(agent, root, CODE, tests)
    assert report is not None
    names = {t["name"]: t["passed"] for t in report["tests"]}
    assert names == {"test_double[1-2]": True, "test_double[2-4]": True, "test_double[3-7]": False,
                     "TestAdd::test_zero": True}
    assert report["summary"] == {"total": 4, "passed": 3, "failed": 1, "skipped": 0}


def test_fixtures_work_and_a_failing_fixture_fails_its_test(agent: AgentClient, root: Path) -> None:
    tests = (
        "import logging, pytest\n\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('fixture broke')\n\n"
        "def test_uses_broken(broken):\n    pass\n\n"
        "def test_builtins(tmp_path, capsys, caplog, monkeypatch):\n"
        "    (tmp_path / 'f').write_text('x')\n"
        "    print('captured'); assert capsys.readouterr().out == 'captured\\n'\n"
        "    logging.getLogger('t').warning('logged'); assert 'logged' in caplog.text\n"
        "    monkeypatch.setenv('K', 'v')\n"
    )
    result, report = run_tests(agent, root, CODE, tests)
    assert report is not None, result.stderr
    by_name = {t["name"]: t for t in report["tests"]}
    assert by_name["test_builtins"]["passed"] is True, by_name["test_builtins"]["error"]
    assert by_name["test_uses_broken"]["passed"] is False
    assert "RuntimeError: fixture broke" in by_name["test_uses_broken"]["error"]
    assert not list(root.glob("pytest-of-*")) and list((root / ".sandgate/tests").iterdir()) == []


def test_a_syntax_error_in_the_code_is_a_collection_error(agent: AgentClient, root: Path) -> None:
    result, report = run_tests(agent, root, "def add(a, b:\n    return a + b\n", "def test_add():\n    pass\n")
    assert result.exit_code == 0
    assert report is not None
    assert report["success"] is False and report["tests"] == []
    assert report["summary"] == {"total": 0, "passed": 0, "failed": 0, "skipped": 0}
    assert report["error"]["type"] == "SyntaxError"
    assert "def add(a, b:" in report["error"]["traceback"]


def test_a_failing_import_is_a_collection_error(agent: AgentClient, root: Path) -> None:
    _, report = run_tests(agent, root, "import no_such_module_here\n", "def test_x():\n    pass\n")
    assert report is not None and report["success"] is False
    assert report["error"]["type"] == "ModuleNotFoundError"
    assert "no_such_module_here" in report["error"]["message"]


def test_zero_tests_is_not_a_success(agent: AgentClient, root: Path) -> None:
    _, report = run_tests(agent, root, CODE, "def helper():\n    return 1\n")
    assert report is not None
    assert report["success"] is False and report["tests"] == []
    assert report["error"]["type"] == "NoTestsFound"
    assert "no test was found" in report["error"]["message"]


def test_two_runs_in_one_agent_share_nothing(agent: AgentClient, root: Path) -> None:
    tests = "def test_add():\n    assert add(2, 3) == 5\n"
    _, first = run_tests(agent, root, CODE, tests, name="first")
    # The same test names against other code: a run that reused the first module would pass.
    _, second = run_tests(agent, root, "def add(a, b):\n    return a - b\n", tests, name="second")
    assert first is not None and first["success"] is True
    assert second is not None and second["success"] is False
    assert "assert -1 == 5" in second["tests"][0]["error"]
    left = agent.python("import sys\nsorted(n for n, m in sys.modules.items() "
                        "if '.sandgate' in str(getattr(m, '__file__', '') or ''))")
    assert left.stdout == "[]\n"  # no test module stays imported
    assert list((root / ".sandgate/tests").iterdir()) == []


def test_prints_in_tests_reach_the_exec_stdout(agent: AgentClient, root: Path) -> None:
    tests = "import sys\n\ndef test_talks():\n    print('hello from a test')\n    print('to stderr', file=sys.stderr)\n"
    result, report = run_tests(agent, root, CODE, tests)
    assert report is not None and report["success"] is True
    assert "hello from a test" in result.stdout
    assert "to stderr" in result.stderr


def test_the_sandboxs_own_pytest_configuration_is_not_used(agent: AgentClient, root: Path) -> None:
    (root / "conftest.py").write_text("raise RuntimeError('the sandbox conftest was imported')\n")
    (root / "pytest.ini").write_text("[pytest]\naddopts = --no-such-option\n")
    agent.python("import os\nos.environ['PYTEST_ADDOPTS'] = '--collect-only'")
    result, report = run_tests(agent, root, CODE, "def test_add():\n    assert add(1, 1) == 2\n")
    assert report is not None and report["success"] is True, (result.stdout, result.stderr)
    assert report["summary"]["passed"] == 1
    after = agent.python("import os\nos.environ['PYTEST_ADDOPTS'], os.environ.get('PYTEST_DISABLE_PLUGIN_AUTOLOAD')")
    assert after.stdout == "('--collect-only', None)\n"  # the sandbox's environment is put back


def test_a_timeout_stops_the_run_and_the_next_run_works(agent: AgentClient, root: Path) -> None:
    # pytest records an exception in a test as its failure and goes on: the agent's timeout
    # must end the run instead, or the second spinning test would hold the agent for ever.
    run_tests(agent, root, CODE, "def test_warm():\n    pass\n", name="warm")  # pytest imported
    spin = "def test_spin_1():\n    print('spinning', flush=True)\n    while True:\n        pass\n\n" \
           "def test_spin_2():\n    while True:\n        pass\n"
    result, report = run_tests(agent, root, CODE, spin, name="spin", timeout=1.0)
    assert result.end["error"]["code"] == "timeout"
    assert "spinning" in result.stdout  # the timeout landed inside the first test
    assert report is None  # a stopped run writes no report: the exec's end says why
    result, report = run_tests(agent, root, CODE, "def test_add():\n    assert add(1, 2) == 3\n", name="after",
                               timeout=30.0)
    assert report is not None and report["success"] is True, (result.end, result.stderr)


def test_a_signal_stops_the_run(pclient: AgentClient, root: Path) -> None:
    spin = "def test_spin_1():\n    print('spinning', flush=True)\n    while True:\n        pass\n\n" \
           "def test_spin_2():\n    while True:\n        pass\n"
    rid, _ = pclient.start(language="python", code=source(CODE, spin, ".sandgate/run/spin.json"))
    while pclient.event(rid).get("data") != b"spinning\n":  # pytest's progress may come first
        pass
    pclient.request("exec.signal", exec_id="x1", signal="SIGTERM")
    end = pclient.events(rid)[-1]
    assert (end["exit_code"], end["signal"]) == (None, "SIGTERM")
    assert not (root / ".sandgate/run/spin.json").exists()
    _, report = run_tests(pclient, root, CODE, "def test_add():\n    assert add(1, 2) == 3\n", timeout=30.0)
    assert report is not None and report["success"] is True


def test_the_report_is_bounded(pclient: AgentClient, root: Path) -> None:
    from guest_agent.testrun import MAX_ERROR_CHARS, MAX_LISTED

    tests = (f"import pytest\n\n@pytest.mark.parametrize('i', range({MAX_LISTED + 5}))\ndef test_many(i):\n    pass\n\n"
             f"def test_long():\n    raise ValueError('x' * {MAX_ERROR_CHARS * 2})\n")
    _, report = run_tests(pclient, root, CODE, tests, timeout=60.0)
    assert report is not None
    assert report["summary"] == {"total": MAX_LISTED + 6, "passed": MAX_LISTED + 5, "failed": 1, "skipped": 0}
    assert len(report["tests"]) == MAX_LISTED  # the summary counts what the list leaves out
    _, report = run_tests(pclient, root, CODE, tests.split("\n\n", 2)[0] + "\n\n" + tests.split("\n\n", 2)[2],
                          name="long", timeout=60.0)
    assert report is not None
    (long,) = report["tests"]
    assert len(long["error"]) < MAX_ERROR_CHARS + 100 and "more characters]" in long["error"]
