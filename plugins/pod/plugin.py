"""The pod runtime's plugin module, registered through the `sandgate.runtimes` entry point like any
third-party runtime's. Registering imports nothing heavy: the Kubernetes client loads at start."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.hookspecs import hookimpl

if TYPE_CHECKING:
    from gateway.runtime.base import RuntimeRegistry


@hookimpl
def sandgate_register_runtimes(registry: RuntimeRegistry) -> None:
    from plugins.pod.runtime import PodRuntime

    registry.add(PodRuntime)
