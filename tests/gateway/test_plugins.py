"""The plugin system: hook specs documented, entry points, and hooks called in a real session."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import sandgate_example_runtime
from aiohttp.test_utils import TestClient

from gateway import hookimpl, hookspecs
from gateway.config import Settings
from gateway.plugins import ENTRY_POINT_GROUP, collect_runtimes, get_plugin_manager
from gateway.runtime.base import Runtime, RuntimeRegistry
from gateway.web.app import create_app

KEY = {"Authorization": "Bearer k"}


def test_every_hook_is_documented() -> None:
    hooks = [obj for name, obj in vars(hookspecs).items() if name.startswith("sandgate_")]
    assert len(hooks) >= 4
    for hook in hooks:
        doc = inspect.getdoc(hook) or ""
        assert "Called" in doc, f"{hook.__name__} must say when it is called"
        assert "Returns" in doc or "Stops at" in doc or "every implementation" in doc.lower(), hook.__name__


def test_builtin_wasm_runtime_comes_from_the_entry_point() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert names.get("wasm") == "plugins.wasm.plugin"
    assert "wasm" in collect_runtimes(get_plugin_manager()).ids()
    assert "wasm" not in collect_runtimes(get_plugin_manager(blocked=["wasm"])).ids()


def test_registry_refuses_duplicates_and_non_runtimes() -> None:
    class A(Runtime):
        id = "dup"

        async def create(self, spec: Any) -> Any:
            raise AssertionError

    class B(A):
        id = "dup"

    registry = RuntimeRegistry()
    registry.add(A)
    registry.add(A)  # the same class twice is harmless
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(B)
    with pytest.raises(TypeError):
        registry.add(object)  # type: ignore[arg-type]


class Recorder:
    """Records every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def sandgate_register_runtimes(self, registry: RuntimeRegistry) -> None:
        self.calls.append(("register_runtimes", {}))

    @hookimpl
    def sandgate_authenticate(self, token: str) -> str | None:
        self.calls.append(("authenticate", {"token": token}))
        return "hooked-tenant" if token == "from-hook" else None

    @hookimpl
    def sandgate_sandbox_created(self, sandbox_id: str, tenant: str, runtime: str) -> None:
        self.calls.append(("sandbox_created", {"tenant": tenant, "runtime": runtime}))

    @hookimpl
    def sandgate_exec_finished(self, sandbox_id: str, tenant: str, exec_id: str, end: dict[str, Any]) -> None:
        self.calls.append(("exec_finished", {"exit_code": end["exit_code"]}))

    @hookimpl
    def sandgate_sandbox_destroyed(self, sandbox_id: str, tenant: str, runtime: str, reason: str) -> None:
        self.calls.append(("sandbox_destroyed", {"reason": reason}))


async def test_hooks_called_in_order_in_a_real_session(aiohttp_client: Any) -> None:
    recorder = Recorder()
    app = create_app(Settings(api_keys={"k": "tenant"}, blocked_plugins=("wasm", "microvm")),
                     plugins=[sandgate_example_runtime, recorder])
    client: TestClient[Any, Any] = await aiohttp_client(app)
    headers = {"Authorization": "Bearer from-hook"}
    resp = await client.post("/v1/sandboxes", json={"runtime": "example-local"}, headers=headers)
    assert resp.status == 201, await resp.text()
    sid = (await resp.json())["id"]
    resp = await client.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["true"]}, headers=headers)
    assert (await resp.json())["exit_code"] == 0
    resp = await client.delete(f"/v1/sandboxes/{sid}", headers=headers)
    assert resp.status == 204
    names = [name for name, _ in recorder.calls if name != "authenticate"]
    assert names == ["register_runtimes", "sandbox_created", "exec_finished", "sandbox_destroyed"]
    assert ("sandbox_created", {"tenant": "hooked-tenant", "runtime": "example-local"}) in recorder.calls
    assert ("sandbox_destroyed", {"reason": "api"}) in recorder.calls
    # Configured keys are checked first; the hook only sees tokens that are not keys.
    await client.get("/v1/sandboxes", headers=KEY)
    assert ("authenticate", {"token": "k"}) not in recorder.calls
