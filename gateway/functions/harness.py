"""The sources of invoke and test execs, per language (sans-I/O).

An invocation or a test run is an ordinary exec (`exec.start` with `code` and `language`) whose
source this module writes: a call of the guest agent's `guest_agent.invoke` / `guest_agent.testrun`
for Python (run in the agent's own interpreter, so a deployed function's module stays loaded in a
named namespace between calls), and for the other languages their harness beside this file with the
call's parameters: `harness.js` for JavaScript (QuickJS in the WASM runtime, Node where a runtime
runs it), `harness.rb` for Ruby and `harness.php` for PHP (invoke only: test mode is Python's and
JavaScript's). Each writes a JSON report to `report`, a path under the sandbox root's `.sandgate/`
folder that the gateway reads once the exec ended.
"""

from __future__ import annotations

import json
import secrets
from functools import cache
from pathlib import Path
from typing import Any

from guest_agent.invoke import CALLER
from guest_agent.wire import ProtocolError

#: Where reports are written, relative to the sandbox root (left out of `files` tracking). Right
#: under the private folder, not deeper: the agent resolves every component of a path it reads,
#: and under WASI each is a host call (one level less saved ~0.2 ms per fs.read there).
REPORT_DIR = ".sandgate"
#: The languages invoke speaks.
LANGUAGES = ("python", "javascript", "ruby", "php")
#: The languages test mode speaks.
TEST_LANGUAGES = ("python", "javascript")


def new_call_id() -> str:
    """A call's id: it names the call's report, and the Python harness writes it into the report."""
    return secrets.token_hex(8)


def report_path(name: str) -> str:
    """The report path for `name` (a call's id, or a deployed function instance's own name)."""
    return f"{REPORT_DIR}/{name}.json"


def new_report_path() -> str:
    return report_path(new_call_id())


def check_language(language: str, *, test: bool = False) -> None:
    """Refuse (`unsupported`) a language invoke, or with `test` test mode, has no harness for."""
    speaks = TEST_LANGUAGES if test else LANGUAGES
    if language not in speaks:
        what = "test mode speaks" if test else "invoke speaks"
        raise ProtocolError("unsupported", f"{what} {', '.join(speaks)}, not {language!r:.40}")


def invoke_source(language: str, *, function: str, args: list[Any], kwargs: dict[str, Any], report: str,
                  code: str | None, filename: str = "<function>", call: str | None = None,
                  bind: str | None = None) -> str:
    """The exec source that calls `function(*args, **kwargs)` (`code` loads it first; None: it is
    loaded already, in the exec's Python namespace). A Python report carries `call` when given;
    `bind` (Python) keeps a caller of that function in the namespace for `warm_call_source`."""
    check_language(language)
    args_json, kwargs_json = _json(args, "args"), _json(kwargs, "kwargs")
    if language == "python":
        # The call's files are the exec's own (the agent's change tracking): Python runs in the agent.
        load = "" if code is None else f", code={code!r}, filename={filename!r}"
        if call is not None:
            load += f", call={call!r}"
        if bind is not None:
            load += f", bind={bind!r}"
        return (f'__import__("guest_agent.invoke", fromlist=["invoke"]).invoke(globals(), report={report!r}, '
                f"function={function!r}, args_json={args_json!r}, kwargs_json={kwargs_json!r}{load})\n")
    if code is None:
        raise ProtocolError("internal", f"a {language} call always carries its code")
    params = {"report": report, "function": function, "args": args, "kwargs": kwargs, "code": code}
    if language == "javascript":
        return _js({"mode": "invoke", **params})
    return _quoted(language, {**params, "filename": filename})


def warm_call_source(*, args: list[Any], kwargs: dict[str, Any], call: str) -> str:
    """The exec source of a warm call of a deployed Python function, in a namespace that an
    `invoke_source(..., bind=...)` exec loaded: one short call of the caller kept there."""
    return f"{CALLER}({_json(args, 'args')!r}, {_json(kwargs, 'kwargs')!r}, {call!r})\n"


def test_source(language: str, *, code: str, tests: str, report: str) -> str:
    """The exec source that runs `tests` against `code`."""
    check_language(language, test=True)
    if language == "python":
        return (f'__import__("guest_agent.testrun", fromlist=["run_tests"]).run_tests(code={code!r}, '
                f"tests={tests!r}, report={report!r})\n")
    return _js({"mode": "test", "report": report, "code": code, "tests": tests})


def _json(value: Any, name: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError as exc:
        raise ProtocolError("bad_request", f"'{name}' must be JSON: {exc}") from None


@cache
def _template(name: str) -> str:
    return (Path(__file__).parent / name).read_text(encoding="utf-8")


def _js(params: dict[str, Any]) -> str:
    # A JSON string literal inside the source: JSON.parse then reads it back exactly (a JSON text
    # is also a valid JS string literal's content once encoded again, U+2028 included).
    literal = json.dumps(json.dumps(params, allow_nan=False))
    return _template("harness.js").replace("__PARAMS__", literal, 1)


_HARNESS = {"ruby": "harness.rb", "php": "harness.php"}


def _quoted(language: str, params: dict[str, Any]) -> str:
    # The JSON text (ASCII: json.dumps escapes the rest) in a single-quoted literal, where Ruby and
    # PHP alike read only \\ and \' as escapes: the harness's JSON parser gets the text back exactly.
    text = json.dumps(params, allow_nan=False)
    literal = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return _template(_HARNESS[language]).replace("__PARAMS__", literal, 1)
