"""Test mode's guest side in a real microVM (Debian's python3.11, the image's staged pytest), through
the gateway."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from tests.plugins.testmode import PytestInTheSandbox

pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_image")]


class TestMicrovmPytest(PytestInTheSandbox):
    runtime = "microvm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}


@pytest.mark.usefixtures("microvm_full_image")
class TestMicrovmFullTemplatePytest(PytestInTheSandbox):
    """The `full` template: its init copies /opt/sandgate (pytest_libs with it) onto the root disk's
    overlay, where the disk's own python3 runs the agent."""

    runtime = "microvm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}
    create_options: ClassVar[dict[str, Any]] = {"template": "full"}
