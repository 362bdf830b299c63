"""What the C/C++ tests share: zig's library cache, built once (minutes the first time, then cached
in the WASM cache folder), or a skip saying why C and C++ cannot run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.common import TerminalProgress
from plugins.wasm import cprograms


@pytest.fixture(scope="session")
def zig_cache() -> Path:
    try:
        return cprograms.warm(TerminalProgress())
    except cprograms.ToolchainMissing as exc:
        pytest.skip(f"C/C++ on WASM cannot run here: {exc}")
