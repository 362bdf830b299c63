"""The example third-party runtime passes the conformance suite (the agent on the host)."""

from __future__ import annotations

import sandgate_example_runtime

from gateway.testing.conformance import RuntimeConformance


class TestExampleLocalRuntime(RuntimeConformance):
    runtime = "example-local"
    plugins = (sandgate_example_runtime,)
