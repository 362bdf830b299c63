"""The sandgate Python SDK: sandboxes on a sandgate gateway, from async or plain Python code.

    from gateway.client import Sandbox

    with Sandbox.create(runtime="wasm") as sandbox:       # SANDGATE_URL, SANDGATE_API_KEY
        print(sandbox.exec(code="print(6 * 7)").stdout)    # 42

`AsyncSandbox` is the same API for asyncio. Errors are `errors.SandgateError` subclasses named after
the protocol's codes (`errors.NotFound`, `errors.Busy`, ...). See docs/clients.md.
"""

from gateway.client import errors
from gateway.client.aio import AsyncClient, AsyncExecution, AsyncFiles, AsyncSandbox
from gateway.client.errors import SandgateError
from gateway.client.models import (
    ExecEvent,
    ExecResult,
    Exited,
    FileInfo,
    Metrics,
    Output,
    OutputLost,
    SandboxInfo,
    Started,
)
from gateway.client.sync import Client, Execution, Files, Sandbox

__all__ = [
    "AsyncClient",
    "AsyncExecution",
    "AsyncFiles",
    "AsyncSandbox",
    "Client",
    "ExecEvent",
    "ExecResult",
    "Execution",
    "Exited",
    "FileInfo",
    "Files",
    "Metrics",
    "Output",
    "OutputLost",
    "Sandbox",
    "SandboxInfo",
    "SandgateError",
    "Started",
    "errors",
]
