"""Calling a named Python function inside the sandbox (the gateway's `invoke`).

The gateway runs an ordinary Python exec (`exec.start`, language python) whose whole source is one
call of `invoke` below: so an invocation is an exec like any other (its output streams, its
timeout, signals and cancel apply), and only its outcome travels differently: `invoke` writes a
JSON report to a file the gateway names under the root's `.sandgate/` folder, which the gateway
reads after the exec ended (and removes, unless the path is a deployed function instance's own,
rewritten by each of its calls). An exec that ends without a report never finished its call (it
crashed, timed out or was stopped): the gateway tells which from the exec's end.

The report: `{"status": "success"|"error", "result", "error": {type, message, traceback}|null,
"call": <the call's id>}`; which files the call changed is the exec's own `files` (the agent's
change tracking, guest_agent/changes.py). The `call` the gateway named
tells a report of this call from an earlier one left at the same path (a call whose exec ended
cleanly without writing one: `SystemExit(0)`). The guest is untrusted and may write any report it
likes; it only ever describes its own call, and the gateway checks its shape and size.

Stdlib only (the agent's rule): it runs under CPython-on-WASI too.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import OrderedDict
from types import CodeType
from typing import Any

#: Where reports go, relative to the sandbox root; left out of the change tracking (changes.py keeps
#: the same name, so the agent does not import this module, and json, at start).
PRIVATE_DIR = ".sandgate"
#: Where a deployed function's namespace keeps the caller of its warm calls (see `invoke`'s `bind`).
CALLER = "__sandgate_call__"
#: Compiled sources kept per agent with their lines (for tracebacks), by filename and the source
#: itself: repeated invocations of the same code skip the compile. Keyed by the text, not by a
#: digest: hashlib's import alone took 9-18 ms of a fresh WASM sandbox's first call (it loads every
#: hash module), and a dict compares a long string only once its cheap hash matched.
_COMPILED: OrderedDict[tuple[str, str], tuple[CodeType, list[str]]] = OrderedDict()
#: At most this many entries and this many characters of source in all (least recently used out).
_COMPILED_KEEP = 64
_COMPILED_KEEP_CHARS = 4 << 20
_compiled_chars = 0


def compiled(source: str, filename: str) -> CodeType:
    """`source` compiled (cached by content: the same code invoked again is not compiled again),
    its lines left where tracebacks look them up."""
    global _compiled_chars
    key = (filename, source)
    entry = _COMPILED.get(key)
    if entry is None:
        entry = (compile(source, filename, "exec"), source.splitlines(True))
        if len(source) <= _COMPILED_KEEP_CHARS:
            _COMPILED[key] = entry
            _compiled_chars += len(source)
            while len(_COMPILED) > _COMPILED_KEEP or _compiled_chars > _COMPILED_KEEP_CHARS:
                (_, dropped), _ = _COMPILED.popitem(last=False)
                _compiled_chars -= len(dropped)
    else:
        _COMPILED.move_to_end(key)
    code, lines = entry
    _keep_lines_for_tracebacks(filename, source, lines)
    return code


def _keep_lines_for_tracebacks(filename: str, source: str, lines: list[str]) -> None:
    import linecache

    linecache.cache[filename] = (len(source), None, lines, filename)


def error_of(exc: BaseException, filename: str) -> dict[str, Any]:
    """An exception as the report carries it; the traceback starts at the user's code."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        text = "".join(traceback.format_exception_only(type(exc), exc))
    else:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {"type": type(exc).__name__, "message": str(exc), "traceback": text}


def invoke(namespace: dict[str, Any], *, report: str, function: str, args_json: str = "[]",
           kwargs_json: str = "{}", code: str | None = None, filename: str = "<function>",
           call: str | None = None, bind: str | None = None) -> None:
    """Load `code` into `namespace` (when given), call `namespace[function](*args, **kwargs)` and
    write the report to `report` (relative to the working directory, the sandbox root). An empty
    `function` only loads; the report's `loaded` says whether the code ran whole.

    With `bind` (a deployed function's name), the loaded namespace keeps a caller of that function
    under `CALLER`: a warm call's exec source is then just `__sandgate_call__(args_json,
    kwargs_json, call)`. The agent compiles every exec's source, and under WASI that one compiles
    in ~0.12 ms against ~0.32 ms for a whole `invoke(...)` call (bench/functions.py).

    Exceptions of the user's code become `status: error`; SystemExit, KeyboardInterrupt and the
    agent's own stop pass through (the exec then ends without a report: crash or terminated)."""
    root = os.getcwd()
    report_path = os.path.join(root, report)
    outcome: dict[str, Any] = {"status": "success", "result": None, "error": None}
    try:
        try:
            if code is not None:
                exec(compiled(code, filename), namespace)
            if bind is not None:
                namespace[CALLER] = functools.partial(_call_bound, namespace, report, bind, filename)
            # Said once the code ran whole: a deployed function's instance keeps it loaded.
            outcome["loaded"] = True
            target = namespace.get(function)
            if not function:
                pass  # load only: a deployed function's instance warming up
            elif not callable(target):
                defined = sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("_"))[:20]
                what = "is not a function" if function in namespace else "is not defined by the code"
                outcome = {"status": "error", "result": None, "loaded": True, "error": {
                    "type": "FunctionNotFound", "traceback": "",
                    "message": f"{function!r} {what} (functions it defines: {', '.join(defined) or 'none'})"}}
            else:
                value = target(*json.loads(args_json), **json.loads(kwargs_json))
                try:
                    json.dumps(value, allow_nan=False)
                except (TypeError, ValueError) as exc:
                    outcome = {"status": "error", "result": None, "loaded": True, "error": {
                        "type": "ResultNotSerializable", "traceback": "",
                        "message": f"the function returned a {type(value).__name__}, which is not JSON-"
                                   f"serialisable: {exc}"}}
                else:
                    outcome["result"] = value
        except Exception as exc:
            outcome = {"status": "error", "result": None, "loaded": outcome.get("loaded", False),
                       "error": error_of(exc, filename)}
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    if call is not None:  # first: the gateway checks the start of a report too large to parse
        outcome = {"call": call, **outcome}
    write_report(report_path, outcome)


def _call_bound(namespace: dict[str, Any], report: str, function: str, filename: str,
                args_json: str, kwargs_json: str, call: str) -> None:
    invoke(namespace, report=report, function=function, args_json=args_json, kwargs_json=kwargs_json,
           filename=filename, call=call)


def write_report(path: str, outcome: dict[str, Any]) -> None:
    """Write the report at `path` with as few file operations as it takes: under WASI each is a
    call into the host, and a temporary file renamed into place cost ~0.8 ms there against
    ~0.15 ms for this (bench/functions.py measured it).

    No rename is needed for the gateway to read the report whole: it reads one only after the
    exec ended cleanly, and a call stopped while writing does not end cleanly. The bytes are
    written over the old ones in place, then the file is cut to their length: a path rewritten
    by every call (a deployed function's instance) would otherwise have its blocks freed and
    allocated again each time (truncating first took about twice as long)."""
    data = json.dumps(outcome).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
