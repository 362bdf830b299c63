"""Shared by the MCP tests: a real gateway (WASM runtime) and `sandgate mcp` as a real subprocess,
driven by the official MCP SDK's client."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import pytest
from aiohttp.test_utils import TestServer
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult

from gateway.web.app import create_app
from tests.client.conftest import KEY, settings


@pytest.fixture
async def gateway_url(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    server = await aiohttp_server(create_app(settings()))
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
def errlog(tmp_path: Path) -> Iterator[IO[str]]:
    """The MCP server's stderr, kept for failure messages."""
    with (tmp_path / "mcp-stderr.log").open("w+") as f:
        yield f


@asynccontextmanager
async def mcp_stdio(url: str, errlog: IO[str], *extra: str, key: str = KEY) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "gateway.cli", "mcp", "--url", url, *extra],
                                   env={"SANDGATE_API_KEY": key})
    async with Client(stdio_client(params, errlog=errlog)) as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool call that must succeed; its structured content."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, _text(result)
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def fail(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool call that must fail as a tool error; its structured content."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, _text(result)
    return result.structured_content or {}


def _text(result: CallToolResult) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)
