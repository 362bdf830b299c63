"""The language suite on the example runtime (the guest agent as a host process): each language
whose toolchain this host has, through the real gateway's REST exec and WebSocket. The microVM
`polyglot` template runs the same suite with every language (tests/plugins/microvm)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import sandgate_example_runtime

from gateway.testing.languages import LanguageConformance
from guest_agent import languages

HOST = languages.find_programs(shutil.which)


class TestExampleLanguages(LanguageConformance):
    runtime = "example-local"
    plugins = (sandgate_example_runtime,)
    languages = frozenset(languages.offered_by_programs(HOST.get))

    @pytest.fixture(autouse=True)
    def _rustup_home(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # This host's rustc is rustup's proxy: the agent passes RUSTUP_HOME on (the table's
        # `inherit`), and an exec's HOME (the sandbox root) would not lead it to ~/.rustup.
        rustc = HOST.get("rustc")
        if rustc and os.path.basename(os.path.realpath(rustc)) == "rustup" and "RUSTUP_HOME" not in os.environ:
            monkeypatch.setenv("RUSTUP_HOME", str(Path.home() / ".rustup"))
