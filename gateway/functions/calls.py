"""Invoke and test runs: the one mechanism every function call goes through.

A call is an exec of a harness source (`harness`), started like any exec (`start_exec`: its record
is in the sandbox's exec registry, so exec.attach, exec.signal, timeouts and the replay buffer
apply), with an `OutputCollector` for its stdout and stderr. Once it ended, the harness's report
is read from the sandbox (and removed, unless its path is reused); an exec that ended without one
never finished the call, and its end says why (timeout, a signal or cancel, or a crash).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.functions import harness
from gateway.protocol.paths import check_path
from gateway.sessions.execs import ExecRecord, OutputCollector
from guest_agent import schema
from guest_agent.wire import MAX_WRITE_CHUNK, ProtocolError

if TYPE_CHECKING:
    from gateway.sessions.manager import SandboxManager
    from gateway.sessions.sandbox import Sandbox

#: Statuses of an invocation (REST contract).
STATUSES = ("success", "error", "crash", "timeout", "terminated")


@dataclass
class CallRun:
    """One finished call: its exec record, its collected output, and its report (None: none)."""

    record: ExecRecord
    output: OutputCollector
    report: dict[str, Any] | None

    @property
    def end(self) -> dict[str, Any]:
        return self.record.end or {}

    def text(self, fd: str) -> str:
        return self.output.out[fd].decode("utf-8", "replace")

    def unfinished(self) -> tuple[str, dict[str, Any]]:
        """Why a call without a report did not finish: (status, error)."""
        end = self.end
        error = end.get("error") or {}
        if error.get("code") == "timeout":
            return "timeout", {"type": "Timeout", "message": error.get("message", "the call timed out"),
                               "traceback": ""}
        if self.record.cancelled or end.get("signal"):
            how = "cancelled" if self.record.cancelled else f"stopped by {end.get('signal')}"
            return "terminated", {"type": "Terminated", "message": f"the call was {how}", "traceback": ""}
        if error:
            why = error.get("message", "the guest stopped")
        elif end.get("exit_code") not in (0, None):
            why = f"the guest exited with code {end.get('exit_code')} before the call returned"
        else:
            why = "the call ended without a result (the guest's report is missing)"
        return "crash", {"type": "Crash", "message": why, "traceback": ""}


async def write_files(manager: SandboxManager, sandbox: Sandbox, files: dict[str, Any]) -> None:
    """Write a call's `files` ({relative path: text | {"base64": ...}}) into the sandbox."""
    for path, content in files.items():
        rel = check_path(path, allow_absolute=False)
        if isinstance(content, str):
            data = content.encode()
        else:
            try:
                data = base64.b64decode(content["base64"], validate=True)
            except (binascii.Error, ValueError):
                raise ProtocolError("bad_request", f"files[{path!r:.80}]: not base64") from None
        head = rel.rpartition("/")[0]
        if head:
            await manager.request(sandbox, "fs.mkdir", {"path": head, "parents": True})
        await manager.request(sandbox, "fs.write", {"path": rel, "data": data[:MAX_WRITE_CHUNK], "truncate": True})
        for offset in range(MAX_WRITE_CHUNK, len(data), MAX_WRITE_CHUNK):
            await manager.request(sandbox, "fs.write", {"path": rel, "data": data[offset:offset + MAX_WRITE_CHUNK],
                                                        "offset": offset})


async def run_call(manager: SandboxManager, sandbox: Sandbox, *, language: str, source: str, report: str,
                   timeout: float | None, namespace: str | None = None, tag: str | None = None,
                   env: dict[str, str] | None = None, call: str | None = None,
                   remove_report: bool = True) -> CallRun:
    """Run one harness source as an exec to its end and read its report.

    Args:
        call: the call id the harness writes into its report; a report without it is none
            (one an earlier call left at a reused path).
        remove_report: remove the report once read; False where the path is rewritten by the
            next call (a deployed function's instance) or the sandbox goes away (ephemeral).

    Raises:
        ProtocolError: what starting the exec raises, or the agent's refusal before it started.
    """
    message: dict[str, Any] = {"id": 0, "op": "exec.start", "code": source, "language": language}
    if timeout is not None:
        message["timeout"] = timeout
    if namespace is not None and language == "python":
        message["namespace"] = namespace
    if tag is not None:
        message["tag"] = tag
    if env:
        message["env"] = env
    args = schema.parse(message, schema.CLIENT).args
    limits = manager.settings.limits
    output = OutputCollector(limits.exec_output_bytes, limits.exec_stream_output_bytes)
    record = await manager.start_exec(sandbox, args, output, default_timeout=limits.exec_timeout_s,
                                      remember_code=False)
    await record.done.wait()
    end = record.end or {}
    if record.refused:
        raise ProtocolError.from_wire(end["error"])
    finished = end.get("exit_code") == 0 and not end.get("error") and not end.get("signal") and not record.cancelled
    found = None
    if finished and sandbox.state == "running":
        found = await _take_report(manager, sandbox, report, call=call, remove=remove_report)
    return CallRun(record, output, found)


async def _take_report(manager: SandboxManager, sandbox: Sandbox, path: str, *, call: str | None,
                       remove: bool) -> dict[str, Any] | None:
    """The report at `path` (removed when `remove`), None when there is none (or it is not
    `call`'s); `ResultTooLarge` as a report when it is larger than the gateway takes."""
    limit = manager.settings.functions.result_bytes
    data = bytearray()
    too_large = False
    try:
        stream = await manager.read_file(sandbox, path)
    except ProtocolError:
        return None
    # Sent right behind the read instead of after it: an agent opens the file for fs.read before
    # it takes its next request, and an open file is read whole even once it is removed; so the
    # removal costs no round trip of its own (~0.8 ms on WASM, measured by bench/functions.py).
    removal = asyncio.ensure_future(_remove_quietly(manager, sandbox, path)) if remove else None
    try:
        async for event in stream:
            if event["ev"] == "data":
                if len(data) + len(event["data"]) > limit:
                    too_large = True
                    break
                data += event["data"]
            elif event["ev"] == "end":
                if "error" in event:
                    return None  # no report: the call never wrote one
                break
    finally:
        if not stream.finished:
            stream.discard()
        if removal is not None:
            await removal
    if too_large:
        # The harness writes the call id first: a large report left by an earlier call is not this one's.
        if call is not None and not data.startswith(json.dumps({"call": call})[:-1].encode()):
            return None
        return {"status": "error", "result": None, "error": {
            "type": "ResultTooLarge", "traceback": "",
            "message": f"the result is larger than the {limit} bytes the gateway takes"}}
    try:
        report = json.loads(bytes(data))
    except ValueError:
        return None
    if not isinstance(report, dict) or (call is not None and report.get("call") != call):
        return None
    return report


async def _remove_quietly(manager: SandboxManager, sandbox: Sandbox, path: str) -> None:
    try:
        await manager.request(sandbox, "fs.remove", {"path": path})
    except ProtocolError:
        pass  # the report stays in the sandbox's private folder; the result is still good


def _clean_error(error: Any) -> dict[str, Any] | None:
    """A report's error, as the reply carries it (the guest wrote it: only its strings are kept)."""
    if not isinstance(error, dict):
        return None
    return {key: str(error.get(key) or "") for key in ("type", "message", "traceback")}


def _clean_files(files: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"created": [], "modified": [], "deleted": []}
    if isinstance(files, dict):
        for key in out:
            value = files.get(key)
            if isinstance(value, list):
                out[key] = [p for p in value if isinstance(p, str)]
        if files.get("truncated") is True:
            out["truncated"] = True
    return out


def invoke_result(run: CallRun) -> dict[str, Any]:
    """The invoke reply (REST contract) of a finished call."""
    report = run.report
    if report is not None and report.get("status") in ("success", "error"):
        status = report["status"]
        error = _clean_error(report.get("error")) if status == "error" else None
        result = report.get("result") if status == "success" else None
        files = _clean_files(report.get("files"))
    else:
        status, error = run.unfinished()
        result, files = None, _clean_files(None)
    if isinstance(run.end.get("files"), dict):  # the agent's tracking: /work, mounts and volumes
        files = _clean_files(run.end["files"])
    return {"status": status, "result": result, "error": error, "stdout": run.text("stdout"),
            "stderr": run.text("stderr"), "display": run.output.display, "duration_ms": run.end.get("duration_ms"),
            "files": files, "mounts": run.end.get("mounts"), "exec_id": run.record.exec_id,
            "truncated": run.output.truncated}


def test_result(run: CallRun) -> dict[str, Any]:
    """The test reply (REST contract) of a finished run."""
    report = run.report
    tests: list[dict[str, Any]] = []
    error: dict[str, Any] | None
    if report is not None and isinstance(report.get("tests"), list):
        for entry in report["tests"]:
            if isinstance(entry, dict):
                was_skipped = entry.get("skipped") is True
                tests.append({"name": str(entry.get("name", "")),
                              "passed": entry.get("passed") is True and not was_skipped, "skipped": was_skipped,
                              "duration_ms": entry.get("duration_ms") if isinstance(
                                  entry.get("duration_ms"), int | float) else None,
                              "error": None if entry.get("error") is None else str(entry["error"])})
        error = _clean_error(report.get("error"))
        status = "success" if error is None else "error"
    else:
        status, error = run.unfinished()
    passed = sum(1 for t in tests if t["passed"])
    skipped = sum(1 for t in tests if t["skipped"])
    failed = len(tests) - passed - skipped
    # The gateway counts: the summary always matches the list, whatever the guest wrote.
    success = error is None and failed == 0 and passed + skipped > 0
    return {"success": success, "status": status,
            "summary": {"total": len(tests), "passed": passed, "failed": failed, "skipped": skipped},
            "tests": tests, "error": error, "stdout": run.text("stdout"), "stderr": run.text("stderr"),
            "duration_ms": run.end.get("duration_ms"), "exec_id": run.record.exec_id,
            "truncated": run.output.truncated}


async def invoke_in(manager: SandboxManager, sandbox: Sandbox, args: dict[str, Any], *,
                    remove_report: bool = True) -> dict[str, Any]:
    """`POST /v1/sandboxes/{id}/invoke` and the `invoke` op: `args` as the schema checked them.
    The code is loaded afresh for each call (a fresh Python namespace): calls do not share state.
    `remove_report=False` leaves the report to the sandbox's destruction (an ephemeral call)."""
    args = dict(args)
    manager.code_cache.take_code(sandbox.tenant, args)
    language = args.get("language", "python")
    harness.check_language(language)
    if args.get("files"):
        await write_files(manager, sandbox, args["files"])
    call = harness.new_call_id()
    report = harness.report_path(call)
    source = harness.invoke_source(language, function=args["function"], args=list(args.get("args", [])),
                                   kwargs=dict(args.get("kwargs", {})), report=report, code=args["code"], call=call)
    run = await run_call(manager, sandbox, language=language, source=source, report=report,
                         timeout=args.get("timeout"), namespace="fresh", remove_report=remove_report)
    return invoke_result(run)


async def test_in(manager: SandboxManager, sandbox: Sandbox, args: dict[str, Any]) -> dict[str, Any]:
    """`POST /v1/sandboxes/{id}/test` and the `test` op: `args` as the schema checked them."""
    args = dict(args)
    manager.code_cache.take_code(sandbox.tenant, args)
    language = args.get("language", "python")
    harness.check_language(language, test=True)
    report = harness.new_report_path()
    source = harness.test_source(language, code=args["code"], tests=args["tests"], report=report)
    run = await run_call(manager, sandbox, language=language, source=source, report=report,
                         timeout=args.get("timeout"), namespace="fresh")
    return test_result(run)
