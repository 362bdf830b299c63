"""Admission before cost: every create option is checked before a quota or rate token is taken.

A real gateway on the real WASM runtime (whose template and network refusals used to come from
`Runtime.create`, after the tenant's rate token was spent).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Quotas, Settings
from gateway.web.app import MANAGER, create_app

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

KEY = "admission-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def gateway(aiohttp_client: Any) -> TestClient[Any, Any]:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("microvm", "pod"), default_runtime="wasm",
                        quotas=Quotas(max_sandboxes=5, creates_per_minute=1), reap_interval_s=3600.0,
                        runtimes={"wasm": {"pool_size": 0}})
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"template": "nope"}, "unsupported"),
        ({"network": "all"}, "forbidden"),
        ({"network": "yes"}, "bad_request"),
        ({"memory_mb": -5}, "bad_request"),
        ({"ttl": True}, "bad_request"),
        ({"metadata": {"k": 1}}, "bad_request"),
        ({"runtime": "nope"}, "bad_request"),
        ({"vcpus": 2}, "bad_request"),
    ],
)
async def test_a_refused_create_costs_no_rate_token(
    gateway: TestClient[Any, Any], body: dict[str, Any], code: str
) -> None:
    for _ in range(3):  # the rate is one create a minute: a spent token would show at once
        resp = await gateway.post("/v1/sandboxes", json=body, headers=AUTH)
        assert resp.status != 429 and (await resp.json())["error"]["code"] == code
    ok = await gateway.post("/v1/sandboxes", json={}, headers=AUTH)
    assert ok.status == 201, await ok.text()
    limited = await gateway.post("/v1/sandboxes", json={}, headers=AUTH)
    assert limited.status == 429, "the valid create took the one token"


async def test_the_watcher_of_a_failed_sandbox_stops_instead_of_spinning(gateway: TestClient[Any, Any]) -> None:
    # A sandbox marked failed elsewhere (an exec watchdog's restart that failed), whose agent then
    # closes: its watcher used to wait on the closed agent again and again, never yielding.
    resp = await gateway.post("/v1/sandboxes", json={}, headers=AUTH)
    sandbox = gateway.app[MANAGER].get("tenant", (await resp.json())["id"])
    [watcher] = [t for t in sandbox.tasks if t.get_name().startswith("watch-")]
    sandbox.state = "failed"
    await sandbox.agent.close()
    async with asyncio.timeout(10):
        await watcher
