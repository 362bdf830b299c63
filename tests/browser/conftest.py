"""Fixtures for the browser tests: a real gateway (`sandgate serve`), Debian's Chromium driven by
Playwright, a cuttable proxy between them, and screenshots kept as test artefacts.

The gateway serves three runtimes where it can: `wasm`; `example-local` (the example third-party
runtime, installed from examples/ the way a user installs a plugin: the guest agent as a host
process, with real PTYs); and `microvm` when its plugin is installed and built. Tests that take a
runtime are parametrized over them and skip, with the gateway's own reason, a runtime it lacks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.proxy import CuttableProxy
from tests.serving import Served, free_port, serve

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
KEY = "browser-test-key"
CHROMIUM = os.environ.get("SANDGATE_CHROMIUM", "/usr/bin/chromium")
#: What this machine needs (docs: .library machines/python.md): no sandbox as root, no GPU, no
#: background traffic to Google (the closed network refuses it), no QUIC.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="session")
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (bash .ci/test does) to run the browser tests")
    return CHROMIUM


@pytest.fixture(scope="session")
def allowed_origin_port() -> int:
    """A port for a page on another origin that the gateway allows (tests/browser/test_origin.py)."""
    return free_port()


@pytest.fixture(scope="session")
def example_runtime_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example runtime pip-installed into a folder, found by the gateway through its entry point."""
    work = tmp_path_factory.mktemp("example-runtime")
    source = work / "src"  # a copy: building in place would leave egg-info in the repository
    shutil.copytree(ROOT / "examples" / "sandgate-example-runtime", source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(work / "site"), str(source)],
                   check=True, timeout=300)
    return work / "site"


@pytest.fixture(scope="session")
def gateway(wasm_compiled: None, tmp_path_factory: pytest.TempPathFactory, example_runtime_site: Path,
            allowed_origin_port: int) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("state")
    # Nothing blocked: the microVM runtime takes part where its image is built (else /v1/runtimes says why).
    env = {**os.environ, "SANDGATE_BLOCKED_PLUGINS": "", "SANDGATE_API_KEYS": f"{KEY}:browser",
           "SANDGATE_STATE_DIR": str(state),
           "SANDGATE_ALLOWED_ORIGINS": f"http://127.0.0.1:{allowed_origin_port}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(example_runtime_site), os.environ.get("PYTHONPATH")]))}
    with serve(env) as served:
        # The gateway logs every request: drain its output into an artefact, or the pipe fills up
        # and the gateway blocks on its next log line.
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        log = ARTIFACTS / "gateway.log"
        drain = threading.Thread(target=_drain, args=(served, log), daemon=True)
        drain.start()
        yield served
        served.proc.terminate()  # a clean exit: every session closed, every sandbox destroyed
        assert served.proc.wait(timeout=60) == 0, f"the gateway did not exit cleanly: see {log}"
        drain.join(timeout=10)


def _drain(served: Served, log: Path) -> None:
    assert served.proc.stdout is not None
    with log.open("w") as out:
        out.write(served.banner)
        for line in served.proc.stdout:
            out.write(line)
            out.flush()


@pytest.fixture(scope="session")
def runtimes(gateway: Served) -> dict[str, Any]:
    return gateway.call(KEY, "GET", "/v1/runtimes")  # type: ignore[no-any-return]


def need_runtime(runtimes: dict[str, Any], runtime: str) -> dict[str, Any]:
    """The runtime's entry in GET /v1/runtimes, or a skip that says why the gateway lacks it."""
    for entry in runtimes["runtimes"]:
        if entry["id"] == runtime:
            return entry  # type: ignore[no-any-return]
    why = runtimes.get("unavailable", {}).get(runtime) or "its plugin is not installed"
    pytest.skip(f"runtime {runtime!r} is not available on this gateway: {why}")


@pytest.fixture
def proxy(gateway: Served) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(gateway.port)
    yield proxy
    proxy.close()


@pytest.fixture
def context(chromium: str) -> Iterator[Any]:
    """A fresh Chromium with a fresh profile for each test; closed (process and all) afterwards.

    The Playwright driver lives only as long as the test: its sync API keeps an event loop running
    in the main thread, which would stop pytest-asyncio's tests from running after it."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver, tempfile.TemporaryDirectory(prefix="sandgate-chromium-") as profile:
        context = driver.chromium.launch_persistent_context(
            profile, executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 800}, accept_downloads=True)
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(context: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A page whose script errors fail the test."""
    page = context.pages[0] if context.pages else context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    assert not errors, f"errors in the page: {errors}"


class Shots:
    """Screenshots under tests/artifacts/browser/, named after the test (kept when a test fails)."""

    def __init__(self, name: str) -> None:
        self.prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(self, page: Any, label: str) -> Path:
        path = ARTIFACTS / f"{self.prefix}-{label}.png"
        page.screenshot(path=str(path))
        return path


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Shots:
    return Shots(request.node.name)
