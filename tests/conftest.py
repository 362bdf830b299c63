"""Shared fixtures. Everything here starts real things: gateways, agents, wasmtime."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net.upstream import UnavailableHere, Upstream

# The local test cluster's fixtures (kube_cluster, kube_namespace): tests/kube/fixtures.py.
pytest_plugins = ["tests.kube.fixtures"]

ROOT = Path(__file__).resolve().parents[1]
# The example third-party runtime, importable for tests that register it directly; one test also
# installs it with pip and finds it through its entry point (tests/examples/test_third_party.py).
sys.path.insert(0, str(ROOT / "examples" / "sandgate-example-runtime"))


@pytest.fixture(scope="session")
def wasm_compiled() -> None:
    """Compile (once, cached across runs) the WASM modules; the first time takes minutes."""
    from plugins.common import TerminalProgress
    from plugins.wasm.artifacts import ensure_compiled

    for kind in ("python", "javascript"):
        ensure_compiled(kind, progress=TerminalProgress())


@pytest.fixture(scope="session")
def wasm_interpreters(wasm_compiled: None) -> None:
    """Ruby's and PHP's WASM modules: fetched with npm unless cached (`sandgate images build wasm`
    does it at setup) and compiled once. Skips, with npm's reason, where npm cannot fetch them."""
    from plugins.common import TerminalProgress
    from plugins.wasm import artifacts, runno

    try:
        wasms = runno.fetch(runno.default_dir(), TerminalProgress())
    except artifacts.ArtifactsMissing as exc:
        pytest.skip(f"Ruby and PHP on WASM are not installed here: {exc}")
    for kind, wasm in zip(artifacts.FETCHED_KINDS, wasms, strict=True):
        artifacts.ensure_compiled(kind, TerminalProgress(), wasm)


@pytest.fixture(scope="session")
def egress_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """"The internet" for network tests (tests/net/upstream.py): one per test run, or a skip
    naming what this machine lacks."""
    server = Upstream(tmp_path_factory.mktemp("upstream"))
    try:
        server.start()
    except UnavailableHere as exc:
        pytest.skip(f"no test upstream on a public address here: {exc}")
    yield server
    server.stop()
