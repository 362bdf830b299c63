"""Instrumentation applied inside the bench server only (`BENCH_PATCH=trace python bench/_server.py`):
timestamps at the gateway's stage boundaries for bench/exec_breakdown.py. Nothing under gateway/ or
plugins/ is edited. (Candidate fixes were once measured here the same way; the ones that helped are
now in the source, see docs/benchmarks.md.)
"""

from __future__ import annotations

from typing import Any

PATCHES: dict[str, Any] = {}


def apply(names: str) -> list[str]:
    applied = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        PATCHES[name]()
        applied.append(name)
    return applied


#: (label, time.perf_counter()) pairs recorded by the `trace` patch; read by GET /_bench/trace.
TRACE: list[tuple[str, float]] = []


def trace() -> None:
    """Not a fix: timestamps (perf_counter, CLOCK_MONOTONIC, comparable across processes) at the
    gateway's stage boundaries, for bench/exec_breakdown.py. Costs ~1 us per mark."""
    import time

    from gateway.runtime.agent_client import AgentClient
    from gateway.runtime.base import StreamChannel
    from gateway.web.ws import Session

    clock = time.perf_counter
    mark = TRACE.append

    handle = Session.handle

    async def traced_handle(self: Any, payload: Any) -> None:
        mark(("ws_in", clock()))
        await handle(self, payload)

    write = StreamChannel.write

    async def traced_write(self: Any, data: bytes) -> None:
        mark(("pipe_write", clock()))
        await write(self, data)

    dispatch = AgentClient._dispatch

    async def traced_dispatch(self: Any, message: dict[str, Any]) -> None:
        mark((f"agent_{message.get('ev', 'reply')}", clock()))
        await dispatch(self, message)

    send = Session.send

    async def traced_send(self: Any, message: dict[str, Any]) -> None:
        label = message.get("ev", "reply")
        mark((f"ws_out_{label}", clock()))
        await send(self, message)
        mark((f"ws_sent_{label}", clock()))

    Session.handle = traced_handle  # type: ignore[method-assign]
    StreamChannel.write = traced_write  # type: ignore[method-assign]
    AgentClient._dispatch = traced_dispatch  # type: ignore[method-assign]
    Session.send = traced_send  # type: ignore[method-assign]


PATCHES["trace"] = trace


def trace_invoke() -> None:
    """Not a fix: timestamps along an invoke, for bench/functions.py: the registry's invoke and
    a sandbox invoke (in, out), every write to an agent's pipe, every agent event or reply as it
    is dispatched (labelled by its `ev`), reading the report, and creating and destroying a
    sandbox (in, out)."""
    import time

    import gateway.functions.calls as calls
    import gateway.web.rest_functions as rest_functions
    from gateway.functions.deployed import FunctionRegistry
    from gateway.runtime.agent_client import AgentClient
    from gateway.runtime.base import StreamChannel
    from gateway.sessions.manager import SandboxManager

    clock = time.perf_counter
    mark = TRACE.append

    def around(label: str, coro_fn: Any) -> Any:
        async def traced(*args: Any, **kwargs: Any) -> Any:
            mark((f"{label}_in", clock()))
            try:
                return await coro_fn(*args, **kwargs)
            finally:
                mark((f"{label}_out", clock()))
        return traced

    write = StreamChannel.write

    async def traced_write(self: Any, data: bytes) -> None:
        mark(("pipe_write", clock()))
        await write(self, data)

    dispatch = AgentClient._dispatch

    async def traced_dispatch(self: Any, event: Any) -> None:
        mark((f"agent_{getattr(event, 'ev', None) or 'reply'}", clock()))
        await dispatch(self, event)

    SandboxManager.create = around("create", SandboxManager.create)  # type: ignore[method-assign]
    SandboxManager.destroy = around("destroy", SandboxManager.destroy)  # type: ignore[method-assign]
    calls.invoke_in = around("sandbox_invoke", calls.invoke_in)
    rest_functions.invoke_in = calls.invoke_in
    FunctionRegistry.invoke = around("invoke", FunctionRegistry.invoke)  # type: ignore[method-assign]
    calls._take_report = around("report", calls._take_report)
    StreamChannel.write = traced_write  # type: ignore[method-assign]
    AgentClient._dispatch = traced_dispatch  # type: ignore[method-assign]


PATCHES["trace_invoke"] = trace_invoke
