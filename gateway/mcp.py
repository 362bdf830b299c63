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
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from gateway import __version__
from gateway.client import AsyncClient, AsyncSandbox, ExecResult, SandgateError
from gateway.client.errors import BadRequest

log = logging.getLogger(__name__)

#: Output of one exec handed to the model (stdout and stderr together); more is cut and flagged.
MAX_OUTPUT = 100_000
#: The most of a file `read_file` returns.
MAX_READ = 1 << 20
DEFAULT_TIMEOUT = 60.0
LOOPBACK = ("127.0.0.1", "::1", "localhost")

INSTRUCTIONS = """\
sandgate runs untrusted code in isolated sandboxes. Create a sandbox with create_sandbox, then run
code (run_code) or commands (run_command, where the runtime has processes) and move files in and
out (write_file, read_file, list_files). Files live under the sandbox's root (/work on the WASM
runtime); paths are relative to it. Python state persists between run_code calls in one sandbox.
Destroy the sandbox with destroy_sandbox when done; idle sandboxes are reaped by the gateway.
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
        language: Annotated[Literal["python", "javascript"], Field(description="The language of `code`.")]
        = "python",
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

    return server


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

