"""The folder a WASM sandbox sees read-only at /sandgate: the guest agent's sources, msgpack's
pure-Python files (the guest cannot load C extensions; MSGPACK_PUREPYTHON=1 makes msgpack use
its fallback directly) and the modules of plugins/wasm/guest as top-level packages (`sandgate`:
fetch through the host door).

It is built once per content and kept under the cache root, keyed by the hash of what it holds,
so every sandbox shares one copy and an edited agent gets a new folder instead of changing the
files under running sandboxes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from plugins.common import agent_files, cache_root, py_files
from plugins.wasm.artifacts import child_env, file_sha256, wasm_path


def _precompile(folder: Path) -> None:
    """Compile `folder`'s sources with the guest's CPython, the folder mounted at /work."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "plugins.wasm.launcher", "--work", str(folder), "--", "python", "-c", _PRECOMPILE],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"precompiling the agent folder failed ({proc.returncode}): {err}")


GUEST_MODULES = Path(__file__).with_name("guest")


def guest_files() -> dict[str, Path]:
    """plugins/wasm/guest's packages, at the folder's top (the guest imports `sandgate`)."""
    return {rel.as_posix(): GUEST_MODULES / rel for rel in py_files(GUEST_MODULES) if len(rel.parts) > 1}


def _parents_needing_init(files: dict[str, Path]) -> set[str]:
    """Package folders (other than top-level ones' own) that lack an `__init__.py`."""
    needed = set()
    for rel in files:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts)):
            init = "/".join(parts[:i]) + "/__init__.py"
            if init not in files:
                needed.add(init)
    return needed


# Run in the guest over the staging folder: bytecode for the guest's own CPython (the host's
# cannot make it), with tracebacks naming /sandgate. Unchecked-hash pycs are never compared with
# their sources, which is right here: the folder's name is the hash of its content. A file that
# does not compile is left without bytecode: importing it in the sandbox reports the error.
_PRECOMPILE = (
    "import compileall, py_compile; "
    "compileall.compile_dir('/work', quiet=2, ddir='/sandgate', "
    "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)"
)


def stage_agent_dir(extra_packages: Iterable[str] = (), precompile: bool = True) -> Path:
    """The staged folder (made if missing): `<cache root>/agent/<content hash>/`, read-only to
    the guest. Safe to call from several processes at once: each builds in a temporary folder
    and renames it into place; a loser of the race uses the winner's identical folder.

    With `precompile`, the guest's CPython compiles the sources once while staging (one sandbox
    run, ~0.3 s, or the python module's first compile if the cache lacks it), since a read-only
    /sandgate could otherwise never hold bytecode and every sandbox start would compile the
    agent and msgpack again (~50 ms of guest CPU each time)."""
    files = {**agent_files(extra_packages), **guest_files()}
    empty_inits = _parents_needing_init(files)
    digest = hashlib.sha256()
    if precompile:  # bytecode is the guest CPython's: a new one makes a new folder
        digest.update(file_sha256(wasm_path("python")).encode())
    contents: dict[str, bytes] = {}
    for rel in sorted([*files, *empty_inits]):
        data = files[rel].read_bytes() if rel in files else b""
        contents[rel] = data
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    parent = cache_root() / "agent"
    target = parent / digest.hexdigest()[:32]
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        for rel, data in contents.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        if precompile:
            _precompile(tmp)
        for path in tmp.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp)  # another process staged the same content first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
