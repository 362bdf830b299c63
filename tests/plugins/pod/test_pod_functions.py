"""The serverless suite (gateway/testing/functions.py) on pods of the local test cluster (a real
kube-apiserver; pods run by the test kubelet)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.testing.functions import FunctionsConformance

pytestmark = pytest.mark.pod


class TestPodFunctions(FunctionsConformance):
    runtime = "pod"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = pod_config  # per test: each has its own namespace
