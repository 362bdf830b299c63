"""The plugin manager: hookspecs, the entry-point group, and nothing loaded at import time."""

from __future__ import annotations

from collections.abc import Iterable

import pluggy

from gateway import hookspecs
from gateway.runtime.base import RuntimeRegistry

ENTRY_POINT_GROUP = "sandgate.runtimes"


def get_plugin_manager(
    *, blocked: Iterable[str] = (), extra_plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """A plugin manager with every installed `sandgate.runtimes` entry point loaded.

    Args:
        blocked: entry-point names not to load (the config's `plugins.blocked`).
        extra_plugins: plugin objects registered directly (tests, embedding applications).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra_plugins:
        if not pm.is_registered(plugin):  # it may also be installed under its entry point
            pm.register(plugin)
    pm.check_pending()
    return pm


def collect_runtimes(pm: pluggy.PluginManager) -> RuntimeRegistry:
    registry = RuntimeRegistry()
    pm.hook.sandgate_register_runtimes(registry=registry)
    return registry
