"""The serverless suite (gateway/testing/functions.py) on real WASM sandboxes: CPython-on-WASI for
Python (the agent's own interpreter), QuickJS for JavaScript."""

from __future__ import annotations

import pytest

from gateway.testing.functions import FunctionsConformance

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


class TestWasmFunctions(FunctionsConformance):
    runtime = "wasm"
