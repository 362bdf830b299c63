"""How a call's report travels, through a real gateway and real sandboxes: a deployed function's
instance rewrites one report path for every call (no removal round trip), and a sandbox invoke's
report is removed by a request sent right behind its read.

A reused path must never hand a call the report of an earlier one: a call whose exec ends cleanly
without writing one (`SystemExit(0)` passes through the harness) is a crash, and a short report
written over a long one is read as itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import sandgate_example_runtime

from gateway.config import Functions
from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures
from gateway.testing.functions import post

#: Above fs.read's 64 KiB chunks: a report near it is read in several.
RESULT_BYTES = 256 * 1024
#: `f("exit")` ends the exec cleanly before the harness writes its report; `f(n)` returns n x's.
CODE = "def f(x):\n    if x == 'exit':\n        raise SystemExit(0)\n    return 'x' * x\n"


class ReportChecks(GatewayFixtures):
    functions: ClassVar[Functions] = Functions(result_bytes=RESULT_BYTES)

    async def deploy_and_call(self, gateway: Gateway, *calls: Any) -> list[dict[str, Any]]:
        resp = await gateway.client.put("/v1/functions/f", headers=AUTH,
                                        json={"runtime": self.runtime, "code": CODE, "function": "f"})
        assert resp.status == 201, await resp.text()
        return [await post(gateway, "/v1/functions/f/invoke", {"args": [arg]}) for arg in calls]

    async def test_clean_exit_without_a_report_is_a_crash_not_the_last_result(self, gateway: Gateway) -> None:
        first, second = await self.deploy_and_call(gateway, 3, "exit")
        assert first["status"] == "success" and first["result"] == "xxx", first
        assert second["instance"] == first["instance"] and second["cold"] is False
        assert second["status"] == "crash" and second["result"] is None, second

    async def test_clean_exit_after_a_too_large_result_is_a_crash(self, gateway: Gateway) -> None:
        first, second = await self.deploy_and_call(gateway, RESULT_BYTES * 2, "exit")
        assert first["status"] == "error" and first["error"]["type"] == "ResultTooLarge", first
        assert second["instance"] == first["instance"]
        assert second["status"] == "crash" and second["error"]["type"] == "Crash", second

    async def test_short_report_over_a_long_one_is_read_as_itself(self, gateway: Gateway) -> None:
        done = await self.deploy_and_call(gateway, 2000, 1, 0)
        assert [d["result"] for d in done] == ["x" * 2000, "x", ""], [d["status"] for d in done]
        assert len({d["instance"] for d in done}) == 1

    async def test_warm_calls_through_the_bound_caller(self, gateway: Gateway) -> None:
        # A warm call's source is only `__sandgate_call__(...)`: errors still point at the user's
        # code, and the caller is not offered as one of the module's functions.
        code = "def f(x):\n    return 10 // x\n"
        resp = await gateway.client.put("/v1/functions/div", headers=AUTH,
                                        json={"runtime": self.runtime, "code": code, "function": "f"})
        assert resp.status == 201, await resp.text()
        cold, warm, failed = [await post(gateway, "/v1/functions/div/invoke", {"args": [x]}) for x in (5, 2, 0)]
        assert (cold["cold"], warm["cold"], failed["cold"]) == (True, False, False)
        assert (cold["result"], warm["result"]) == (2, 5)
        assert failed["status"] == "error" and failed["error"]["type"] == "ZeroDivisionError", failed
        assert "return 10 // x" in failed["error"]["traceback"]
        assert "guest_agent" not in failed["error"]["traceback"] and "__sandgate" not in failed["error"]["traceback"]
        resp = await gateway.client.put("/v1/functions/div", headers=AUTH,
                                        json={"runtime": self.runtime, "code": code, "function": "g"})
        assert resp.status == 200
        missing = await post(gateway, "/v1/functions/div/invoke", {"args": [1]})
        assert missing["error"]["type"] == "FunctionNotFound" and "__sandgate" not in missing["error"]["message"]
        assert "functions it defines: f" in missing["error"]["message"], missing

    async def test_sandbox_invoke_report_is_read_whole_and_removed(self, gateway: Gateway,
                                                                   sandbox: dict[str, Any]) -> None:
        # Several fs.read chunks: the removal sent behind the read must not cut it short.
        size = RESULT_BYTES - 1000
        for _ in range(3):
            done = await post(gateway, f"/v1/sandboxes/{sandbox['id']}/invoke",
                              {"code": CODE, "function": "f", "args": [size]})
            assert done["status"] == "success" and done["result"] == "x" * size, done["status"]
        left = await gateway.exec(sandbox["id"], code="import os\nprint([n for n in os.listdir('.sandgate') "
                                                       "if n.endswith('.json')])")
        assert left["stdout"] == "[]\n", left


class TestExampleReports(ReportChecks):
    runtime = "example-local"
    plugins = (sandgate_example_runtime,)


@pytest.mark.wasm
@pytest.mark.usefixtures("wasm_compiled")
class TestWasmReports(ReportChecks):
    runtime = "wasm"
