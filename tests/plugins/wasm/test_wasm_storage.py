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

    async def test_a_patch_with_a_mode_is_refused_clearly(self, gateway: Any) -> None:
        from gateway.testing.conformance import AUTH

        resp = await gateway.client.post("/v1/sandboxes", headers=AUTH, json={
            "runtime": "wasm", "patches": [{"op": "mkdir", "path": "/work/private", "mode": 0o700}]})
        error = (await resp.json())["error"]
        assert resp.status == 501 and error["code"] == "unsupported" and "permission bits" in error["message"]
