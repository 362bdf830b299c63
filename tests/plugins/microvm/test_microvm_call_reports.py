"""tests/functions/test_call_reports.py's checks on real microVMs (the guest agent's own Python
inside the VM: threads, so its fs.read streams from a thread while the removal behind it runs)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from tests.functions import test_call_reports as reports

pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_image")]


class TestMicrovmReports(reports.ReportChecks):
    runtime = "microvm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}
