"""The serverless suite (gateway/testing/functions.py) on real microVMs: Python runs in the guest
agent's own interpreter (Debian's python3) inside the VM."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from gateway.testing.functions import FunctionsConformance

pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_image")]


class TestMicrovmFunctions(FunctionsConformance):
    runtime = "microvm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}
