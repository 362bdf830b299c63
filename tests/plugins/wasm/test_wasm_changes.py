"""Change tracking through a real gateway and real WASM sandboxes: every exec result, invoke
result and execution record carries `files`; `GET /v1/sandboxes/{id}/changes?since=` lists what
changed since a token (guest_agent/changes.py)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures
from guest_agent.changes import KEPT_TOKENS

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

NONE: dict[str, list[str]] = {"created": [], "modified": [], "deleted": []}


async def changes(gateway: Gateway, sid: str, since: str | None = None, *, status: int = 200) -> dict[str, Any]:
    query = "" if since is None else f"?since={since}"
    resp = await gateway.client.get(f"/v1/sandboxes/{sid}/changes{query}", headers=AUTH)
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


class TestWasmChanges(GatewayFixtures):
    runtime = "wasm"

    async def test_exec_results_list_exact_changes(self, gateway: Gateway) -> None:
        created = await gateway.create(files={"keep.txt": "k", "edit.txt": "old", "gone.txt": "g"})
        sid = created["id"]
        # What the create placed is not a change.
        assert (await changes(gateway, sid))["files"] == NONE
        done = await gateway.exec(sid, code="import os\nos.makedirs('out/deep')\n"
                                             "open('out/deep/a.txt','w').write('a')\n"
                                             "open('edit.txt','a').write('!')\nos.remove('gone.txt')\n")
        assert done["exit_code"] == 0 and "files" in done, done
        assert done["files"] == {"created": ["out", "out/deep", "out/deep/a.txt"], "modified": ["edit.txt"],
                                 "deleted": ["gone.txt"]}
        # An editor's save: write a temporary file, rename it over the original (same size, too).
        done = await gateway.exec(sid, code="import os\nopen('keep.tmp','w').write('K')\n"
                                             "os.replace('keep.tmp', 'keep.txt')\n")
        assert done["files"] == {"created": [], "modified": ["keep.txt"], "deleted": []}, done
        done = await gateway.exec(sid, code="print(open('keep.txt').read())")
        assert done["files"] == NONE
        # Since the sandbox was handed out: everything above together.
        since_start = await changes(gateway, sid)
        assert since_start["files"] == {"created": ["out", "out/deep", "out/deep/a.txt"],
                                        "modified": ["edit.txt", "keep.txt"], "deleted": ["gone.txt"]}
        token = since_start["token"]
        assert (await changes(gateway, sid, token))["files"] == NONE
        # The files API's writes are changes too (the token compares snapshots, not exec lists).
        await gateway.client.put(f"/v1/sandboxes/{sid}/files/api.txt", data=b"x", headers=AUTH)
        assert (await changes(gateway, sid, token))["files"] == {"created": ["api.txt"], "modified": [],
                                                                   "deleted": []}

    async def test_expired_and_unknown_tokens_are_not_found(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        first = (await changes(gateway, sid))["token"]
        for _ in range(KEPT_TOKENS):
            await changes(gateway, sid)
        error = (await changes(gateway, sid, first, status=404))["error"]
        assert error["code"] == "not_found" and "not kept" in error["message"]
        assert (await changes(gateway, sid, "nope", status=404))["error"]["code"] == "not_found"

    async def test_invoke_and_execution_records_carry_files(self, gateway: Gateway,
                                                            sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        resp = await gateway.client.post(f"/v1/sandboxes/{sid}/invoke", headers=AUTH, json={
            "code": "def f():\n    open('made.txt', 'w').write('m')\n", "function": "f"})
        done = await resp.json()
        assert done["files"] == {"created": ["made.txt"], "modified": [], "deleted": []}, done
