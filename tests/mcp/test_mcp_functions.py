"""The MCP server's function tools, driven by the official MCP client over stdio against a real
gateway with real WASM sandboxes: invoke_function (deployed, in a sandbox, in a throwaway one),
run_tests, and long runs as background executions that a client with a request time limit follows
by polling wait_execution, with progress notifications while each call waits."""

from __future__ import annotations

from typing import IO, Any

import pytest

from gateway.client import AsyncClient
from tests.client.conftest import KEY
from tests.mcp.conftest import call, fail, mcp_stdio

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

ADD = "def add(a, b=0):\n    print('adding', a, b)\n    return a + b\n"


async def test_tool_schemas(gateway_url: str, errlog: IO[str]) -> None:
    async with mcp_stdio(gateway_url, errlog) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert tools["invoke_function"].input_schema["required"] == ["function"]
        assert set(tools["run_tests"].input_schema["required"]) == {"sandbox_id", "code", "tests"}
        wait = tools["wait_execution"].input_schema
        assert set(wait["required"]) == {"sandbox_id", "execution_id"} and "ctx" not in wait["properties"]
        assert wait["properties"]["wait_seconds"]["maximum"] <= 55, "a call stays under a 60 s request limit"


async def test_invoke_function_three_ways(gateway_url: str, errlog: IO[str]) -> None:
    async with AsyncClient(gateway_url, KEY) as sdk:
        await sdk.deploy_function("add", ADD, runtime="wasm")
    async with mcp_stdio(gateway_url, errlog, "--runtime", "wasm") as client:
        deployed = await call(client, "invoke_function", function="add", args=[2], kwargs={"b": 3})
        assert (deployed["status"], deployed["result"], deployed["cold"]) == ("success", 5, True), deployed
        assert deployed["stdout"] == "adding 2 3\n" and deployed["instance"]
        assert (await call(client, "invoke_function", function="add", args=[1]))["cold"] is False

        throwaway = await call(client, "invoke_function", function="mul", args=[6, 7],
                               code="def mul(a, b):\n    return a * b\n")
        assert throwaway["result"] == 42 and "cold" not in throwaway

        sid = (await call(client, "create_sandbox"))["sandbox_id"]
        raised = await call(client, "invoke_function", sandbox_id=sid, function="f", code="def f():\n    {}['k']\n")
        assert raised["status"] == "error" and raised["error"]["type"] == "KeyError", "an exception is a result"
        wrote = await call(client, "invoke_function", sandbox_id=sid, function="f",
                           code="def f():\n    open('out.txt', 'w').write('x')\n")
        assert wrote["files"]["created"] == ["out.txt"]
        js = await call(client, "invoke_function", sandbox_id=sid, function="greet", language="javascript",
                        args=["ada"], code="function greet(name) { return 'hi ' + name; }")
        assert js["result"] == "hi ada"

        assert (await fail(client, "invoke_function", function="nope"))["error"]["code"] == "not_found"
        no_code = await fail(client, "invoke_function", function="add", sandbox_id=sid)
        assert no_code["error"]["code"] == "bad_request"
        tests = await call(client, "run_tests", sandbox_id=sid, language="javascript",
                           code="function add(a, b) { return a + b; }",
                           tests="test('adds', () => { assert.is(add(1, 2), 3); });\n"
                                 "test('wrong', () => { assert.is(add(1, 1), 3); });")
        assert tests["success"] is False and tests["summary"] == {"total": 2, "passed": 1, "failed": 1, "skipped": 0}
        assert [t["name"] for t in tests["tests"] if not t["passed"]] == ["wrong"]
        await call(client, "destroy_sandbox", sandbox_id=sid)


async def test_long_runs_are_followed_by_polling_with_progress(gateway_url: str, errlog: IO[str]) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    async def wait(client: Any, **arguments: Any) -> dict[str, Any]:
        # A client whose requests may take 60 s at most, as many MCP clients have.
        result = await client.call_tool("wait_execution", arguments, read_timeout_seconds=60,
                                        progress_callback=on_progress)
        assert not result.is_error, result
        return result.structured_content  # type: ignore[no-any-return]

    async with mcp_stdio(gateway_url, errlog, "--runtime", "wasm") as client:
        sid = (await call(client, "create_sandbox"))["sandbox_id"]
        started = await call(client, "start_execution", sandbox_id=sid, tag="spin",
                             code="print('started', flush=True)\nwhile True:\n    pass\n")
        eid = started["execution_id"]
        assert started["state"] in ("pending", "running")

        # Poll the way a client with a request limit does: bounded waits, resumed at output_offset.
        stdout, offset = "", 0
        while "started" not in stdout:
            polled = await wait(client, sandbox_id=sid, execution_id=eid, wait_seconds=1, output_offset=offset)
            assert polled["state"] == "running" and polled["finished"] is False
            stdout += polled["stdout"]
            offset = polled["output_offset"]
        assert stdout == "started\n"
        assert progress and all(total == 1 for _, total, _ in progress), progress
        assert all(message and eid in message for _, _, message in progress)
        listed = await call(client, "list_executions", sandbox_id=sid, state="running")
        assert [(e["execution_id"], e["tag"]) for e in listed["executions"]] == [(eid, "spin")]

        cancelled = await call(client, "cancel_execution", sandbox_id=sid, execution_id=eid)
        assert cancelled["state"] == "cancelled"
        after = await wait(client, sandbox_id=sid, execution_id=eid, output_offset=offset)
        assert (after["state"], after["finished"], after["stdout"]) == ("cancelled", True, "")

        # A run that ends within the wait: all of its output, from the start.
        short = await call(client, "start_execution", sandbox_id=sid, code="for i in range(3):\n    print(i)")
        done = await wait(client, sandbox_id=sid, execution_id=short["execution_id"], wait_seconds=30)
        assert (done["state"], done["exit_code"], done["stdout"]) == ("completed", 0, "0\n1\n2\n")

        both = await fail(client, "start_execution", sandbox_id=sid, code="1", command="true")
        assert both["error"]["code"] == "bad_request"
        assert (await fail(client, "wait_execution", sandbox_id=sid, execution_id="e-nope"))["error"]["code"] == (
            "not_found")
        assert (await client.call_tool("wait_execution", {"sandbox_id": sid, "execution_id": eid,
                                                          "wait_seconds": 120})).is_error, "bounded by the schema"
        await call(client, "destroy_sandbox", sandbox_id=sid)
