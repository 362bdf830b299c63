"""The serverless conformance suite: invoke, test, ephemeral calls, deployed functions, async
executions and the code cache, through the real gateway and real sandboxes of one runtime.

A runtime's tests subclass `FunctionsConformance` like `RuntimeConformance` (see conformance.py).
Every status of an invocation is produced for real: an exception, a guest that exits under the
call, a timeout, a cancel. JavaScript, Ruby and PHP tests run where the sandbox offers `exec.<language>`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import pytest

from gateway.config import Functions
from gateway.testing.conformance import AUTH, DEADLINE, OTHER_AUTH, Gateway, GatewayFixtures
from gateway.web.app import MANAGER

ADD = "def add(a, b=0):\n    print('adding', a, b)\n    return a + b\n"
COUNTER = "calls = 0\n\ndef count():\n    global calls\n    calls += 1\n    return calls\n"


async def post(gateway: Gateway, path: str, body: dict[str, Any], *, status: int = 200,
               headers: dict[str, str] = AUTH) -> dict[str, Any]:
    resp = await gateway.client.post(path, json=body, headers=headers)
    text = await resp.text()
    assert resp.status == status, text
    return await resp.json()  # type: ignore[no-any-return]


async def get(gateway: Gateway, path: str, *, status: int = 200, headers: dict[str, str] = AUTH) -> dict[str, Any]:
    resp = await gateway.client.get(path, headers=headers)
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


class FunctionsConformance(GatewayFixtures):
    """Subclass with `runtime = "<id>"`."""

    functions: ClassVar[Functions] = Functions(queue_per_instance=1, queue_wait_s=30.0)

    async def invoke(self, gateway: Gateway, sandbox_id: str, **body: Any) -> dict[str, Any]:
        return await post(gateway, f"/v1/sandboxes/{sandbox_id}/invoke", body)

    # -- invoke: every status ------------------------------------------------------------------

    async def test_success_with_args_kwargs_output_and_files(self, gateway: Gateway,
                                                             sandbox: dict[str, Any]) -> None:
        code = ADD + "\ndef write(name, text):\n    open(name, 'w').write(text)\n    return len(text)\n"
        done = await self.invoke(gateway, sandbox["id"], code=code, function="add", args=[2], kwargs={"b": 3})
        assert done["status"] == "success" and done["result"] == 5 and done["error"] is None, done
        assert done["stdout"] == "adding 2 3\n" and isinstance(done["duration_ms"], int | float)
        assert done["files"] == {"created": [], "modified": [], "deleted": []}
        done = await self.invoke(gateway, sandbox["id"], code=code, function="write", args=["out.txt", "hey"],
                                 files={"in/data.txt": "given", "in/blob.bin": {"base64": "AAEC"}})
        assert done["status"] == "success" and done["result"] == 3, done
        assert done["files"]["created"] == ["out.txt"]
        # The call's own input files were written before it began: they are not its creations.
        listed = await (await gateway.client.get(f"/v1/sandboxes/{sandbox['id']}/files/in/blob.bin",
                                                 headers=AUTH)).read()
        assert listed == b"\x00\x01\x02"
        done = await self.invoke(gateway, sandbox["id"], code="import os\ndef f():\n    os.remove('out.txt')\n"
                                 "    open('in/data.txt', 'a').write('!')\n", function="f")
        assert done["files"] == {"created": [], "modified": ["in/data.txt"], "deleted": ["out.txt"]}, done

    async def test_exception_is_an_error_with_its_type(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await self.invoke(gateway, sandbox["id"], code="def f(x):\n    return x / 0\n", function="f", args=[1])
        assert done["status"] == "error" and done["result"] is None
        assert done["error"]["type"] == "ZeroDivisionError" and done["error"]["message"] == "division by zero"
        assert "return x / 0" in done["error"]["traceback"] and "guest_agent" not in done["error"]["traceback"]
        done = await self.invoke(gateway, sandbox["id"], code="def f(:\n", function="f")
        assert done["status"] == "error" and done["error"]["type"] == "SyntaxError", done

    async def test_result_that_is_not_json_is_an_error(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await self.invoke(gateway, sandbox["id"], code="def f():\n    return {1, 2}\n", function="f")
        assert done["status"] == "error" and done["error"]["type"] == "ResultNotSerializable"
        assert "set" in done["error"]["message"] and "JSON" in done["error"]["message"]

    async def test_unknown_function_is_a_clear_error(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await self.invoke(gateway, sandbox["id"], code=ADD, function="sub")
        assert done["status"] == "error" and done["error"]["type"] == "FunctionNotFound"
        assert "'sub' is not defined" in done["error"]["message"] and "add" in done["error"]["message"]
        resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/invoke", headers=AUTH,
                                         json={"code": ADD, "function": "not a name"})
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"

    async def test_guest_that_dies_is_a_crash(self, gateway: Gateway) -> None:
        sandbox = await gateway.create()
        done = await self.invoke(gateway, sandbox["id"], code="import os\ndef f():\n    print('bye', flush=True)\n"
                                 "    os._exit(3)\n", function="f")
        assert done["status"] == "crash" and done["result"] is None, done
        assert done["error"]["type"] == "Crash"

    async def test_timeout(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await self.invoke(gateway, sandbox["id"], code="def f():\n    while True:\n        pass\n",
                                 function="f", timeout=1)
        assert done["status"] == "timeout" and done["error"]["type"] == "Timeout", done

    async def test_cancel_is_terminated(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        call = asyncio.create_task(self.invoke(gateway, sid, code="import time\ndef f():\n    print('in', flush=True)"
                                               "\n    time.sleep(60)\n", function="f"))
        running: list[dict[str, Any]] = []
        async with asyncio.timeout(DEADLINE):
            while not running:  # the call's exec is listed once it is started
                running = (await get(gateway, f"/v1/sandboxes/{sid}/executions?state=running"))["executions"]
        resp = await gateway.client.delete(f"/v1/sandboxes/{sid}/executions/{running[0]['id']}", headers=AUTH)
        assert resp.status == 200 and (await resp.json())["state"] == "cancelled"
        done = await call
        assert done["status"] == "terminated" and done["error"]["type"] == "Terminated", done

    async def test_other_tenant_cannot_invoke(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/invoke", headers=OTHER_AUTH,
                                         json={"code": ADD, "function": "add", "args": [1]})
        assert resp.status == 404

    async def test_invoke_over_the_websocket(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        ws = await gateway.ws(sandbox["id"])
        try:
            done = await ws.call("invoke", code=ADD, function="add", args=[40, 2])
        finally:
            await ws.ws.close()
        assert done["status"] == "success" and done["result"] == 42

    # -- JavaScript, where the sandbox runs it ----------------------------------------------------

    async def test_javascript_invoke(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        if "exec.javascript" not in sandbox["capabilities"]:
            pytest.skip(f"runtime {self.runtime} runs no JavaScript")
        code = "function greet(name, opts) { console.log('hi'); return {hello: name, loud: !!(opts && opts.loud)}; }"
        done = await self.invoke(gateway, sandbox["id"], language="javascript", code=code, function="greet",
                                 args=["ada"], kwargs={"loud": True})
        assert done["status"] == "success" and done["result"] == {"hello": "ada", "loud": True}, done
        assert done["stdout"] == "hi\n"
        done = await self.invoke(gateway, sandbox["id"], language="javascript", function="f",
                                 code="const f = () => { throw new TypeError('nope'); };")
        assert done["status"] == "error" and done["error"]["type"] == "TypeError", done
        assert done["error"]["message"] == "nope"
        done = await self.invoke(gateway, sandbox["id"], language="javascript", code="let x = 1;", function="g")
        assert done["status"] == "error" and done["error"]["type"] == "FunctionNotFound", done
        done = await self.invoke(gateway, sandbox["id"], language="javascript", function="f",
                                 code="function f() { return 10n; }")
        assert done["status"] == "error" and done["error"]["type"] == "ResultNotSerializable", done

    async def test_javascript_tests(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        if "exec.javascript" not in sandbox["capabilities"]:
            pytest.skip(f"runtime {self.runtime} runs no JavaScript")
        done = await post(gateway, f"/v1/sandboxes/{sandbox['id']}/test", {
            "language": "javascript", "code": "function add(a, b) { return a + b; }",
            "tests": "test('adds', () => { assert.is(add(1, 2), 3); });\n"
                     "test('deep', () => { assert.equal({a: [1]}, {a: [1]}); });\n"
                     "test('wrong', () => { assert.is(add(1, 1), 3); });\n"
                     "test('throws', () => { assert.throws(() => { throw new Error('x'); }, /x/); });"})
        assert done["summary"] == {"total": 4, "passed": 3, "failed": 1, "skipped": 0}, done
        assert done["success"] is False
        wrong = next(t for t in done["tests"] if t["name"] == "wrong")
        assert wrong["passed"] is False and "Expected 2 to be 3" in wrong["error"]

    # -- Ruby and PHP, where the sandbox runs them --------------------------------------------------

    @pytest.mark.parametrize("language", ["ruby", "php"])
    async def test_ruby_and_php_invoke(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        if f"exec.{language}" not in sandbox["capabilities"]:
            pytest.skip(f"runtime {self.runtime} runs no {language} here")
        sid = sandbox["id"]
        code, raises, error_type = {
            "ruby": ("def add(a, b: 0)\n  puts \"adding #{a} #{b}\"\n  File.write('out.txt', 'sum')\n"
                     "  {sum: a + b, parts: [a, b]}\nend\n", "def f(x) = x / 0", "ZeroDivisionError"),
            "php": ("<?php\nfunction add($a, $b = 0) {\n  echo \"adding $a $b\\n\";\n"
                    "  file_put_contents('out.txt', 'sum');\n  return ['sum' => $a + $b, 'parts' => [$a, $b]];\n}\n",
                    "<?php function f($x) { return intdiv($x, 0); }", "DivisionByZeroError"),
        }[language]
        done = await self.invoke(gateway, sid, language=language, code=code, function="add", args=[2],
                                 kwargs={"b": 3})
        assert (done["status"], done["result"], done["error"]) == ("success", {"sum": 5, "parts": [2, 3]}, None), done
        assert done["stdout"] == "adding 2 3\n"
        assert done["files"] == {"created": ["out.txt"], "modified": [], "deleted": []}, done
        done = await self.invoke(gateway, sid, language=language, code=raises, function="f", args=[1])
        assert done["status"] == "error" and done["error"]["type"] == error_type, done
        done = await self.invoke(gateway, sid, language=language, code=code, function="sub")
        assert done["status"] == "error" and done["error"]["type"] == "FunctionNotFound", done
        assert "'sub' is not defined" in done["error"]["message"] and "add" in done["error"]["message"]

    # -- test mode (Python: real pytest in the sandbox) --------------------------------------------

    async def test_python_tests_with_pytest(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        tests = ("import pytest\n\n"
                 "def test_adds():\n    assert add(1, 2) == 3\n\n"
                 "def test_wrong():\n    assert add(1, 1) == 3\n\n"
                 "@pytest.mark.skip(reason='later')\ndef test_later():\n    pass\n")
        done = await post(gateway, f"/v1/sandboxes/{sandbox['id']}/test", {"code": ADD, "tests": tests})
        assert done["summary"] == {"total": 3, "passed": 1, "failed": 1, "skipped": 1}, done
        assert done["success"] is False
        wrong = next(t for t in done["tests"] if t["name"].endswith("test_wrong"))
        assert "assert 2 == 3" in wrong["error"], wrong
        done = await post(gateway, f"/v1/sandboxes/{sandbox['id']}/test",
                          {"code": ADD, "tests": "def test_adds():\n    assert add(2, 2) == 4\n"})
        assert done["success"] is True and done["summary"]["passed"] == 1, done

    # -- ephemeral calls ---------------------------------------------------------------------------

    async def test_ephemeral_invoke_and_execute_leave_nothing(self, gateway: Gateway) -> None:
        before = (await get(gateway, "/v1/sandboxes"))["sandboxes"]
        manager = gateway.client.app[MANAGER]
        held = len(manager.all())
        done = await post(gateway, "/v1/invoke", {"runtime": self.runtime, **gateway.options, "code": ADD,
                                                  "function": "add", "args": [1, 2]})
        assert done["status"] == "success" and done["result"] == 3, done
        body = {"runtime": self.runtime, **gateway.options, "code": "print(6 * 7)"}
        done = await post(gateway, "/v1/execute", body)
        assert done["exit_code"] == 0 and done["stdout"] == "42\n", done
        assert (await get(gateway, "/v1/sandboxes"))["sandboxes"] == before
        assert len(manager.all()) == held
        resp = await gateway.client.post("/v1/invoke", headers=AUTH, json={"runtime": self.runtime, "function": "f"})
        assert resp.status == 400  # checked before any sandbox is made
        assert len(manager.all()) == held

    # -- deployed functions ------------------------------------------------------------------------

    async def deploy(self, gateway: Gateway, name: str, *, status: int = 201, **body: Any) -> dict[str, Any]:
        resp = await gateway.client.put(f"/v1/functions/{name}", headers=AUTH,
                                        json={"runtime": self.runtime, **body})
        assert resp.status == status, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]

    async def call(self, gateway: Gateway, name: str, **body: Any) -> dict[str, Any]:
        return await post(gateway, f"/v1/functions/{name}/invoke", body)

    async def test_deployed_function_keeps_its_module_warm(self, gateway: Gateway) -> None:
        deployed = await self.deploy(gateway, "counter", code=COUNTER, function="count")
        assert len(deployed["version"]) >= 16 and deployed["min_instances"] == 0
        first = await self.call(gateway, "counter")
        second = await self.call(gateway, "counter")
        assert (first["result"], first["cold"]) == (1, True), first
        assert (second["result"], second["cold"]) == (2, False), second
        assert first["instance"] == second["instance"]
        listed = (await get(gateway, "/v1/functions"))["functions"]
        assert [f["name"] for f in listed] == ["counter"] and "code" not in listed[0]
        # The instance is the function's: not in the tenant's sandbox list.
        assert first["instance"] not in [s["id"] for s in (await get(gateway, "/v1/sandboxes"))["sandboxes"]]
        await get(gateway, "/v1/functions/counter", status=404, headers=OTHER_AUTH)
        resp = await gateway.client.post("/v1/functions/counter/invoke", json={}, headers=OTHER_AUTH)
        assert resp.status == 404
        # Same body again: 200, same version, the warm instance stays.
        again = await self.deploy(gateway, "counter", status=200, code=COUNTER, function="count")
        assert again["version"] == deployed["version"]
        assert (await self.call(gateway, "counter"))["result"] == 3
        resp = await gateway.client.delete("/v1/functions/counter", headers=AUTH)
        assert resp.status == 204
        await get(gateway, "/v1/functions/counter", status=404)
        # The idle instance was destroyed before the 204.
        assert not any(s.owner == "function:counter" for s in gateway.client.app[MANAGER].all())

    async def test_redeploy_drains_old_instances(self, gateway: Gateway) -> None:
        await self.deploy(gateway, "f", code="def f():\n    return 'v1'\n", function="f")
        old = await self.call(gateway, "f")
        v2 = await self.deploy(gateway, "f", status=200, code="def f():\n    return 'v2'\n", function="f")
        new = await self.call(gateway, "f")
        assert (old["result"], new["result"]) == ("v1", "v2") and new["cold"] is True
        assert new["instance"] != old["instance"] and new["version"] == v2["version"]

    async def test_scale_up_queue_and_429(self, gateway: Gateway) -> None:
        code = "import time\n\ndef slow(t):\n    time.sleep(t)\n    return t\n"
        await self.deploy(gateway, "slow", code=code, function="slow", max_instances=2)
        registry = gateway.client.app[MANAGER].functions
        calls = [asyncio.create_task(self.call(gateway, "slow", args=[1.0])) for _ in range(2)]
        # Both calls took an instance (new ones) before either began: two instances.
        done = await asyncio.gather(*calls)
        assert {d["status"] for d in done} == {"success"}
        assert len({d["instance"] for d in done}) == 2, done
        # Two running, two queued (queue_per_instance = 1), the fifth is refused with Retry-After.
        calls = [asyncio.create_task(self.call(gateway, "slow", args=[2.0])) for _ in range(4)]
        deployment = registry.get("tenant-a", "slow")
        async with asyncio.timeout(DEADLINE), registry.queue_changed:
            await registry.queue_changed.wait_for(lambda: len(deployment.waiters) >= 2)
        resp = await gateway.client.post("/v1/functions/slow/invoke", json={"args": [0]}, headers=AUTH)
        assert resp.status == 429 and "Retry-After" in resp.headers
        done = await asyncio.gather(*calls)
        assert [d["status"] for d in done] == ["success"] * 4
        assert len({d["instance"] for d in done}) == 2

    async def test_scale_to_zero_and_min_instances(self, gateway: Gateway) -> None:
        manager = gateway.client.app[MANAGER]
        registry = manager.functions
        await self.deploy(gateway, "idle", code=ADD, function="add", idle_timeout=30)
        first = await self.call(gateway, "idle", args=[1])
        deployment = registry.get("tenant-a", "idle")
        deployment.instances[0].last_used = time.monotonic() - 31  # idle past its timeout
        registry.reap()
        assert deployment.instances == []
        await registry.settle()
        assert not any(s.id == first["instance"] for s in manager.all())
        assert (await self.call(gateway, "idle", args=[2]))["cold"] is True
        # min_instances: made (and loaded) at deploy, kept however long they idle.
        await self.deploy(gateway, "warm", code=ADD, function="add", min_instances=1, idle_timeout=1)
        await registry.warmed("tenant-a", "warm")
        warm = registry.get("tenant-a", "warm")
        assert len(warm.instances) == 1
        warm.instances[0].last_used = time.monotonic() - 60
        registry.reap()
        assert len(warm.instances) == 1
        done = await self.call(gateway, "warm", args=[5])
        assert done["result"] == 5 and done["instance"] == warm.instances[0].sandbox.id
        assert done["cold"] is (self.language_reloads_per_call("python"))

    def language_reloads_per_call(self, language: str) -> bool:
        return language != "python"

    # -- async executions ----------------------------------------------------------------------------

    async def test_execution_start_poll_wait_list(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        started = await post(gateway, f"/v1/sandboxes/{sid}/executions",
                             {"code": "print('one')\nprint('two')", "tag": "job"}, status=202)
        assert started["state"] in ("pending", "running") and started["id"]
        done = await get(gateway, f"/v1/sandboxes/{sid}/executions/{started['id']}?wait=true&timeout=60")
        assert done["state"] == "completed" and done["exit_code"] == 0 and done["stdout"] == "one\ntwo\n", done
        rest = await get(gateway, f"/v1/sandboxes/{sid}/executions/{started['id']}"
                                  f"?output_offset={done['output_offset']}")
        assert rest["stdout"] == "" and rest["output_offset"] == done["output_offset"]
        failed = await post(gateway, f"/v1/sandboxes/{sid}/executions", {"code": "raise SystemExit(4)"}, status=202)
        failed = await get(gateway, f"/v1/sandboxes/{sid}/executions/{failed['id']}?wait=true")
        assert failed["state"] == "failed" and failed["exit_code"] == 4
        listed = (await get(gateway, f"/v1/sandboxes/{sid}/executions?state=completed"))["executions"]
        assert [e["id"] for e in listed] == [started["id"]]
        assert len((await get(gateway, f"/v1/sandboxes/{sid}/executions?limit=1"))["executions"]) == 1
        await get(gateway, f"/v1/sandboxes/{sid}/executions/{started['id']}", status=404, headers=OTHER_AUTH)
        await get(gateway, f"/v1/sandboxes/{sid}/executions?state=bogus", status=400)

    async def test_execution_timeout_and_websocket_attach(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        started = await post(gateway, f"/v1/sandboxes/{sid}/executions",
                             {"code": "print('started', flush=True)\nwhile True:\n    pass", "timeout": 2}, status=202)
        ws = await gateway.ws(sid)
        try:
            events = await ws.stream("exec.attach", exec_id=started["id"])
        finally:
            await ws.ws.close()
        assert events[0]["result"]["exec_id"] == started["id"]
        assert b"started" in b"".join(e.get("data", b"") if isinstance(e.get("data"), bytes)
                                      else str(e.get("data", "")).encode() for e in events)
        done = await get(gateway, f"/v1/sandboxes/{sid}/executions/{started['id']}?wait=true")
        assert done["state"] == "timeout", done

    async def test_websocket_exec_is_an_execution(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        ws = await gateway.ws(sid)
        try:
            events = await ws.stream("exec.start", code="print('from ws')", tag="ws-job")
        finally:
            await ws.ws.close()
        exec_id = next(e["exec_id"] for e in events if e.get("ev") == "start")
        done = await get(gateway, f"/v1/sandboxes/{sid}/executions/{exec_id}")
        assert done["state"] == "completed" and done["stdout"] == "from ws\n" and done["tag"] == "ws-job"

    # -- the code cache --------------------------------------------------------------------------------

    async def test_code_cache_and_code_ref(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        import hashlib

        code = ADD + "# cache test\n"
        digest = hashlib.sha256(code.encode()).hexdigest()
        await self.invoke(gateway, sandbox["id"], code=code, function="add", args=[1])
        entries = (await get(gateway, "/v1/cache"))["entries"]
        entry = next(e for e in entries if e["hash"] == digest)
        assert entry["language"] == "python" and entry["bytes"] == len(code.encode()) and entry["hits"] == 0
        done = await self.invoke(gateway, sandbox["id"], code_ref=digest, function="add", args=[4])
        assert done["result"] == 4
        ran = await gateway.exec(sandbox["id"], code_ref=digest)
        assert ran["exit_code"] == 0
        entry = next(e for e in (await get(gateway, "/v1/cache"))["entries"] if e["hash"] == digest)
        assert entry["hits"] == 2
        # Another tenant cannot name it.
        assert digest not in [e["hash"] for e in (await get(gateway, "/v1/cache", headers=OTHER_AUTH))["entries"]]
        resp = await gateway.client.delete(f"/v1/cache/{digest}", headers=OTHER_AUTH)
        assert resp.status == 404
        resp = await gateway.client.delete(f"/v1/cache/{digest}", headers=AUTH)
        assert resp.status == 204
        resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/invoke", headers=AUTH,
                                         json={"code_ref": digest, "function": "add"})
        assert resp.status == 404 and "send the code" in (await resp.json())["error"]["message"]
        resp = await gateway.client.delete("/v1/cache", headers=AUTH)
        assert resp.status == 204 and (await get(gateway, "/v1/cache"))["entries"] == []
