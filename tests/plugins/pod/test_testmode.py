"""Test mode's guest side in a real pod of the local test cluster (the agent image's staged pytest),
through the gateway."""

from __future__ import annotations

from typing import Any

import pytest

from tests.plugins.testmode import PytestInTheSandbox

pytestmark = pytest.mark.pod


class TestPodPytest(PytestInTheSandbox):
    runtime = "pod"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = pod_config  # per test: each has its own namespace
