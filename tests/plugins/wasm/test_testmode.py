"""Test mode's guest side in a real WASM sandbox (CPython-on-WASI), through the gateway."""

from __future__ import annotations

import pytest

from tests.plugins.testmode import PytestInTheSandbox

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


class TestWasmPytest(PytestInTheSandbox):
    runtime = "wasm"
