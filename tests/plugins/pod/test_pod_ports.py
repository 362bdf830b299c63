"""Published ports on real pods of the local test cluster: the guest's `http.server` and a
WebSocket echo server reached through the gateway over the agent's channel (never the pod's IP):
tests/plugins/ports_contract.py holds the cases. The test kubelet runs pods in the host's network
namespace, so the guest's ports are picked free on this host."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from gateway.testing.conformance import Gateway, GatewayFixtures
from tests.plugins.ports_contract import check_ports

pytestmark = pytest.mark.pod


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TestPodPorts(GatewayFixtures):
    runtime = "pod"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = pod_config

    async def test_ports(self, gateway: Gateway) -> None:
        http_port, ws_port = _free_port(), _free_port()
        sandbox = await gateway.create(ports=[http_port])
        await check_ports(gateway, sandbox, http_port=http_port, ws_port=ws_port)
