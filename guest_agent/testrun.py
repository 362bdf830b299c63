"""Running pytest-style tests inside the sandbox (the gateway's test mode, for Python).

The gateway runs an ordinary Python exec whose whole source is one call of `run_tests`, as it
does for `invoke`: the exec's output, timeout, signals and cancel apply as to any exec, and the
outcome travels as a JSON report written to a file the gateway names under the root's
`.sandgate/` folder. An exec that ends without a report was stopped (timeout, signal, crash).

The code and the tests become ONE module (`code + "\\n\\n" + tests`, so the tests call what the
code defines), written to a fresh private folder `.sandgate/tests/<random>/` and run by real
pytest, in this interpreter, with options that suit the agent (`pytest_args`). The folder is
pytest's rootdir, ini file and conftest boundary, so nothing of the sandbox's own files (a
conftest.py, a pytest.ini, a pyproject.toml) changes the run; it is removed afterwards, and the
module leaves sys.modules, so a second run never sees the first one's module.

pytest is the one staged beside the agent (`PYTEST_DIR`, plugins/pytest_files.py), put on
sys.path for the run only: ordinary execs never import it by accident. It is imported at the
first run, never at the agent's start; once imported it stays in sys.modules.

The report:

    {"success": bool,      # at least one test, none failed, no error
     "summary": {"total", "passed", "failed", "skipped"},
     "tests": [{"name", "passed", "skipped", "duration_ms", "error"}],
     "error": null | {"type", "message", "traceback"}}

- `name`: the test's node id below the module: `test_add`, `test_x[1]`, `TestCls::test_y`.
- `error`: pytest's own failure text (its assertion rewriting: `assert 3 == 4`) for a failed
  test, the reason for a skipped one (`xfail: reason` for an expected failure), null when it
  passed. A failing setup or teardown (a fixture) fails the test with that text.
- `duration_ms`: setup, call and teardown together.
- The top-level `error` is what kept tests from running: a collection error (a SyntaxError in
  the code, an import that fails: `type` is that exception's class, `message` its text,
  `traceback` pytest's report), `NoTestsFound`, `Exit` (pytest.exit() was called),
  `PytestError` (pytest refused to run: its message is in the exec's stderr), `InternalError`
  (pytest itself failed) or `PytestUnavailable`. Tests that ran before it are still listed.
- At most MAX_LISTED tests are listed and MAX_ERROR_CHARS of each text kept; `summary` counts
  every test.

No report at all means the exec was stopped (its end says how) or `run_tests` itself failed
(exit code 1, its traceback in stderr: say, the sandbox's disk is full).

Stdlib only at import time (the agent's rule): it runs under CPython-on-WASI too.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from .invoke import PRIVATE_DIR, write_report
from .pyexec import ExecTerminated, ExecTimeoutError

#: The folder beside guest_agent/ that holds pytest (plugins/pytest_files.py stages it).
PYTEST_DIR = "pytest_libs"
#: Where each run's private folder is made, relative to the sandbox root.
TESTS_DIR = f"{PRIVATE_DIR}/tests"
MAX_LISTED = 1000
MAX_ERROR_CHARS = 20_000
#: Environment variables through which a sandbox could change the run; unset for its length.
_PYTEST_ENV = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DEBUG")

#: The agent's stops (timeout, SIGTERM/SIGKILL, SIGINT): pytest records an exception in a test
#: as that test's failure and runs the next one, so these end the run instead.
_STOPS = (ExecTerminated, ExecTimeoutError, KeyboardInterrupt)

#: One run at a time per agent: pytest's hooks (sys.unraisablehook, the assertion rewriter in
#: sys.meta_path, logging handlers) are process-wide.
_RUNNING = threading.Lock()
_running_thread: int | None = None


def pytest_args(module: str, folder: str) -> list[str]:
    """pytest's command line for one run of `module` in the private `folder`."""
    return [
        module,
        # No fd-level capture: output goes to sys.stdout/sys.stderr, which the agent routes to
        # the exec's streams (and on WASI fds 0/1 are the agent's channel).
        "--capture=no",
        "-p", "no:cacheprovider",  # no .pytest_cache in the sandbox; stepwise goes with it
        "-p", "no:faulthandler",  # it would dup the agent's stderr fd and hold it
        # --pdb and breakpoint() handling: no terminal to debug on here, and its configure imports
        # pdb (and asyncio with it): half of a first run's ~0.5 s under WASM
        "-p", "no:debugging",
        "-p", "no:pastebin",  # --pastebin sends the session to a paste service
        # A unique module name (module docstring), imported without changing sys.path.
        "--import-mode=importlib",
        "-c", os.path.join(folder, "pytest.ini"),
        "--rootdir", folder,
        "--confcutdir", folder,
        "--basetemp", os.path.join(folder, "tmp"),  # tmp_path & co. inside the private folder
        "-o", f"log_file={os.path.join(folder, 'pytest.log')}",  # not /dev/null: WASI has none
        "-q", "--no-header", "--color=no", "--code-highlight=no",
    ]


def run_tests(*, code: str, tests: str, report: str) -> None:
    """Run `tests` against `code` with pytest and write the report to `report` (a path relative
    to the working directory, the sandbox root). See the module docstring for the report.

    The agent's stops (timeout, signals) end the run without a report and are re-raised, so the
    exec ends as any stopped exec does; SystemExit in a test is that test's failure, as in pytest.
    """
    global _running_thread
    root = os.getcwd()
    report_path = os.path.join(root, report)
    if _running_thread == threading.get_ident():
        raise RuntimeError("run_tests cannot be called from inside a test run")
    while not _RUNNING.acquire(timeout=0.05):  # a short wait, so an injected stop lands
        pass
    _running_thread = threading.get_ident()
    try:
        outcome = _run(code, tests, root)
    finally:
        _running_thread = None
        _RUNNING.release()
    write_report(report_path, outcome)


def _run(code: str, tests: str, root: str) -> dict[str, Any]:
    import secrets
    import shutil

    token = secrets.token_hex(4)
    folder = os.path.join(root, TESTS_DIR, token)
    module = os.path.join(folder, f"test_{token}.py")
    os.makedirs(folder, mode=0o700)
    libs = _pytest_dir()
    saved_env = {name: os.environ.get(name) for name in (*_PYTEST_ENV, "PYTEST_DISABLE_PLUGIN_AUTOLOAD")}
    try:
        # surrogatepass: a lone surrogate in the code becomes pytest's SyntaxError, not ours
        with open(module, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code + "\n\n" + tests)
        with open(os.path.join(folder, "pytest.ini"), "w", encoding="utf-8") as f:
            f.write("[pytest]\n")
        if libs is not None:
            sys.path.insert(0, libs)
        for name in _PYTEST_ENV:
            os.environ.pop(name, None)
        # Plugins installed in the sandbox's Python stay out: the run is the same everywhere.
        os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        try:
            import pytest
        except ImportError as exc:
            return _failed("PytestUnavailable", f"pytest cannot be imported in this sandbox: {exc}", "")
        collector = _Collector(os.path.basename(module))
        exit_code = pytest.main(pytest_args(module, folder), plugins=[collector])
        sys.stdout.flush()
        sys.stderr.flush()
        if collector.stop is not None:
            raise collector.stop
        return collector.outcome(int(exit_code))
    finally:
        if libs is not None and libs in sys.path:
            sys.path.remove(libs)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _forget(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _forget(folder: str) -> None:
    """Drop the run's module (under whatever name pytest gave it) and its cached source lines."""
    import linecache

    inside = os.path.join(folder, "")
    for name, mod in list(sys.modules.items()):
        if str(getattr(mod, "__file__", None) or "").startswith(inside):
            del sys.modules[name]
    for filename in [f for f in linecache.cache if f.startswith(inside)]:
        linecache.cache.pop(filename, None)


def _pytest_dir() -> str | None:
    """The staged pytest folder beside guest_agent/, None where there is none (a checkout,
    where the Python running the agent has its own pytest)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, PYTEST_DIR)
    return path if os.path.isdir(path) else None


def _failed(kind: str, message: str, traceback: str) -> dict[str, Any]:
    return {"success": False, "summary": {"total": 0, "passed": 0, "failed": 0, "skipped": 0}, "tests": [],
            "error": {"type": kind, "message": message, "traceback": traceback}}


def _clip(text: str) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return text[:MAX_ERROR_CHARS] + f"\n[... {len(text) - MAX_ERROR_CHARS} more characters]"


class _Test:
    """One test's phases (setup, call, teardown), merged."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seconds = 0.0
        self.called_ok = False
        self.failures: list[str] = []
        self.skip_reason: str | None = None

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    @property
    def skipped(self) -> bool:
        return not self.failed and self.skip_reason is not None

    @property
    def passed(self) -> bool:
        return not self.failed and not self.skipped and self.called_ok

    def entry(self) -> dict[str, Any]:
        error = "\n".join(self.failures) if self.failed else self.skip_reason if self.skipped else None
        return {"name": self.name, "passed": self.passed, "skipped": self.skipped,
                "duration_ms": round(self.seconds * 1000, 3), "error": None if error is None else _clip(error)}


class _Collector:
    """The pytest plugin that records the run (its methods are pytest hooks)."""

    def __init__(self, module_file: str) -> None:
        self.module_id = module_file
        self.prefix = f"{module_file}::"
        self.module_skipped: str | None = None
        self.tests: dict[str, _Test] = {}
        self.error: dict[str, Any] | None = None
        #: An agent's stop met during the run, re-raised after pytest returns.
        self.stop: BaseException | None = None

    # -- hooks ----------------------------------------------------------------------------------

    def pytest_runtest_logreport(self, report: Any) -> None:
        test = self.tests.get(report.nodeid)
        if test is None:
            test = self.tests[report.nodeid] = _Test(report.nodeid.removeprefix(self.prefix))
        test.seconds += report.duration
        if hasattr(report, "wasxfail"):  # an expected failure (skipped) or unexpected pass (passed)
            if report.skipped:
                test.skip_reason = f"xfail: {report.wasxfail}" if report.wasxfail else "xfail"
            elif report.passed and report.when == "call":
                test.called_ok = True
            elif report.failed:
                test.failures.append(report.longreprtext)
        elif report.failed:
            test.failures.append(report.longreprtext)
        elif report.skipped:
            test.skip_reason = _skip_reason(report.longrepr)
        elif report.when == "call":
            test.called_ok = True

    def pytest_exception_interact(self, node: Any, call: Any, report: Any) -> None:
        exc = call.excinfo.value if call.excinfo is not None else None
        if isinstance(exc, _STOPS):
            self.stop = exc
            node.session.shouldstop = "stopped by the agent"
        elif report.when == "collect" and self.error is None:
            if exc is not None and exc.__cause__ is not None and type(exc).__name__ == "CollectError":
                exc = exc.__cause__  # pytest wraps a SyntaxError in its CollectError
            self.error = {"type": type(exc).__name__, "message": _clip(_first_line(str(exc))),
                          "traceback": _clip(report.longreprtext)}

    def pytest_collectreport(self, report: Any) -> None:
        if report.skipped and report.nodeid == self.module_id:  # pytest.skip(allow_module_level=True)
            self.module_skipped = _skip_reason(report.longrepr)
        elif report.failed and self.error is None:  # not seen by pytest_exception_interact
            self.error = {"type": "CollectionError", "message": _clip(_first_line(report.longreprtext)),
                          "traceback": _clip(report.longreprtext)}

    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        value = excinfo.value
        if type(value).__name__ == "Exit":  # pytest.exit() in a test or in the code
            self.error = {"type": "Exit", "message": f"pytest.exit() was called: {value.msg}", "traceback": ""}
        elif self.stop is None and type(value).__name__ != "Interrupted":
            self.stop = value  # a KeyboardInterrupt (SIGINT) outside a test

    def pytest_internalerror(self, excrepr: Any, excinfo: Any) -> None:
        if isinstance(excinfo.value, _STOPS):
            self.stop = excinfo.value
        elif self.error is None:
            self.error = {"type": "InternalError", "message": _clip(_first_line(str(excinfo.value))),
                          "traceback": _clip(str(excrepr))}

    # -- the report -----------------------------------------------------------------------------

    def outcome(self, exit_code: int) -> dict[str, Any]:
        tests = list(self.tests.values())
        failed = sum(t.failed for t in tests)
        skipped = sum(t.skipped for t in tests)
        passed = sum(t.passed for t in tests)
        error = self.error
        if error is None and exit_code not in (0, 1, 5):  # all passed, some failed, none collected
            error = {"type": "PytestError", "traceback": "",
                     "message": f"pytest ended with exit code {exit_code}; its message is in the exec's stderr"}
        if error is None and not tests:
            why = (f"the module was skipped: {self.module_skipped}" if self.module_skipped is not None else
                   "define functions named test_* (or test_* methods of classes named Test*) in the tests")
            error = {"type": "NoTestsFound", "message": f"no test was found: {why}", "traceback": ""}
        return {
            "success": error is None and failed == 0,
            "summary": {"total": len(tests), "passed": passed, "failed": failed, "skipped": skipped},
            "tests": [t.entry() for t in tests[:MAX_LISTED]],
            "error": error,
        }


def _skip_reason(longrepr: Any) -> str:
    """pytest keeps a skip as (file, line, "Skipped: reason")."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if lines else text
