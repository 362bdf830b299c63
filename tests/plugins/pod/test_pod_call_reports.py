"""tests/functions/test_call_reports.py's checks on pods of the local test cluster."""

from __future__ import annotations

from typing import Any

import pytest

from tests.functions import test_call_reports as reports

pytestmark = pytest.mark.pod


class TestPodReports(reports.ReportChecks):
    runtime = "pod"

    @pytest.fixture(autouse=True)
    def _aim_at_the_test_cluster(self, pod_config: dict[str, Any]) -> None:
        self.runtime_config = pod_config  # per test: each has its own namespace
