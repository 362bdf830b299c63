"""The async SDK's serverless calls against a real gateway: invoke and its statuses, ephemeral calls,
deployed functions (queue full: 429 as `QuotaExceeded`), background executions followed without
loss, and the code cache.

The client logic is what is under test here, so the gateway runs the example runtime (the real
guest agent as a host process: fast, and a call can wait for a file the test creates, so nothing
depends on timing). The same calls on real WASM sandboxes: test_functions_wasm.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sandgate_example_runtime
from aiohttp.test_utils import TestServer

from gateway.client import AsyncClient, AsyncSandbox, ExecutionInfo, FileChanges, errors
from gateway.config import Functions
from gateway.web.app import MANAGER, create_app
from tests.client.conftest import KEY, OTHER_KEY, only, settings

ADD = "def add(a, b=0):\n    print('adding', a, b)\n    return a + b\n"
#: Blocks until the file `flag` exists: a call or execution that runs until the test lets it go.
GATE = ("import os, time\n\n"
        "def gate(flag, answer=None):\n"
        "    print('waiting', flush=True)\n"
        "    while not os.path.exists(flag):\n"
        "        time.sleep(0.01)\n"
        "    return answer\n")


@dataclass
class Local:
    url: str
    server: TestServer


@pytest.fixture
async def local(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Local:
    app = create_app(settings(blocked_plugins=only("example-local"), default_runtime="example-local",
                              functions=Functions(queue_per_instance=1, queue_wait_s=30.0)),
                     plugins=[sandgate_example_runtime])
    server = await aiohttp_server(app)
    return Local(f"http://127.0.0.1:{server.port}", server)


@pytest.fixture
async def client(local: Local) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(local.url, KEY) as client:
        yield client


@pytest.fixture
async def sandbox(client: AsyncClient) -> AsyncIterator[AsyncSandbox]:
    async with AsyncSandbox.create(client=client) as sandbox:
        yield sandbox


async def running(sandbox: AsyncSandbox) -> ExecutionInfo:
    """The sandbox's running execution, once there is one (a started call's exec is listed)."""
    async with asyncio.timeout(60):
        while True:
            listed = await sandbox.list_executions(state="running")
            if listed:
                return listed[0]


async def test_invoke_results_are_typed_for_every_status(sandbox: AsyncSandbox, tmp_path: Path) -> None:
    code = ADD + "\ndef write(name, text):\n    open(name, 'w').write(text)\n    return len(text)\n"
    done = await sandbox.invoke("add", [2], {"b": 3}, code=code)
    assert (done.status, done.ok, done.result, done.error, done.stdout) == ("success", True, 5, None, "adding 2 3\n")
    assert done.files == FileChanges([], [], []) and done.duration_ms is not None and done.exec_id
    assert (done.cold, done.instance) == (None, None), "only deployed functions have instances"
    done = await sandbox.invoke("write", ["out.txt", "hey"], code=code,
                                files={"in/note.txt": "text", "in/blob.bin": b"\x00\xff"})
    assert done.result == 3 and done.files.created == ["out.txt"]
    assert await sandbox.files.read("in/blob.bin") == b"\x00\xff", "bytes travel as base64"

    failed = await sandbox.invoke("f", [1], code="def f(x):\n    return x / 0\n")
    assert failed.status == "error" and not failed.ok and failed.result is None and failed.error is not None
    assert (failed.error.type, failed.error.message) == ("ZeroDivisionError", "division by zero")
    assert "return x / 0" in failed.error.traceback
    missing = await sandbox.invoke("nope", code=ADD)
    assert missing.status == "error" and missing.error is not None and missing.error.type == "FunctionNotFound"
    late = await sandbox.invoke("f", code="def f():\n    while True:\n        pass\n", timeout=1)
    assert late.status == "timeout" and late.error is not None and late.error.type == "Timeout"

    flag = tmp_path / "never"
    call = asyncio.create_task(sandbox.invoke("gate", [str(flag)], code=GATE))
    execution = await running(sandbox)
    cancelled = await sandbox.cancel_execution(execution.id)
    assert cancelled.state == "cancelled" and cancelled.finished
    stopped = await call
    assert stopped.status == "terminated" and stopped.exec_id == execution.id

    with pytest.raises(errors.BadRequest):
        await sandbox.invoke("not a name", code=ADD)
    with pytest.raises(errors.BadRequest):
        await sandbox.invoke("add")  # neither code nor code_ref


async def test_code_ref_wherever_code_goes(client: AsyncClient, sandbox: AsyncSandbox) -> None:
    code = ADD + "# code_ref\n"
    digest = hashlib.sha256(code.encode()).hexdigest()
    await sandbox.invoke("add", [1], code=code)
    [entry] = [e for e in await client.cache_entries() if e.hash == digest]
    assert (entry.language, entry.bytes, entry.hits) == ("python", len(code), 0)
    assert (await sandbox.invoke("add", [4], {"b": 1}, code_ref=digest)).result == 5
    assert (await sandbox.exec(code_ref=digest)).ok, "the WebSocket exec takes a code_ref too"
    started = await sandbox.start_execution(code_ref=digest)
    assert (await sandbox.wait_execution(started.id)).state == "completed"
    assert (await client.invoke("add", [2, 2], code_ref=digest)).result == 4
    assert (await client.execute(code_ref=digest)).ok
    deployed = await client.deploy_function("add", code_ref=digest)
    assert deployed.code_hash == digest
    assert (await client.invoke_function("add", [3, 3])).result == 6
    [entry] = [e for e in await client.cache_entries() if e.hash == digest]
    assert entry.hits == 6 and entry.last_used is not None

    async with AsyncClient(client.url, OTHER_KEY) as other:
        assert digest not in [e.hash for e in await other.cache_entries()], "each tenant has its own cache"
        with pytest.raises(errors.NotFound):
            await other.delete_cache_entry(digest)
        with pytest.raises(errors.NotFound):
            await other.invoke("add", code_ref=digest)
    await client.delete_cache_entry(digest)
    with pytest.raises(errors.NotFound) as gone:
        await sandbox.invoke("add", code_ref=digest)
    assert "send the code" in gone.value.message
    with pytest.raises(errors.NotFound):
        await client.delete_cache_entry(digest)
    await sandbox.invoke("add", code="def add():\n    return 1\n")
    assert await client.cache_entries()
    await client.clear_cache()
    assert await client.cache_entries() == []


async def test_ephemeral_calls_leave_nothing(client: AsyncClient, local: Local) -> None:
    manager = local.server.app[MANAGER]
    held = len(manager.all())
    done = await client.invoke("add", [1, 2], code=ADD, memory_mb=128)
    assert done.status == "success" and done.result == 3
    ran = await client.execute(code="import sys\nprint(sys.stdin.read()[::-1])", stdin="olleh")
    assert (ran.exit_code, ran.stdout, ran.ok) == (0, "hello\n", True) and ran.duration > 0
    shell = await client.execute("echo $GREETING", env={"GREETING": "hi"})
    assert shell.stdout == "hi\n"
    failed = await client.execute(code="raise SystemExit(3)")
    assert failed.exit_code == 3 and not failed.ok, "a non-zero exit is a result"
    with pytest.raises(errors.Timeout) as late:
        await client.execute(code="print('so far', flush=True)\nwhile True: pass", timeout=1)
    assert late.value.result is not None and late.value.result.stdout == "so far\n"
    with pytest.raises(errors.BadRequest):
        await client.invoke("f", runtime="example-local")  # no code: refused before a sandbox is made
    with pytest.raises(errors.BadRequest):
        await client.execute(code="1", runtime="no-such-runtime")
    assert await client.list_sandboxes() == [] and len(manager.all()) == held


async def test_deployed_functions(client: AsyncClient, local: Local, tmp_path: Path) -> None:
    counter = "calls = 0\n\ndef count(step=1):\n    global calls\n    calls += step\n    return calls\n"
    deployed = await client.deploy_function("counter", counter, "count", idle_timeout=60, env={"MODE": "test"})
    assert deployed.name == "counter" and deployed.function == "count" and deployed.version
    assert (deployed.min_instances, deployed.max_instances, deployed.idle_timeout) == (0, 1, 60)
    assert deployed.env == {"MODE": "test"} and deployed.runtime == "example-local"
    first = await client.invoke_function("counter")
    second = await client.invoke_function("counter", kwargs={"step": 10})
    assert (first.result, first.cold, second.result, second.cold) == (1, True, 11, False)
    assert first.instance == second.instance and first.version == deployed.version
    info = await client.get_function("counter")
    assert [i["id"] for i in info.instances] == [first.instance] and info.queued == 0
    assert [f.name for f in await client.list_functions()] == ["counter"]

    again = await client.deploy_function("counter", counter.replace("calls += step", "calls += 2 * step"), "count")
    assert again.version != deployed.version
    assert (await client.invoke_function("counter")).result == 2, "a redeploy runs the new code"

    async with AsyncClient(client.url, OTHER_KEY) as other:
        with pytest.raises(errors.NotFound):
            await other.invoke_function("counter")
        with pytest.raises(errors.NotFound):
            await other.get_function("counter")
        assert await other.list_functions() == []
    with pytest.raises(errors.BadRequest):
        await client.deploy_function("bad name!", counter, "count")
    with pytest.raises(ValueError, match="function="):
        await client.deploy_function("my-func", counter)

    await client.delete_function("counter")
    with pytest.raises(errors.NotFound):
        await client.get_function("counter")
    with pytest.raises(errors.NotFound):
        await client.delete_function("counter")


async def test_a_full_queue_is_quota_exceeded_with_retry_after(client: AsyncClient, local: Local,
                                                               tmp_path: Path) -> None:
    await client.deploy_function("gate", GATE, max_instances=1)
    flag = tmp_path / "go"
    registry = local.server.app[MANAGER].functions
    deployment = registry.get("tenant", "gate")
    # One call runs (or is making the instance), one queues (queue_per_instance = 1) ...
    calls = [asyncio.create_task(client.invoke_function("gate", [str(flag), n])) for n in range(2)]
    async with asyncio.timeout(60), registry.queue_changed:
        await registry.queue_changed.wait_for(lambda: len(deployment.waiters) >= 1)
    # ... so the third is refused at once, with the gateway's Retry-After.
    with pytest.raises(errors.QuotaExceeded) as refused:
        await client.invoke_function("gate", [str(flag)])
    assert refused.value.http_status == 429 and refused.value.retryable and refused.value.retry_after == 1
    flag.touch()
    done = await asyncio.gather(*calls)
    assert sorted(d.result for d in done) == [0, 1] and {d.status for d in done} == {"success"}
    assert {d.cold for d in done} == {True, False}, "the queued call took the warm instance"


async def test_background_executions(client: AsyncClient, sandbox: AsyncSandbox, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    program = (f"import os, sys, time\nfor i in range(3):\n    print('before', i, flush=True)\n"
               f"print('to stderr', file=sys.stderr, flush=True)\n"
               f"while not os.path.exists({str(flag)!r}):\n    time.sleep(0.01)\n"
               f"for i in range(3):\n    print('after', i, flush=True)\n")
    started = await sandbox.start_execution(code=program, tag="job")
    assert started.state in ("pending", "running") and not started.finished and started.id

    # Follow it: each poll brings what came since the one before, never twice.
    polls, stdout = 0, ""
    async for info in sandbox.follow_execution(started.id, interval=0.2):
        polls += 1
        stdout += info.stdout
        if "before 2" in stdout and not flag.exists():
            assert info.state == "running"
            flag.touch()
    assert stdout == "".join(f"before {i}\n" for i in range(3)) + "".join(f"after {i}\n" for i in range(3))
    assert info.state == "completed" and info.exit_code == 0 and info.finished and polls >= 2

    whole = await sandbox.get_execution(started.id)
    assert whole.stdout == stdout and whole.stderr == "to stderr\n" and whole.tag == "job"
    rest = await sandbox.get_execution(started.id, output_offset=whole.output_offset or 0)
    assert (rest.stdout, rest.stderr) == ("", "")
    waited = await sandbox.wait_execution(started.id)
    assert waited.stdout == stdout and waited.stderr == "to stderr\n"

    failed = await sandbox.start_execution("exit 4")
    failed = await sandbox.wait_execution(failed.id)
    assert (failed.state, failed.exit_code) == ("failed", 4)
    late = await sandbox.start_execution(code="while True: pass", timeout=1)
    assert (await sandbox.wait_execution(late.id)).state == "timeout"

    blocked = await sandbox.start_execution(code=f"import os, time\nwhile not os.path.exists({str(tmp_path / 'no')!r}):"
                                                 f"\n    time.sleep(0.01)\n")
    with pytest.raises(errors.Timeout):
        await sandbox.wait_execution(blocked.id, timeout=0.2)
    assert [e.id for e in await sandbox.list_executions(state="running")] == [blocked.id]
    assert (await sandbox.cancel_execution(blocked.id)).state == "cancelled"
    assert [e.state for e in await sandbox.list_executions(limit=2)] == ["cancelled", "timeout"]
    assert started.id in [e.id for e in await sandbox.list_executions(state="completed")]

    # The WebSocket sees the same executions: attach to one started over REST.
    followed = await (await sandbox.attach(started.id)).wait()
    assert followed.stdout == stdout

    with pytest.raises(errors.BadRequest):
        await sandbox.list_executions(state="bogus")
    with pytest.raises(errors.NotFound):
        await sandbox.get_execution("e-nope")
    async with AsyncClient(client.url, OTHER_KEY) as other:
        with pytest.raises(errors.NotFound):
            await other.sandbox(sandbox.id).get_execution(started.id)
