"""Test mode's guest side in a real sandbox of each runtime, through the gateway's REST API: the exec
the gateway runs for `POST /v1/sandboxes/{id}/test` (one call of guest_agent.testrun.run_tests),
then its report read back with `GET /v1/sandboxes/{id}/files/<report>`. Only the pytest staged in
the sandbox can run here: no sandbox sees the host's site-packages."""

from __future__ import annotations

import json
from typing import Any

from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures

CODE = "def add(a, b):\n    return a + b\n"
TESTS = """\
import pytest

def test_add():
    print("hello from a test")
    assert add(1, 2) == 3

def test_wrong():
    assert add(1, 2) == 4

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    assert add(x, 0) == x
"""


def source(code: str, tests: str, report: str) -> str:
    return (f'__import__("guest_agent.testrun", fromlist=["run_tests"]).run_tests('
            f"code={code!r}, tests={tests!r}, report={report!r})")


async def run_tests(gateway: Gateway, sid: str, code: str, tests: str, report: str) -> tuple[dict[str, Any], Any]:
    """(the REST exec's result, the report it left in the sandbox)."""
    done = await gateway.exec(sid, language="python", code=source(code, tests, report), timeout=30)
    resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files/{report}", headers=AUTH)
    assert resp.status == 200, (done, await resp.text())
    return done, json.loads(await resp.read())


class PytestInTheSandbox(GatewayFixtures):
    """Subclass with `runtime = "<id>"` (and the runtime's fixtures)."""

    async def test_pytest_runs_in_the_sandbox(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        before = await gateway.exec(sid, language="python", code="import sys\n'pytest' in sys.modules, "
                                    "'_pytest' in sys.modules")
        assert before["stdout"] == "(False, False)\n", before  # the agent does not import it at start

        done, report = await run_tests(gateway, sid, CODE, TESTS, ".sandgate/run/first.json")
        assert done["exit_code"] == 0, done
        assert "hello from a test" in done["stdout"]
        assert report["summary"] == {"total": 5, "passed": 3, "failed": 1, "skipped": 1}
        assert report["success"] is False and report["error"] is None
        tests = {t["name"]: t for t in report["tests"]}
        assert list(tests) == ["test_add", "test_wrong", "test_skipped", "test_param[1]", "test_param[2]"]
        assert "assert 3 == 4" in tests["test_wrong"]["error"]
        assert tests["test_skipped"]["error"] == "not here" and tests["test_skipped"]["skipped"] is True
        assert tests["test_add"]["error"] is None and tests["test_param[2]"]["passed"] is True

        done, report = await run_tests(gateway, sid, "def add(a, b:\n", TESTS, ".sandgate/run/second.json")
        assert done["exit_code"] == 0, done
        assert report["success"] is False and report["tests"] == []
        assert report["error"]["type"] == "SyntaxError"
