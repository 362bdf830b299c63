"""The WASM runtime's plugin module, registered through the `sandgate.runtimes` entry point like any
third-party runtime's. It is apart from the package so the launcher never imports the gateway."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.hookspecs import hookimpl

if TYPE_CHECKING:
    from gateway.runtime.base import RuntimeRegistry


@hookimpl
def sandgate_register_runtimes(registry: RuntimeRegistry) -> None:
    from plugins.wasm.runtime import WasmRuntime

    registry.add(WasmRuntime)
