"""The sandgate Python SDK: sandboxes on a sandgate gateway, from async or plain Python code.

    from gateway.client import Sandbox

    with Sandbox.create(runtime="wasm") as sandbox:       # SANDGATE_URL, SANDGATE_API_KEY
        print(sandbox.exec(code="print(6 * 7)").stdout)    # 42

`AsyncSandbox` is the same API for asyncio. Functions: `sandbox.invoke(...)`, `sandbox.run_tests(...)`,
`client.invoke(...)` in a throwaway sandbox, `client.deploy_function(...)`, background executions
(`sandbox.start_execution(...)`), the code cache (`client.cache_entries()`). Errors are
`errors.SandgateError` subclasses named after the protocol's codes (`errors.NotFound`,
`errors.Busy`, ...). See docs/clients.md.
"""

from gateway.client import errors
from gateway.client.aio import AsyncClient, AsyncExecution, AsyncFiles, AsyncPorts, AsyncSandbox, AsyncWatch
from gateway.client.errors import SandgateError
from gateway.client.models import (
    CacheEntry,
    Display,
    ExecEvent,
    ExecResult,
    ExecutionInfo,
    Exited,
    FileChanges,
    FileInfo,
    FunctionError,
    FunctionInfo,
    InvokeResult,
    Metrics,
    NetworkPolicy,
    Output,
    OutputLost,
    PortInfo,
    SandboxInfo,
    Started,
    TestOutcome,
    TestReport,
    TestSummary,
    VolumeInfo,
    WatchEvent,
)
from gateway.client.sync import Client, Execution, Files, Ports, Sandbox, Watch

__all__ = [
    "AsyncClient",
    "AsyncExecution",
    "AsyncFiles",
    "AsyncPorts",
    "AsyncSandbox",
    "AsyncWatch",
    "CacheEntry",
    "Client",
    "Display",
    "ExecEvent",
    "ExecResult",
    "Execution",
    "ExecutionInfo",
    "Exited",
    "FileChanges",
    "FileInfo",
    "Files",
    "FunctionError",
    "FunctionInfo",
    "InvokeResult",
    "Metrics",
    "NetworkPolicy",
    "Output",
    "OutputLost",
    "PortInfo",
    "Ports",
    "Sandbox",
    "SandboxInfo",
    "SandgateError",
    "Started",
    "TestOutcome",
    "TestReport",
    "TestSummary",
    "VolumeInfo",
    "Watch",
    "WatchEvent",
    "errors",
]
