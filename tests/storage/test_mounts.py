"""Host mounts through a real gateway and real WASM sandboxes: admission (allowed_roots), the
permission globs (gateway/storage/mounts.py), the copy in, batch and manual sync back with
rollback (gateway/storage/mount_sync.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Limits, Settings, Storage
from gateway.storage.mounts import parse_mounts
from gateway.web.app import create_app

AUTH = {"Authorization": "Bearer key-a"}
NONE: dict[str, list[str]] = {"created": [], "modified": [], "deleted": []}


def _all_but_wasm() -> tuple[str, ...]:
    from importlib.metadata import entry_points

    from gateway.plugins import ENTRY_POINT_GROUP

    return tuple(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name != "wasm")


@pytest.fixture
async def gateway(aiohttp_client: Any, tmp_path: Path) -> TestClient[Any, Any]:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings = Settings(api_keys={"key-a": "tenant-a"}, storage=Storage(allowed_roots=(str(allowed),)),
                        reap_interval_s=3600.0, blocked_plugins=_all_but_wasm(), runtimes={"wasm": {}},
                        limits=Limits(exec_timeout_s=30.0))
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


# -- through real WASM sandboxes -------------------------------------------------------------------

wasm = pytest.mark.usefixtures("wasm_compiled")


def tree(top: Path) -> dict[str, str]:
    """Every regular file under `top` by relative path, with its text; folders as "/"."""
    out = {}
    for path in sorted(top.rglob("*")):
        rel = str(path.relative_to(top))
        out[rel] = "/" if path.is_dir() else path.read_text()
    return out


@pytest.fixture
def host(tmp_path: Path) -> Path:
    top = tmp_path / "allowed" / "project"
    (top / "src").mkdir(parents=True)
    (top / "src" / "main.py").write_text("print('hi')\n")
    (top / "README").write_text("readme")
    (top / "secret.key").write_text("k")
    (top / "node_modules" / "lib").mkdir(parents=True)
    (top / "node_modules" / "lib" / "x.js").write_text("x")
    (top / "output").mkdir()
    (top / "output" / "old.txt").write_text("old")
    (top / "link").symlink_to("/etc/passwd")
    return top


PERMISSIONS = {"default": ["read", "list"],
               "rules": [{"pattern": "output/**", "allow": ["create", "modify", "delete"], "priority": 1},
                         {"pattern": "secret.key", "deny": ["read"], "priority": 1}],
               "exclude": ["node_modules"]}


async def create(gateway: TestClient[Any, Any], host: Path, **mount: Any) -> str:
    body = {"runtime": "wasm", "mounts": [{"host": str(host), "path": "/work/p", "permissions": PERMISSIONS,
                                           **mount}]}
    resp = await gateway.post("/v1/sandboxes", headers=AUTH, json=body)
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]  # type: ignore[no-any-return]


async def run(gateway: TestClient[Any, Any], sid: str, code: str) -> dict[str, Any]:
    resp = await gateway.post(f"/v1/sandboxes/{sid}/exec", headers=AUTH, json={"code": code})
    assert resp.status == 200, await resp.text()
    done: dict[str, Any] = await resp.json()
    assert done["exit_code"] == 0, done
    return done


def paths(entries: list[dict[str, Any]]) -> list[str]:
    return [e["path"] for e in entries]


@wasm
async def test_the_copy_leaves_out_excluded_unreadable_and_symlinks(gateway: TestClient[Any, Any], host: Path) -> None:
    sid = await create(gateway, host)
    done = await run(gateway, sid, "import os\nfor d, ds, fs in sorted(os.walk('p')):\n"
                                   "    for f in sorted(ds + fs): print(os.path.join(d, f))\n"
                                   "print(open('p/src/main.py').read(), end='')\n")
    assert done["stdout"].splitlines() == ["p/README", "p/output", "p/src", "p/output/old.txt", "p/src/main.py",
                                           "print('hi')"]
    assert done["files"] == NONE and done["mounts"] == [
        {"path": "/work/p", "applied": [], "denied": [], "failed": [], "rolled_back": False, "skipped": []}]


@wasm
async def test_a_batch_sync_applies_permitted_changes_and_reports_the_denied(gateway: TestClient[Any, Any],
                                                                            host: Path) -> None:
    sid = await create(gateway, host)
    before = tree(host)
    done = await run(gateway, sid, "import os\nos.makedirs('p/output/new')\n"
                                   "open('p/output/new/a.txt','w').write('A')\n"
                                   "open('p/output/old.txt','w').write('changed')\n"
                                   "open('p/README','w').write('denied')\n"
                                   "os.remove('p/src/main.py')\n"
                                   "open('p/output/gone.txt','w').write('g')\n")
    synced = done["mounts"][0]
    assert paths(synced["applied"]) == ["p/output/gone.txt", "p/output/new", "p/output/new/a.txt",
                                        "p/output/old.txt"]
    assert sorted(paths(synced["denied"])) == ["p/README", "p/src/main.py"] and synced["failed"] == []
    assert {e["path"]: e["operation"] for e in synced["denied"]} == {"p/README": "modify", "p/src/main.py": "delete"}
    after = tree(host)
    assert after["README"] == "readme" and after["src/main.py"] == before["src/main.py"]  # denied: unchanged
    assert after["output/new/a.txt"] == "A" and after["output/old.txt"] == "changed"
    assert after["node_modules/lib/x.js"] == "x" and (host / "link").is_symlink()
    assert not [p for p in after if ".sandgate-sync-" in p]  # no backup left behind
    # A deletion, and nothing is applied twice: the denied ones were reported once.
    done = await run(gateway, sid, "import os\nos.remove('p/output/gone.txt')\n")
    assert paths(done["mounts"][0]["applied"]) == ["p/output/gone.txt"] and done["mounts"][0]["denied"] == []
    assert not (host / "output" / "gone.txt").exists()


@wasm
async def test_rollback_restores_every_file_the_failed_sync_touched(gateway: TestClient[Any, Any],
                                                                   host: Path) -> None:
    (host / "output" / "z.txt").write_text("z")
    sid = await create(gateway, host, on_error="rollback")
    # After the copy, the host's z.txt becomes a folder: the sync's write of it fails for real.
    (host / "output" / "z.txt").unlink()
    (host / "output" / "z.txt").mkdir()
    (host / "output" / "z.txt" / "inside").write_text("i")
    before = tree(host)
    done = await run(gateway, sid, "import os\nopen('p/output/a.txt','w').write('A')\n"
                                   "open('p/output/old.txt','w').write('changed')\n"
                                   "open('p/output/z.txt','w').write('Z')\n")
    synced = done["mounts"][0]
    assert synced["rolled_back"] is True and synced["applied"] == []
    assert paths(synced["failed"]) == ["p/output/z.txt"]
    assert tree(host) == before  # a.txt removed again, old.txt's old text back
    # Still pending: fix the host, and the next exec's sync applies all three.
    (host / "output" / "z.txt" / "inside").unlink()
    (host / "output" / "z.txt").rmdir()
    done = await run(gateway, sid, "pass")
    assert paths(done["mounts"][0]["applied"]) == ["p/output/a.txt", "p/output/old.txt", "p/output/z.txt"]
    assert (host / "output" / "z.txt").read_text() == "Z"


@wasm
async def test_continue_and_abort_on_a_failed_write(gateway: TestClient[Any, Any], host: Path) -> None:
    for mode, applied in (("continue", ["a.txt", "c.txt"]), ("abort", ["a.txt"])):
        sid = await create(gateway, host, on_error=mode)
        (host / "output" / "b.txt").mkdir()  # made on the host after the copy: the sync's b.txt fails
        done = await run(gateway, sid, "for n in 'abc': open(f'p/output/{n}.txt','w').write(n)\n")
        synced = done["mounts"][0]
        assert paths(synced["applied"]) == [f"p/output/{a}" for a in applied], synced
        assert paths(synced["failed"]) == ["p/output/b.txt"] and synced["rolled_back"] is False
        assert sorted(p.name for p in (host / "output").iterdir() if p.is_file()) == sorted(["old.txt", *applied])
        for name in ("a.txt", "c.txt"):
            (host / "output" / name).unlink(missing_ok=True)
        (host / "output" / "b.txt").rmdir()


@wasm
async def test_manual_sync_applies_only_the_chosen_paths(gateway: TestClient[Any, Any], host: Path) -> None:
    sid = await create(gateway, host, sync="manual")
    done = await run(gateway, sid, "import os\nos.makedirs('p/output/d')\nopen('p/output/d/1','w').write('1')\n"
                                   "open('p/output/2','w').write('2')\nopen('p/README','w').write('x')\n")
    assert done["mounts"] is None  # no batch mount: nothing synced when an exec ends
    assert not (host / "output" / "2").exists()
    listed = (await (await gateway.get(f"/v1/sandboxes/{sid}/mounts", headers=AUTH)).json())["mounts"][0]
    assert paths(listed["pending"]["permitted"]) == ["p/output/2", "p/output/d", "p/output/d/1"]
    assert paths(listed["pending"]["denied"]) == ["p/README"]
    resp = await gateway.post(f"/v1/sandboxes/{sid}/mounts/sync", headers=AUTH,
                              json={"paths": ["/work/p/output/d", "p/README"]})
    answer = await resp.json()
    assert resp.status == 200, answer
    synced = answer["mounts"][0]
    assert paths(synced["applied"]) == ["p/output/d", "p/output/d/1"] and paths(synced["denied"]) == ["p/README"]
    assert (host / "output" / "d" / "1").read_text() == "1" and not (host / "output" / "2").exists()
    assert (host / "README").read_text() == "readme"
    listed = (await (await gateway.get(f"/v1/sandboxes/{sid}/mounts", headers=AUTH)).json())["mounts"][0]
    assert paths(listed["pending"]["permitted"]) == ["p/output/2"]
    assert paths(listed["pending"]["denied"]) == ["p/README"]


@wasm
async def test_invoke_syncs_and_a_restarted_agent_tracks_again(gateway: TestClient[Any, Any], host: Path) -> None:
    sid = await create(gateway, host)
    resp = await gateway.post(f"/v1/sandboxes/{sid}/invoke", headers=AUTH, json={
        "code": "def f():\n    open('p/output/i.txt', 'w').write('I')\n", "function": "f"})
    done = await resp.json()
    assert paths(done["mounts"][0]["applied"]) == ["p/output/i.txt"], done
    assert (host / "output" / "i.txt").read_text() == "I"
    # A WASM exec past its timeout restarts the agent: its change tracker starts empty.
    resp = await gateway.post(f"/v1/sandboxes/{sid}/exec", headers=AUTH, json={"code": "while True: pass",
                                                                                "timeout": 1})
    assert (await resp.json())["error"]["code"] == "timeout"
    done = await run(gateway, sid, "open('p/output/after.txt', 'w').write('a')\n")
    assert paths(done["mounts"][0]["applied"]) == ["p/output/after.txt"], done
    assert (host / "output" / "after.txt").read_text() == "a"
