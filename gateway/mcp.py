"""`sandgate mcp`: a Model Context Protocol server that lets an AI agent use sandgate sandboxes.

It is a client of a gateway, through the Python SDK (`gateway.client`), and speaks MCP over stdio
(what desktop agents spawn) or, with `--http`, streamable HTTP on loopback. Built on the official
`mcp` SDK (the `mcp` extra: `pip install 'sandgate[mcp]'`).

Every tool answers with structured content (and the same JSON as text). A failure is an MCP tool
error (`isError`) whose content is `{"error": {"code", "message", "retryable"}}` with the protocol's
stable code, plus the partial output when an exec started and then failed; nothing a tool meets
(a gateway error, a dropped connection, bad arguments) stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from gateway import __version__
from gateway.client import AsyncClient, AsyncSandbox, ExecResult, InvokeResult, SandgateError, TestReport
from gateway.client.errors import BadRequest
from guest_agent.languages import LANGUAGES

log = logging.getLogger(__name__)

#: Output of one exec handed to the model (stdout and stderr together); more is cut and flagged.
MAX_OUTPUT = 100_000
#: The most of a file `read_file` returns.
MAX_READ = 1 << 20
DEFAULT_TIMEOUT = 60.0
#: The longest one `wait_execution` call may wait: under the 60 s request limit many MCP clients have.
MAX_WAIT = 50.0
#: How often `wait_execution` reports progress while it waits.
PROGRESS_EVERY = 5.0
LOOPBACK = ("127.0.0.1", "::1", "localhost")

INSTRUCTIONS = """\
sandgate runs untrusted code in isolated sandboxes. Create a sandbox with create_sandbox, then run
code (run_code) or commands (run_command, where the runtime has processes) and move files in and
out (write_file, read_file, list_files). Files live under the sandbox's root (/work on the WASM
runtime); paths are relative to it. Python state persists between run_code calls in one sandbox.
Destroy the sandbox with destroy_sandbox when done; idle sandboxes are reaped by the gateway.
invoke_function calls one function with JSON arguments and returns its value (a deployed function
by name, or a function of given code); run_tests runs tests (pytest for Python) against code.
For work that may outlast one request, start_execution returns at once with an execution id;
wait_execution waits a bounded time (with progress notifications) and returns the new output and
the state, so call it again (with the output_offset it gave) until the state is no longer running;
cancel_execution stops it.
Errors carry a stable code (not_found, busy, timeout, unsupported, ...) and whether retrying can help."""


class Sandboxes:
    """The server's view of the gateway: one SDK client, one sandbox handle (and WebSocket) per id."""

    def __init__(self, client: AsyncClient, default_runtime: str | None) -> None:
        self.client = client
        self.default_runtime = default_runtime
        self._handles: dict[str, AsyncSandbox] = {}

    def get(self, sandbox_id: str) -> AsyncSandbox:
        handle = self._handles.get(sandbox_id)
        if handle is None or handle.broken:
            handle = self._handles[sandbox_id] = self.client.sandbox(sandbox_id)
        return handle

    async def forget(self, sandbox_id: str) -> None:
        handle = self._handles.pop(sandbox_id, None)
        if handle is not None:
            await handle.close()

    async def close(self) -> None:
        for sandbox_id in list(self._handles):
            await self.forget(sandbox_id)
        await self.client.close()


def _result(data: dict[str, Any], *, error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(data, indent=1))],
                          structured_content=data, is_error=error)


def _exec_answer(result: ExecResult) -> dict[str, Any]:
    answer: dict[str, Any] = {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
                              "duration_seconds": round(result.duration, 3), "truncated": result.truncated}
    if result.signal:
        answer["signal"] = result.signal
    return answer


def _capped(stdout: str, stderr: str) -> tuple[str, str, bool]:
    """Output for the model: stdout first, then stderr, MAX_OUTPUT characters together at most."""
    if len(stdout) + len(stderr) <= MAX_OUTPUT:
        return stdout, stderr, False
    kept = stdout[:MAX_OUTPUT]
    return kept, stderr[:MAX_OUTPUT - len(kept)], True


def _invoke_answer(done: InvokeResult) -> dict[str, Any]:
    stdout, stderr, cut = _capped(done.stdout, done.stderr)
    answer: dict[str, Any] = {
        "status": done.status, "result": done.result,
        "error": None if done.error is None else {"type": done.error.type, "message": done.error.message,
                                                  "traceback": done.error.traceback},
        "stdout": stdout, "stderr": stderr, "truncated": done.truncated or cut,
        "duration_seconds": None if done.duration_ms is None else round(done.duration_ms / 1000, 3),
        "files": {"created": done.files.created, "modified": done.files.modified, "deleted": done.files.deleted}}
    if done.cold is not None:
        answer.update(cold=done.cold, instance=done.instance)
    return answer


def _tests_answer(report: TestReport) -> dict[str, Any]:
    stdout, stderr, cut = _capped(report.stdout, report.stderr)
    return {
        "success": report.success,
        "summary": {"total": report.summary.total, "passed": report.summary.passed, "failed": report.summary.failed,
                    "skipped": report.summary.skipped},
        "tests": [{"name": t.name, "passed": t.passed, "skipped": t.skipped, "error": t.error} for t in report.tests],
        "error": None if report.error is None else {"type": report.error.type, "message": report.error.message},
        "stdout": stdout, "stderr": stderr, "truncated": report.truncated or cut,
        "duration_seconds": None if report.duration_ms is None else round(report.duration_ms / 1000, 3)}


async def _guarded(work: Callable[[], Awaitable[dict[str, Any]]]) -> CallToolResult:
    """Run a tool's work; a sandgate error becomes a tool error carrying the protocol's code."""
    try:
        return _result(await work())
    except SandgateError as exc:
        body: dict[str, Any] = {"error": exc.to_dict()}
        if exc.result is not None:
            body.update(_exec_answer(exc.result))
        return _result(body, error=True)


SandboxId = Annotated[str, Field(description="The sandbox's id, as create_sandbox or list_sandboxes gave it.")]
TimeoutSeconds = Annotated[float, Field(gt=0, le=3600, description="Seconds before the run is stopped.")]
Stdin = Annotated[str | None, Field(description="Text for the program's standard input.")]


def build_server(sandboxes: Sandboxes) -> MCPServer:
    """The MCP server with sandgate's tools, bound to `sandboxes`."""
    server = MCPServer("sandgate", instructions=INSTRUCTIONS, version=__version__)

    @server.tool(annotations=ToolAnnotations(title="Create a sandbox", destructive_hint=False, open_world_hint=False))
    async def create_sandbox(
        runtime: Annotated[str | None, Field(description="Runtime id, e.g. 'wasm' (Python and JavaScript, no "
                                                         "processes). Default: the server's default.")] = None,
        ttl_seconds: Annotated[float | None, Field(gt=0, description="Absolute lifetime in seconds.")] = None,
        idle_timeout_seconds: Annotated[float | None, Field(gt=0, description="Seconds without activity after "
                                                                              "which the sandbox is reaped.")] = None,
        memory_mb: Annotated[int | None, Field(gt=0, description="Memory limit in MiB.")] = None,
        metadata: Annotated[dict[str, str] | None, Field(description="String labels kept with it.")] = None,
    ) -> CallToolResult:
        """Create a new isolated sandbox and return its id and capabilities (e.g. exec.python,
        exec.javascript, exec.process, fs). Use the id with the other tools."""

        async def work() -> dict[str, Any]:
            sandbox = await sandboxes.client.create_sandbox(
                runtime or sandboxes.default_runtime, ttl=ttl_seconds, idle_timeout=idle_timeout_seconds,
                memory_mb=memory_mb, metadata=metadata)
            info = sandbox.info
            return {"sandbox_id": info.id, "runtime": info.runtime, "capabilities": sorted(info.capabilities),
                    "expires_at": info.expires_at, "idle_timeout_seconds": info.idle_timeout}

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="Run code", destructive_hint=True, open_world_hint=False))
    async def run_code(
        sandbox_id: SandboxId,
        code: Annotated[str, Field(description="The source to run.")],
        language: Language = "python",
        stdin: Stdin = None,
        timeout_seconds: TimeoutSeconds = DEFAULT_TIMEOUT,
        fresh_namespace: Annotated[bool, Field(description="Python: run in a fresh namespace instead of the "
                                                           "persistent one.")] = False,
    ) -> CallToolResult:
        """Run Python or JavaScript source in a sandbox and return exit_code, stdout and stderr.
        Python variables and imports persist between calls unless fresh_namespace is set. A
        non-zero exit_code is a normal result; a timeout is an error that still carries the output."""

        async def work() -> dict[str, Any]:
            result = await sandboxes.get(sandbox_id).exec(
                code=code, language=language, stdin=stdin, timeout=timeout_seconds,
                namespace="fresh" if fresh_namespace else None, max_output_bytes=MAX_OUTPUT)
            return _exec_answer(result)

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="Run a command", destructive_hint=True, open_world_hint=False))
    async def run_command(
        sandbox_id: SandboxId,
        command: Annotated[str | list[str], Field(description="A shell command line (run by /bin/sh -c), or an "
                                                              "argv list run without a shell.")],
        stdin: Stdin = None,
        cwd: Annotated[str | None, Field(description="Working directory, relative to the sandbox root.")] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra environment variables.")] = None,
        timeout_seconds: TimeoutSeconds = DEFAULT_TIMEOUT,
    ) -> CallToolResult:
        """Run a process in a sandbox and return exit_code, stdout and stderr. Needs a runtime with
        processes (capability exec.process); others answer with the error code 'unsupported'."""

        async def work() -> dict[str, Any]:
            if isinstance(command, list) and not command:
                raise BadRequest("command must not be empty")
            result = await sandboxes.get(sandbox_id).exec(command, stdin=stdin, cwd=cwd, env=env,
                                                          timeout=timeout_seconds, max_output_bytes=MAX_OUTPUT)
            return _exec_answer(result)

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="Read a file", read_only_hint=True, open_world_hint=False))
    async def read_file(
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="The file, relative to the sandbox root.")],
        max_bytes: Annotated[int, Field(gt=0, le=MAX_READ, description="Return at most this many bytes.")]
        = 256 * 1024,
    ) -> CallToolResult:
        """Read a file from a sandbox. Text comes back as UTF-8 (encoding 'utf-8'), anything else as
        base64 (encoding 'base64'); `truncated` says the file is longer than max_bytes."""

        async def work() -> dict[str, Any]:
            data = bytearray()
            chunks = sandboxes.get(sandbox_id).files.stream(path)
            try:
                async for chunk in chunks:
                    data += chunk
                    if len(data) > max_bytes:
                        break
            finally:
                await chunks.aclose()
            truncated = len(data) > max_bytes
            body = bytes(data[:max_bytes])
            try:
                text, encoding = body.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                text, encoding = base64.b64encode(body).decode("ascii"), "base64"
            return {"path": path, "content": text, "encoding": encoding, "bytes": len(body), "truncated": truncated}

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="Write a file", destructive_hint=True, idempotent_hint=True,
                                             open_world_hint=False))
    async def write_file(
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="The file, relative to the sandbox root; parent directories "
                                               "are created.")],
        content: Annotated[str, Field(description="The file's content.")],
        encoding: Annotated[Literal["utf-8", "base64"], Field(description="How `content` is encoded.")] = "utf-8",
    ) -> CallToolResult:
        """Create or replace a file in a sandbox (whole or not at all)."""

        async def work() -> dict[str, Any]:
            try:
                data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
            except (binascii.Error, ValueError):
                raise BadRequest("content is not valid base64") from None
            written = await sandboxes.get(sandbox_id).files.write(path, data)
            return {"path": path, "bytes": written}

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="List files", read_only_hint=True, open_world_hint=False))
    async def list_files(
        sandbox_id: SandboxId,
        path: Annotated[str, Field(description="The directory, relative to the sandbox root.")] = ".",
        depth: Annotated[int, Field(ge=1, le=16, description="How many levels down to list.")] = 1,
    ) -> CallToolResult:
        """List a directory in a sandbox: each entry's path (relative to `path`), type and size."""

        async def work() -> dict[str, Any]:
            entries = await sandboxes.get(sandbox_id).files.list(path, depth=depth)
            return {"path": path, "entries": [{"path": e.path, "type": e.type, "size": e.size} for e in entries]}

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="Destroy a sandbox", destructive_hint=True, idempotent_hint=False,
                                             open_world_hint=False))
    async def destroy_sandbox(sandbox_id: SandboxId) -> CallToolResult:
        """Destroy a sandbox and everything in it."""

        async def work() -> dict[str, Any]:
            try:
                await sandboxes.get(sandbox_id).destroy()
            finally:
                await sandboxes.forget(sandbox_id)
            return {"destroyed": sandbox_id}

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="List sandboxes", read_only_hint=True, open_world_hint=False))
    async def list_sandboxes() -> CallToolResult:
        """List the sandboxes of this API key's tenant: id, runtime, state, expiry and labels."""

        async def work() -> dict[str, Any]:
            infos = await sandboxes.client.list_sandboxes()
            return {"sandboxes": [{"sandbox_id": i.id, "runtime": i.runtime, "state": i.state,
                                   "expires_at": i.expires_at, "execs_running": i.execs_running,
                                   "metadata": i.metadata} for i in infos]}

        return await _guarded(work)

    _function_tools(server, sandboxes)
    _execution_tools(server, sandboxes)
    return server


Arguments = Annotated[list[Any], Field(description="Positional arguments (JSON values).")]
KeywordArguments = Annotated[dict[str, Any], Field(description="Keyword arguments (JSON values); JavaScript "
                                                                "functions get them as a last options object.")]
#: The language ids of the one table (a sandbox runs those its `capabilities` list as `exec.<id>`).
Language = Annotated[str, Field(description="The language of `code` (a sandbox runs those its capabilities "
                                            "list as exec.<language>).",
                                json_schema_extra={"enum": [lang.id for lang in LANGUAGES]})]
ExecutionId = Annotated[str, Field(description="The execution's id, as start_execution gave it.")]


def _function_tools(server: MCPServer, sandboxes: Sandboxes) -> None:
    @server.tool(annotations=ToolAnnotations(title="Invoke a function", destructive_hint=True,
                                             open_world_hint=False))
    async def invoke_function(
        function: Annotated[str, Field(description="The function's name: a deployed function when `code` is not "
                                                   "given, else a function that `code` defines.")],
        args: Arguments = [],  # noqa: B006  (a schema default: never mutated)
        kwargs: KeywordArguments = {},  # noqa: B006
        code: Annotated[str | None, Field(description="Source that defines `function`. Omit it to call a "
                                                      "deployed function.")] = None,
        sandbox_id: Annotated[str | None, Field(description="With `code`: the sandbox to call it in (files it "
                                                            "writes stay there). Omitted: a fresh sandbox that is "
                                                            "destroyed after the call.")] = None,
        language: Language = "python",
        timeout_seconds: TimeoutSeconds = DEFAULT_TIMEOUT,
    ) -> CallToolResult:
        """Call one function with JSON arguments and return its value: `status` is success (see
        `result`), error (it raised: `error.type` is the exception class, with its message and
        traceback), crash, timeout or terminated; plus stdout, stderr and the files the call
        created, modified and deleted. For a deployed function, `cold` says whether the call had
        to load it and `instance` which instance ran it."""

        async def work() -> dict[str, Any]:
            if code is None:
                if sandbox_id is not None:
                    raise BadRequest("give `code` to call a function in a sandbox (without it, `function` names a "
                                     "deployed function)")
                done = await sandboxes.client.invoke_function(function, args, kwargs,
                                                              wait=timeout_seconds + DEFAULT_TIMEOUT)
            elif sandbox_id is None:
                done = await sandboxes.client.invoke(function, args, kwargs, code=code, language=language,
                                                     timeout=timeout_seconds, runtime=sandboxes.default_runtime)
            else:
                done = await sandboxes.get(sandbox_id).invoke(function, args, kwargs, code=code, language=language,
                                                              timeout=timeout_seconds)
            return _invoke_answer(done)

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="Run tests", destructive_hint=True, open_world_hint=False))
    async def run_tests(
        sandbox_id: SandboxId,
        code: Annotated[str, Field(description="The code under test.")],
        tests: Annotated[str, Field(description="Python: pytest test functions (`def test_x(): assert ...`), "
                                                "with `code`'s names in scope. JavaScript: `test(name, fn)` calls "
                                                "using `assert.is/equal/ok/not/throws`.")],
        language: Language = "python",
        timeout_seconds: TimeoutSeconds = DEFAULT_TIMEOUT,
    ) -> CallToolResult:
        """Run tests against code in a sandbox (real pytest for Python) and return `success`, a
        summary (total, passed, failed, skipped) and each test's outcome with its failure message.
        Failing tests are a normal result."""

        async def work() -> dict[str, Any]:
            report = await sandboxes.get(sandbox_id).run_tests(code, tests, language=language,
                                                               timeout=timeout_seconds)
            return _tests_answer(report)

        return await _guarded(work)


def _execution_tools(server: MCPServer, sandboxes: Sandboxes) -> None:
    @server.tool(annotations=ToolAnnotations(title="Start a background execution", destructive_hint=True,
                                             open_world_hint=False))
    async def start_execution(
        sandbox_id: SandboxId,
        code: Annotated[str | None, Field(description="Source to run (or give `command`).")] = None,
        command: Annotated[str | list[str] | None, Field(description="A shell command line or an argv list, on "
                                                                     "runtimes with processes.")] = None,
        language: Language = "python",
        stdin: Stdin = None,
        timeout_seconds: Annotated[float, Field(gt=0, le=86400, description="Seconds before the run is "
                                                                            "stopped.")] = 3600.0,
        tag: Annotated[str | None, Field(description="A label shown by list_executions.")] = None,
    ) -> CallToolResult:
        """Start code or a command in a sandbox in the background and return at once with its
        `execution_id`. Use it for anything that may take longer than one request: follow it with
        wait_execution, stop it with cancel_execution. It keeps running if this session ends."""

        async def work() -> dict[str, Any]:
            if (code is None) == (command is None):
                raise BadRequest("give exactly one of `code` and `command`")
            started = await sandboxes.get(sandbox_id).start_execution(
                command, code=code, language=language if code is not None else None, stdin=stdin,
                timeout=timeout_seconds, tag=tag)
            return {"execution_id": started.id, "state": started.state}

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="Wait for an execution", read_only_hint=True,
                                             open_world_hint=False))
    async def wait_execution(
        sandbox_id: SandboxId,
        execution_id: ExecutionId,
        ctx: Context,
        wait_seconds: Annotated[float, Field(ge=0, le=MAX_WAIT, description="Wait at most this long for the "
                                                                            "execution to end (keep it under your "
                                                                            "request time limit).")] = 30.0,
        output_offset: Annotated[int, Field(ge=0, description="Where the output continues: the output_offset of "
                                                              "the previous wait_execution (0: from the start).")]
        = 0,
    ) -> CallToolResult:
        """Wait up to wait_seconds for a background execution to end, reporting progress as it
        waits, and return its `state` (pending, running, completed, failed, cancelled, timeout),
        `exit_code`, and the stdout and stderr since `output_offset`. While `finished` is false,
        call again with the returned `output_offset` to get the output that follows."""

        async def work() -> dict[str, Any]:
            sandbox = sandboxes.get(sandbox_id)
            loop = asyncio.get_running_loop()
            began = loop.time()
            offset = output_offset
            out: dict[str, list[str]] = {"stdout": [], "stderr": []}
            size = 0
            while True:
                hold = max(0.0, min(PROGRESS_EVERY, began + wait_seconds - loop.time()))
                info = await sandbox.get_execution(execution_id, wait=True, timeout=hold, output_offset=offset)
                out["stdout"].append(info.stdout)
                out["stderr"].append(info.stderr)
                size += len(info.stdout) + len(info.stderr)
                offset = info.output_offset if info.output_offset is not None else offset
                elapsed = loop.time() - began
                await ctx.report_progress(min(elapsed, wait_seconds), wait_seconds,
                                          f"execution {execution_id}: {info.state}, {size} characters of output")
                if info.finished or elapsed >= wait_seconds or size > MAX_OUTPUT:
                    break
            stdout, stderr, cut = _capped("".join(out["stdout"]), "".join(out["stderr"]))
            answer: dict[str, Any] = {
                "execution_id": info.id, "state": info.state, "finished": info.finished,
                "exit_code": info.exit_code, "stdout": stdout, "stderr": stderr, "output_offset": offset,
                "truncated": cut,
                "duration_seconds": None if info.duration_ms is None else round(info.duration_ms / 1000, 3)}
            if info.signal:
                answer["signal"] = info.signal
            if info.error is not None:
                answer["error"] = info.error.to_dict()
            if info.output_lost is not None:
                answer["output_lost"] = True
            return answer

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="Cancel an execution", destructive_hint=True,
                                             idempotent_hint=True, open_world_hint=False))
    async def cancel_execution(sandbox_id: SandboxId, execution_id: ExecutionId) -> CallToolResult:
        """Stop a background execution (its state becomes cancelled); one that already ended is
        left as it is."""

        async def work() -> dict[str, Any]:
            info = await sandboxes.get(sandbox_id).cancel_execution(execution_id)
            return {"execution_id": info.id, "state": info.state, "exit_code": info.exit_code}

        return await _guarded(work)

    @server.tool(annotations=ToolAnnotations(title="List executions", read_only_hint=True, open_world_hint=False))
    async def list_executions(
        sandbox_id: SandboxId,
        state: Annotated[Literal["pending", "running", "completed", "failed", "cancelled", "timeout"] | None,
                         Field(description="Only executions in this state.")] = None,
    ) -> CallToolResult:
        """List a sandbox's executions, newest first: id, tag, state and exit code."""

        async def work() -> dict[str, Any]:
            listed = await sandboxes.get(sandbox_id).list_executions(state=state, limit=100)
            return {"executions": [{"execution_id": e.id, "tag": e.tag, "state": e.state, "exit_code": e.exit_code}
                                   for e in listed]}

        return await _guarded(work)


async def _serve(server: MCPServer, sandboxes: Sandboxes, args: argparse.Namespace) -> None:
    try:
        if args.http:
            await server.run_streamable_http_async(host=args.host, port=args.port)
        else:
            await server.run_stdio_async()
    finally:
        await sandboxes.close()


def main(args: argparse.Namespace) -> int:
    """`sandgate mcp`: serve until stdin closes (stdio) or until interrupted (HTTP)."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.http and args.host not in LOOPBACK:
        print(f"sandgate mcp: refusing to serve MCP over HTTP on {args.host}: the endpoint has no "
              "authentication of its own and holds a gateway key; keep it on loopback", file=sys.stderr)
        return 2
    try:
        client = AsyncClient(args.url, args.api_key)
    except (SandgateError, ValueError) as exc:
        print(f"sandgate mcp: {exc}", file=sys.stderr)
        return 2
    sandboxes = Sandboxes(client, args.runtime)
    asyncio.run(_serve(build_server(sandboxes), sandboxes, args))
    return 0

