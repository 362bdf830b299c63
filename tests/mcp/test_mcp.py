"""`sandgate mcp` as an agent runs it: a real subprocess, driven by the official MCP SDK's own client
over stdio (and streamable HTTP), against a real gateway with the real WASM runtime."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from typing import IO

import pytest
from mcp import Client

from gateway.client import AsyncSandbox
from guest_agent.languages import LANGUAGES
from tests.client.conftest import KEY
from tests.mcp.conftest import call, fail, mcp_stdio
from tests.serving import free_port

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

TOOLS = {"create_sandbox", "run_code", "run_command", "read_file", "write_file", "list_files", "destroy_sandbox",
         "list_sandboxes", "invoke_function", "run_tests", "start_execution", "wait_execution", "cancel_execution",
         "list_executions"}


async def test_tools_are_listed_with_descriptions_and_schemas(gateway_url: str, errlog: IO[str]) -> None:
    async with mcp_stdio(gateway_url, errlog) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        for tool in tools.values():
            assert tool.description and len(tool.description) > 30, tool.name
            assert tool.input_schema["type"] == "object"
        run_code = tools["run_code"].input_schema
        assert set(run_code["required"]) == {"sandbox_id", "code"}
        assert run_code["properties"]["language"]["enum"] == [lang.id for lang in LANGUAGES]
        assert "description" in run_code["properties"]["sandbox_id"]
        assert tools["read_file"].annotations is not None and tools["read_file"].annotations.read_only_hint
        destroy = tools["destroy_sandbox"].annotations
        assert destroy is not None and destroy.destructive_hint


async def test_a_session_of_tool_calls(gateway_url: str, errlog: IO[str]) -> None:
    async with mcp_stdio(gateway_url, errlog, "--runtime", "wasm") as client:
        created = await call(client, "create_sandbox", metadata={"agent": "test"})
        sid = created["sandbox_id"]
        assert created["runtime"] == "wasm" and "exec.python" in created["capabilities"]

        ran = await call(client, "run_code", sandbox_id=sid, code="import sys\nx = 21\nprint(x * 2)\n"
                                                                  "print('warn', file=sys.stderr)")
        assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (0, "42\n", "warn\n")
        again = await call(client, "run_code", sandbox_id=sid, code="print(x)")
        assert again["stdout"] == "21\n", "state persists between run_code calls"
        fresh = await call(client, "run_code", sandbox_id=sid, code="print('x' in globals())", fresh_namespace=True)
        assert fresh["stdout"] == "False\n"
        js = await call(client, "run_code", sandbox_id=sid, language="javascript", code="console.log(2 ** 10)")
        assert js["stdout"] == "1024\n"
        raised = await call(client, "run_code", sandbox_id=sid, code="raise KeyError('k')")
        assert raised["exit_code"] == 1 and "KeyError" in raised["stderr"], "a failing program is a result"
        echoed = await call(client, "run_code", sandbox_id=sid, code="print(input()[::-1])", stdin="olleh\n")
        assert echoed["stdout"] == "hello\n"

        assert (await call(client, "write_file", sandbox_id=sid, path="src/main.py",
                           content="print('from a file')\n"))["bytes"] == 21
        binary = bytes(range(256))
        await call(client, "write_file", sandbox_id=sid, path="bin/blob", content=base64.b64encode(binary).decode(),
                   encoding="base64")
        text = await call(client, "read_file", sandbox_id=sid, path="src/main.py")
        assert (text["content"], text["encoding"], text["truncated"]) == ("print('from a file')\n", "utf-8", False)
        blob = await call(client, "read_file", sandbox_id=sid, path="bin/blob")
        assert blob["encoding"] == "base64" and base64.b64decode(blob["content"]) == binary
        part = await call(client, "read_file", sandbox_id=sid, path="bin/blob", max_bytes=200)
        assert part["truncated"] and part["bytes"] == 200 and base64.b64decode(part["content"]) == binary[:200]
        listing = await call(client, "list_files", sandbox_id=sid, depth=2)
        assert {"src", "src/main.py", "bin", "bin/blob"} <= {e["path"] for e in listing["entries"]}
        by_file = await call(client, "run_code", sandbox_id=sid, code="exec(open('src/main.py').read())")
        assert by_file["stdout"] == "from a file\n"

        listed = await call(client, "list_sandboxes")
        assert [s["metadata"] for s in listed["sandboxes"] if s["sandbox_id"] == sid] == [{"agent": "test"}]
        assert (await call(client, "destroy_sandbox", sandbox_id=sid)) == {"destroyed": sid}
        assert sid not in [s["sandbox_id"] for s in (await call(client, "list_sandboxes"))["sandboxes"]]


async def test_tool_errors_carry_the_protocol_code_and_the_server_survives(gateway_url: str,
                                                                           errlog: IO[str]) -> None:
    async with mcp_stdio(gateway_url, errlog) as client:
        missing = await fail(client, "run_code", sandbox_id="sb_nope", code="print(1)")
        assert missing["error"]["code"] == "not_found" and missing["error"]["retryable"] is False
        sid = (await call(client, "create_sandbox", runtime="wasm"))["sandbox_id"]
        no_procs = await fail(client, "run_command", sandbox_id=sid, command=["ls", "-l"])
        assert no_procs["error"]["code"] == "unsupported"
        late = await fail(client, "run_code", sandbox_id=sid, code="print('partial', flush=True)\nwhile True: pass",
                          timeout_seconds=1)
        assert late["error"]["code"] == "timeout" and late["stdout"] == "partial\n", "the output so far comes too"
        assert (await fail(client, "read_file", sandbox_id=sid, path="nope.txt"))["error"]["code"] == "not_found"
        escape = await fail(client, "read_file", sandbox_id=sid, path="../../etc/passwd")
        assert escape["error"]["code"] == "path_escape"
        assert (await fail(client, "write_file", sandbox_id=sid, path="x", content="%%%", encoding="base64")
                )["error"]["code"] == "bad_request"
        assert (await fail(client, "create_sandbox", runtime="no-such-runtime"))["error"]["code"] == "bad_request"
        # Arguments the schema refuses are tool errors too (the MCP SDK validates them).
        assert (await client.call_tool("run_code", {"code": "print(1)"})).is_error
        assert (await client.call_tool("list_files", {"sandbox_id": sid, "depth": 99})).is_error
        # ... and after all that the server still works.
        assert (await call(client, "run_code", sandbox_id=sid, code="print('ok')"))["stdout"] == "ok\n"
        await call(client, "destroy_sandbox", sandbox_id=sid)
        gone = await fail(client, "destroy_sandbox", sandbox_id=sid)
        assert gone["error"]["code"] == "not_found"


async def test_a_wrong_key_is_a_tool_error(gateway_url: str, errlog: IO[str]) -> None:
    async with mcp_stdio(gateway_url, errlog, key="wrong") as client:
        refused = await fail(client, "list_sandboxes")
        assert refused["error"]["code"] == "unauthorized"


def test_bad_configuration_is_a_clear_exit() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SANDGATE_API_KEY"}
    no_key = subprocess.run([sys.executable, "-m", "gateway.cli", "mcp", "--url", "http://127.0.0.1:9"], env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert no_key.returncode == 2 and "SANDGATE_API_KEY" in no_key.stderr
    remote = subprocess.run([sys.executable, "-m", "gateway.cli", "mcp", "--http", "--host", "0.0.0.0"],
                            env={**env, "SANDGATE_API_KEY": KEY}, capture_output=True, text=True, timeout=60)
    assert remote.returncode == 2 and "loopback" in remote.stderr


async def test_streamable_http(gateway_url: str) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "mcp", "--http", "--port", str(port), "--url", gateway_url,
        "--runtime", "wasm", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "SANDGATE_API_KEY": KEY})
    assert proc.stderr is not None
    banner = b""
    try:
        while b"Uvicorn running on" not in banner:  # uvicorn says when it listens
            line = await proc.stderr.readline()
            assert line, f"sandgate mcp --http exited before listening: {banner.decode()}"
            banner += line
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            sid = (await call(client, "create_sandbox"))["sandbox_id"]
            assert (await call(client, "run_code", sandbox_id=sid, code="print(7 * 6)"))["stdout"] == "42\n"
            await call(client, "destroy_sandbox", sandbox_id=sid)
    finally:
        proc.terminate()
        await proc.communicate()  # drains stderr, waits for the exit
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells why.
    assert proc.returncode == -signal.SIGTERM


async def test_sandboxes_made_over_mcp_are_real(gateway_url: str, errlog: IO[str]) -> None:
    async with mcp_stdio(gateway_url, errlog, "--runtime", "wasm") as client:
        sid = (await call(client, "create_sandbox"))["sandbox_id"]
        await call(client, "write_file", sandbox_id=sid, path="shared.txt", content="seen by the SDK")
        sdk = await AsyncSandbox.connect(sid, url=gateway_url, api_key=KEY)
        assert await sdk.files.read_text("shared.txt") == "seen by the SDK"
        await sdk.destroy()
        await sdk.close()
