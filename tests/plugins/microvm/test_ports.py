"""Published ports on a real microVM (QEMU, TCG here): the guest's `http.server` and a WebSocket
echo server reached through the gateway, over the agent's channel, in a sandbox without any network
device (`"network"` left at its default): tests/plugins/ports_contract.py holds the cases."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from gateway.testing.conformance import Gateway, GatewayFixtures
from tests.plugins.ports_contract import check_ports

pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_image")]


class TestMicrovmPorts(GatewayFixtures):
    runtime = "microvm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}

    async def test_ports_without_a_network(self, gateway: Gateway) -> None:
        sandbox = await gateway.create(ports=[8000])
        assert sandbox["network"] == "none"  # no network device: the ports travel over the agent's channel
        await check_ports(gateway, sandbox, http_port=8000, ws_port=8001)
