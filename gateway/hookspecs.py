"""The sandgate plugin hooks. Plugins implement them with `@gateway.hookimpl`.

Runtimes are plugins exposed through the entry-point group `sandgate.runtimes` (the built-in ones
too). Hooks are synchronous: async work belongs to the objects they return.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gateway.runtime.base import RuntimeRegistry

PROJECT = "sandgate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


@hookspec
def sandgate_register_runtimes(registry: RuntimeRegistry) -> None:
    """Add runtime classes with `registry.add(RuntimeClass)`.

    Called once by `get_plugin_manager()` users (the gateway's app factory) before any sandbox
    exists. Returns nothing; every implementation is called.
    """


# ---------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def sandgate_authenticate(token: str) -> str | None:
    """Map a bearer token to a tenant name, for deployments with their own identity system.

    Called for every REST request and WebSocket upgrade whose token is not one of the configured
    API keys. Stops at the first non-None result; None everywhere means 401.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle events
# ---------------------------------------------------------------------------------------------


@hookspec
def sandgate_sandbox_created(sandbox_id: str, tenant: str, runtime: str) -> None:
    """A sandbox was created and its agent answered hello. Called by SandboxManager.create.
    Returns nothing; every implementation is called."""


@hookspec
def sandgate_sandbox_destroyed(sandbox_id: str, tenant: str, runtime: str, reason: str) -> None:
    """A sandbox was destroyed; `reason` is one of api, ttl, idle, shutdown, failed. Called by
    SandboxManager.destroy after the runtime removed it. Every implementation is called."""


@hookspec
def sandgate_exec_finished(sandbox_id: str, tenant: str, exec_id: str, end: dict[str, Any]) -> None:
    """An exec ended; `end` is its end event (exit_code, signal, duration_ms, error). Called by
    SandboxManager's exec pump, e.g. for audit logs or billing. Every implementation is called."""
