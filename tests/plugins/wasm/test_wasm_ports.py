"""WASM sandboxes have no sockets: publishing a port is refused with `unsupported`, at create and
after, before it costs a sandbox or reaches the agent."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


class TestWasmPorts(GatewayFixtures):
    runtime = "wasm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}

    async def test_ports_are_unsupported(self, gateway: Gateway) -> None:
        client = gateway.client
        resp = await client.post("/v1/sandboxes", json={"runtime": "wasm", "ports": [8000]}, headers=AUTH)
        assert resp.status == 501 and (await resp.json())["error"]["code"] == "unsupported"
        assert (await (await client.get("/v1/sandboxes", headers=AUTH)).json())["sandboxes"] == []
        sandbox = await gateway.create()
        assert sandbox["ports"] == [] and "net.connect" not in sandbox["capabilities"]
        resp = await client.post(f"/v1/sandboxes/{sandbox['id']}/ports", json={"port": 8000}, headers=AUTH)
        assert resp.status == 501 and (await resp.json())["error"]["code"] == "unsupported"
        resp = await client.get(f"/v1/sandboxes/{sandbox['id']}/ports/8000/", headers=AUTH)
        assert resp.status == 404
