"""The rich-output suite (gateway/testing/display.py) on real pods of the local test cluster: the
agent runs threaded in the pod, as in a microVM."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.testing.display import DisplayConformance

pytestmark = pytest.mark.pod


class TestPodDisplay(DisplayConformance):
    runtime = "pod"

    @pytest.fixture(autouse=True)
    def _namespace(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = pod_config  # per test: each has its own namespace
