"""The IDE page and its static files as the gateway serves them (the page itself runs in tests/browser)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sandgate_example_runtime
from aiohttp.test_utils import TestClient

from gateway.config import Settings
from gateway.web import ide
from gateway.web.app import create_app


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient[Any, Any]:
    settings = Settings(api_keys={"k": "t"}, blocked_plugins=("wasm", "microvm"), default_runtime="example-local",
                        reap_interval_s=3600.0)
    return await aiohttp_client(create_app(settings, plugins=[sandgate_example_runtime]))  # type: ignore[no-any-return]


async def test_page_has_a_strict_csp_and_needs_no_key(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-eval" not in csp and "script-src 'self' 'unsafe-inline'" not in csp
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert '<script type="module" src="/static/ide.js">' in await resp.text()
    # The rest of the API is untouched by the page's routes.
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/v1/runtimes")).status == 401


@pytest.mark.parametrize(("path", "content_type"), [
    ("/static/sandgate.js", "text/javascript"), ("/static/ide.js", "text/javascript"),
    ("/static/pyconsole.js", "text/javascript"), ("/static/ide.css", "text/css"),
])
async def test_static_files(client: TestClient[Any, Any], path: str, content_type: str) -> None:
    resp = await client.get(path)
    assert resp.status == 200 and resp.content_type == content_type
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", [
    "/static/..%2Fapp.py", "/static/../app.py", "/static/.hidden", "/static/index.html", "/static/nope.js",
    "/static/vendor/xterm/package.json", "/static/vendor/left-pad/index.js",
    "/static/vendor/msgpack/..%2F..%2F..%2Fpackage.json", "/static/vendor/msgpack/../../../../ide.py",
])
async def test_nothing_else_is_served(client: TestClient[Any, Any], path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 404, path
    assert (await resp.json())["error"]["code"] == "not_found"


async def test_vendor_files_come_from_node_modules(client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    if not (ide.NODE_MODULES / "@xterm" / "xterm").is_dir():
        pytest.skip("gateway/web/node_modules is missing: run `npm ci` in gateway/web (bash .ci/setup does)")
    resp = await client.get("/static/vendor/xterm/xterm.mjs")
    assert resp.status == 200 and resp.content_type == "text/javascript"
    assert "export{" in (await resp.text()).replace(" ", "")
    assert (await client.get("/static/vendor/msgpack/index.mjs")).status == 200

    monkeypatch.setattr(ide, "NODE_MODULES", tmp_path / "node_modules")  # a pip-only install
    resp = await client.get("/static/vendor/xterm/xterm.mjs")
    assert resp.status == 404
    assert "npm ci" in (await resp.json())["error"]["message"]
