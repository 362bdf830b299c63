"""Storage on WASM: volumes are ext4 images the sandbox's disk holder loop-mounts and preopens."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from gateway.testing.storage import StorageConformance

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


class TestWasmStorage(StorageConformance):
    runtime = "wasm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}
    symlinks = False
