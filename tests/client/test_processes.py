"""What the SDK does on a runtime with processes, signals and a PTY. The example runtime runs the
real guest agent as a host process, so these features are real; the WASM runtime has none of them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import sandgate_example_runtime
from aiohttp.test_utils import TestServer

from gateway.client import AsyncSandbox, Output, errors
from gateway.web.app import create_app
from tests.client.conftest import KEY, only, settings


@pytest.fixture
async def local_url(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
    app = create_app(settings(blocked_plugins=only("example-local"), default_runtime="example-local"),
                     plugins=[sandgate_example_runtime])
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def test_commands_argv_and_shell(local_url: str) -> None:
    async with AsyncSandbox.create(url=local_url, api_key=KEY) as sb:
        assert sb.info.runtime == "example-local" and "exec.process" in sb.info.capabilities
        argv = await sb.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (argv.exit_code, argv.stdout, argv.stderr) == (3, "out\n", "err\n")
        shell = await sb.exec("echo $GREETING | tr a-z A-Z", env={"GREETING": "hey"})
        assert shell.stdout == "HEY\n" and shell.ok
        await sb.files.mkdir("sub")
        where = await sb.exec(["pwd"], cwd="sub")
        assert where.stdout.strip().endswith("/sub")


async def test_signals_end_a_process(local_url: str) -> None:
    async with AsyncSandbox.create(url=local_url, api_key=KEY) as sb:
        sleeper = await sb.start(["sleep", "600"])
        assert sleeper.pid is not None and sleeper.pid > 0
        await sleeper.signal("SIGTERM")
        result = await sleeper.wait()
        assert result.signal == "SIGTERM" and result.exit_code is None and result.error is None

        trapper = await sb.start(["sh", "-c", "trap 'echo got USR1; exit 0' USR1; echo ready; "
                                              "while true; do sleep 0.1; done"])
        async for event in trapper:
            if isinstance(event, Output) and event.text == "ready\n":
                await trapper.signal("SIGUSR1")  # any signal, not only killing ones
        assert trapper.finished
        assert (await trapper.wait()).stdout == "ready\ngot USR1\n"


async def test_pty_resize_and_typing(local_url: str) -> None:
    async with AsyncSandbox.create(url=local_url, api_key=KEY) as sb:
        terminal = await sb.start(["sh"], pty=(10, 40), tag="term")
        await terminal.resize(33, 77)
        await terminal.send_stdin("stty size; exit 7\n")
        result = await terminal.wait()
        assert "33 77" in result.pty and result.exit_code == 7
        assert result.stdout == "" and result.stderr == "", "a terminal's output arrives as pty"


async def test_exec_timeout_on_a_process(local_url: str) -> None:
    async with AsyncSandbox.create(url=local_url, api_key=KEY) as sb:
        with pytest.raises(errors.Timeout) as late:
            await sb.exec("echo begun; sleep 600", timeout=1)
        assert late.value.result is not None and late.value.result.stdout == "begun\n"
