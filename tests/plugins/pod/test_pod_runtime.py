"""The pod runtime against the local test cluster: a real kube-apiserver 1.20, every call through it,
pods run by the test kubelet (tests/kube/kubelet.py). Nothing here stands in for Kubernetes."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.testing.conformance import RuntimeConformance

pytestmark = pytest.mark.pod


class TestPodConformance(RuntimeConformance):
    runtime = "pod"
    whole_file_system = True
    watch_backend = "inotify"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = pod_config  # per test: each has its own namespace


class TestPodConformanceAttach(RuntimeConformance):
    """The same suite with `channel = "attach"`: the agent is the container's main process."""

    runtime = "pod"
    whole_file_system = True
    watch_backend = "inotify"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = {**pod_config, "channel": "attach"}
