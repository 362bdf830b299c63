"""The SDK's serverless calls on real WASM sandboxes (CPython-on-WASI, QuickJS): the path users
take by default. The client logic itself is tested on the example runtime (test_functions.py)."""

from __future__ import annotations

import pytest

from gateway.client import AsyncClient, AsyncSandbox, errors
from tests.client.conftest import KEY

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

ADD = "def add(a, b=0):\n    return a + b\n"


async def test_invoke_python_and_javascript(gateway_url: str) -> None:
    async with AsyncClient(gateway_url, KEY) as client, AsyncSandbox.create("wasm", client=client) as sb:
        done = await sb.invoke("add", [2], {"b": 40}, code=ADD)
        assert (done.status, done.result) == ("success", 42)
        greet = "function greet(name, opts) { console.log('hi'); return {hello: name, loud: !!(opts && opts.loud)}; }"
        done = await sb.invoke("greet", ["ada"], {"loud": True}, code=greet, language="javascript")
        assert (done.status, done.result, done.stdout) == ("success", {"hello": "ada", "loud": True}, "hi\n")
        thrown = await sb.invoke("f", code="const f = () => { throw new TypeError('nope'); };", language="javascript")
        assert thrown.error is not None and (thrown.status, thrown.error.type) == ("error", "TypeError")

        ephemeral = await client.invoke("add", [1, 2], code=ADD, runtime="wasm")
        assert ephemeral.result == 3
        assert [s.id for s in await client.list_sandboxes()] == [sb.id], "the ephemeral sandbox is gone"

        await client.deploy_function("add", ADD, runtime="wasm")
        cold, warm = [await client.invoke_function("add", [n, n]) for n in (1, 2)]
        assert (cold.result, cold.cold, warm.result, warm.cold) == (2, True, 4, False)
        await client.delete_function("add")


async def test_run_tests_javascript(gateway_url: str) -> None:
    async with AsyncSandbox.create("wasm", url=gateway_url, api_key=KEY) as sb:
        report = await sb.run_tests("function add(a, b) { return a + b; }",
                                    "test('adds', () => { assert.is(add(1, 2), 3); });\n"
                                    "test('wrong', () => { assert.is(add(1, 1), 3); });", language="javascript")
        assert not report.success and report.status == "success"
        assert (report.summary.total, report.summary.passed, report.summary.failed) == (2, 1, 1)
        [wrong] = report.failures
        assert wrong.name == "wrong" and wrong.error is not None and "Expected 2 to be 3" in wrong.error


async def test_run_tests_python_with_pytest(gateway_url: str) -> None:
    async with AsyncSandbox.create("wasm", url=gateway_url, api_key=KEY) as sb:
        tests = ("import pytest\n\ndef test_adds():\n    assert add(1, 2) == 3\n\n"
                 "def test_wrong():\n    assert add(1, 1) == 3\n\n"
                 "@pytest.mark.skip(reason='later')\ndef test_later():\n    pass\n")
        report = await sb.run_tests(ADD, tests)
        assert (report.summary.total, report.summary.passed, report.summary.failed, report.summary.skipped) == (
            3, 1, 1, 1), report
        [wrong] = report.failures
        assert wrong.name.endswith("test_wrong") and wrong.error is not None and "assert 2 == 3" in wrong.error
        assert [t.skipped for t in report.tests if t.name.endswith("test_later")] == [True]
        assert (await sb.run_tests(ADD, "def test_adds():\n    assert add(2, 2) == 4\n")).success



async def test_ephemeral_calls_that_time_out_answer(gateway_url: str) -> None:
    """The sandbox of an ephemeral call is destroyed while its agent restarts after the timeout:
    that destroy once cancelled the restart's wait for the agent's stdin to close, which left the
    pipe's close future cancelled, and the destroy's own close then raised CancelledError into the
    request: the client saw its connection dropped instead of the timeout."""
    async with AsyncClient(gateway_url, KEY) as client:
        late = await client.invoke("f", code="def f():\n    while True:\n        pass\n", runtime="wasm", timeout=1)
        assert late.status == "timeout" and late.error is not None and late.error.type == "Timeout"
        with pytest.raises(errors.Timeout) as stopped:
            await client.execute(code="print('so far', flush=True)\nwhile True: pass", runtime="wasm", timeout=1)
        assert stopped.value.result is not None and stopped.value.result.stdout == "so far\n"
        assert await client.list_sandboxes() == []
