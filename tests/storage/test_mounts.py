"""Host mounts' admission and permission globs (gateway/storage/mounts.py) through a real gateway
(the example runtime runs the real agent as a host process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Settings, Storage
from gateway.storage.mounts import parse_mounts
from gateway.web.app import create_app

AUTH = {"Authorization": "Bearer key-a"}


@pytest.fixture
async def gateway(aiohttp_client: Any, tmp_path: Path) -> TestClient[Any, Any]:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings = Settings(api_keys={"key-a": "tenant-a"}, storage=Storage(allowed_roots=(str(allowed),)),
                        reap_interval_s=3600.0)
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


async def test_a_host_directory_outside_the_allowed_roots_is_refused(gateway: TestClient[Any, Any],
                                                                      tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "allowed" / "link").symlink_to(outside)  # a symlink out of the root is outside too
    for host in (str(outside), str(tmp_path / "allowed" / "link"), "/etc"):
        resp = await gateway.post("/v1/sandboxes", headers=AUTH, json={"mounts": [{"host": host, "path": "/work/m"}]})
        assert resp.status == 403, await resp.text()
        assert (await resp.json())["error"]["code"] == "forbidden"
    listed = await (await gateway.get("/v1/sandboxes", headers=AUTH)).json()
    assert listed["sandboxes"] == []


def test_globs_allow_deny_by_priority_and_exclude(tmp_path: Path) -> None:
    (mount,) = parse_mounts([{"host": str(tmp_path), "path": "/work/m", "permissions": {
        "default": ["read", "list"],
        "rules": [{"pattern": "output/**", "allow": ["create", "modify"], "priority": 1},
                  {"pattern": "output/secret/**", "deny": ["create", "modify", "read"], "priority": 2},
                  {"pattern": "**/*.log", "allow": ["delete"], "deny": ["delete"], "priority": 1}],
        "exclude": ["node_modules", ".git"]}}], [str(tmp_path)])
    perms = mount.permissions
    assert perms.allows("output/a/b.txt", "create") and perms.allows("output/x", "modify")
    assert not perms.allows("input.txt", "modify") and perms.allows("input.txt", "read")
    assert not perms.allows("output/secret/k", "create") and not perms.allows("output/secret/k", "read")
    assert not perms.allows("output/run.log", "delete")  # deny wins a tie
    assert not perms.allows("node_modules/x/y.js", "read") and not perms.allows("a/.git/HEAD", "read")
    assert perms.allows(".hidden/f", "read")
