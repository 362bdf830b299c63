"""The rich-output suite (gateway/testing/display.py) on real WASM sandboxes: the agent's
CPython-on-WASI runs the exec on its one thread, so display events are sent inline."""

from __future__ import annotations

import pytest

from gateway.testing.display import DisplayConformance

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


class TestWasmDisplay(DisplayConformance):
    runtime = "wasm"
