"""The serverless suite on the example runtime (the guest agent as a host process): the gateway's
own logic, fast; the real runtimes run the same suite in tests/plugins/<runtime>/."""

from __future__ import annotations

import sandgate_example_runtime

from gateway.testing.functions import FunctionsConformance


class TestExampleFunctions(FunctionsConformance):
    runtime = "example-local"
    plugins = (sandgate_example_runtime,)
