"""What the built-in runtimes share: the cache folder, atomic writes, build progress, and the
guest agent's source files.

Imported by the WASM launcher at every sandbox start: standard library only at module level.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

CACHE_ENV = "SANDGATE_CACHE_DIR"

MSGPACK_FILES = ("__init__.py", "exceptions.py", "ext.py", "fallback.py")


def cache_root() -> Path:
    """sandgate's cache root: $SANDGATE_CACHE_DIR, else the platform's user cache folder."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given)
    if sys.platform == "linux":
        # platformdirs' XDG rule for the common cases, inline: importing platformdirs costs
        # ~25 ms at every sandbox start (tests/plugins/wasm holds the two equal). Anything
        # unusual (a relative HOME) is left to platformdirs.
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        home = os.environ.get("HOME", "")
        if os.path.isabs(xdg):
            return Path(xdg) / "sandgate"
        if os.path.isabs(home):
            return Path(home) / ".cache" / "sandgate"
    import platformdirs

    return Path(platformdirs.user_cache_dir("sandgate"))


def private_dir(path: Path) -> Path:
    """`path` made (with parents) and held at 0700: it holds native code and images that every
    sandbox runs, so nobody else may write there."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)
    return path




def write_atomic(dest: Path, data: bytes) -> None:
    """`data` at `dest`, 0600, appearing whole or not at all."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise




@contextlib.contextmanager
def progress_ticking(progress: Callable[[float, str], None] | None, phase: str) -> Iterator[list[str]]:
    """Call `progress(elapsed, phase)` about twice a second from a thread while the body runs (the
    body may change the phase: the yielded list's one item), then once with "done" when it
    succeeded. Nothing at all when `progress` is None."""
    current = [phase]
    if progress is None:
        yield current
        return
    start = time.monotonic()
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            progress(time.monotonic() - start, current[0])

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        yield current
    finally:
        stop.set()
        ticker.join()
    progress(time.monotonic() - start, "done")


class TerminalProgress:
    """A `Progress` for people: a spinner and the elapsed time on one rewritten line when
    stderr is a terminal, else a plain line every `every` seconds (logs stay readable)."""

    FRAMES = "|/-\\"

    def __init__(self, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.frame = 0
        self.last_line = -every

    def __call__(self, elapsed: float, phase: str) -> None:
        stream = self.stream
        tty = stream.isatty()
        if phase == "done":
            text = f"sandgate: ready after {elapsed:.1f}s"
            print(("\r\033[K" if tty else "") + text, file=stream, flush=True)
            return
        if tty:
            spin = self.FRAMES[self.frame % len(self.FRAMES)]
            self.frame += 1
            text = f"\r\033[K{spin} sandgate: {phase} {elapsed:5.1f}s"
            print(text, end="", file=stream, flush=True)
        elif elapsed - self.last_line >= self.every:
            self.last_line = elapsed
            print(f"sandgate: {phase} ({elapsed:.0f}s)", file=stream, flush=True)


# Locks.


def acquire_file_lock(path: Path) -> BinaryIO:
    """An exclusive lock on `path` (made if missing), across processes and threads, held until the
    returned file is closed. Blocking: from async code, call it in a thread."""
    import fcntl

    f = open(path, "a+b")
    try:
        os.chmod(path, 0o600)
        fcntl.flock(f, fcntl.LOCK_EX)
    except BaseException:
        f.close()
        raise
    return f


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """`acquire_file_lock` as a context manager."""
    with acquire_file_lock(path):
        yield


# Per-gateway state.


def gateway_work_root(runtime_id: str) -> Path:
    """A fresh folder for this gateway process's sandboxes of one runtime (not made yet):
    `$SANDGATE_STATE_DIR/<runtime>/<gateway pid>-<random>/`, default state dir
    `/tmp/sandgate-<uid>`. The pid in the name lets `remove_orphans` find dead gateways' leftovers."""
    import secrets
    import tempfile

    state = os.environ.get("SANDGATE_STATE_DIR") or Path(tempfile.gettempdir()) / f"sandgate-{os.getuid()}"
    return Path(state) / runtime_id / f"{os.getpid()}-{secrets.token_hex(4)}"


def remove_orphans(work_root: Path, marker_env: str | None = None) -> None:
    """Remove the work folders beside `work_root` of gateways that died without cleaning up, after
    killing (SIGKILL) their processes still running: those whose environment has `marker_env`
    naming that folder (a parent-death signal ends them with their gateway, but not one that
    died between fork and prctl, or a process of a runtime that sets none)."""
    import shutil

    parent = work_root.parent
    if not parent.is_dir():
        return
    dead = []
    for entry in parent.iterdir():
        pid, _, _ = entry.name.partition("-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            dead.append(entry)
    if dead and marker_env is not None:
        kill_marked(marker_env, {str(entry) for entry in dead})
    for entry in dead:
        shutil.rmtree(entry, ignore_errors=True)


def kill_marked(marker_env: str, values: set[str]) -> list[int]:
    """SIGKILL every process of this user whose environment sets `marker_env` to one of `values`;
    returns their pids. (A process's environ is readable by its own user and root only.)"""
    import signal

    killed = []
    wanted = {f"{marker_env}={value}".encode() for value in values}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if wanted & set(environ.split(b"\0")):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue
            killed.append(int(proc.name))
    return killed


# The guest agent's files.


def package_dir(name: str) -> Path | None:
    """A package's folder, found without importing it (importing the agent on the host would
    run its code here for nothing). None when it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a parent package is missing
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def py_files(root: Path) -> Iterable[Path]:
    """Every *.py below `root`, relative to it (no caches, no hidden folders)."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if path.is_file() and not any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            yield rel


def agent_files(extra_packages: Iterable[str] = ()) -> dict[str, Path]:
    """What the folder holds: guest-relative path -> host source file.

    `extra_packages` are dotted names of more pure-Python packages the agent imports (say a
    protocol module shared with the gateway); their parent packages get empty `__init__.py`
    files, so a parent's own imports (aiohttp, pluggy) never run in the guest. pytest, for the
    agent's test mode, goes into a folder of its own (plugins/pytest_files.py)."""
    from plugins.pytest_files import PYTEST_DIR, pytest_files

    files: dict[str, Path] = {f"{PYTEST_DIR}/{rel}": source for rel, source in pytest_files().items()}
    agent = package_dir("guest_agent")
    if agent is not None:  # may not exist yet: stage whatever is there
        for rel in py_files(agent):
            files[f"guest_agent/{rel.as_posix()}"] = agent / rel
    msgpack = package_dir("msgpack")
    if msgpack is None:
        raise RuntimeError("msgpack is not installed; the guest agent needs it")
    for name in MSGPACK_FILES:
        files[f"msgpack/{name}"] = msgpack / name
    for dotted in extra_packages:
        folder = package_dir(dotted)
        if folder is None:
            raise RuntimeError(f"package {dotted!r} is not installed")
        prefix = dotted.replace(".", "/")
        for rel in py_files(folder):
            files[f"{prefix}/{rel.as_posix()}"] = folder / rel
    return files


def _files_under(paths: Iterable[Path]) -> Iterator[os.stat_result]:
    for top in paths:
        if top.is_symlink() or not top.is_dir():
            with contextlib.suppress(FileNotFoundError):
                yield top.lstat()
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames]:
                with contextlib.suppress(FileNotFoundError):
                    yield os.lstat(os.path.join(dirpath, name))


def disk_bytes(paths: Iterable[Path]) -> int:
    """Bytes on disk (allocated blocks: a sparse file counts what it holds) of the files and
    folders under `paths`, each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for st in _files_under(paths):
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def freed_bytes(paths: Iterable[Path]) -> int:
    """The bytes removing `paths` would free: files with a hard link outside them free nothing."""
    links: dict[tuple[int, int], list[int]] = {}
    for st in _files_under(paths):
        entry = links.setdefault((st.st_dev, st.st_ino), [0, st.st_nlink, st.st_blocks * 512])
        entry[0] += 1
    return sum(size for found, nlink, size in links.values() if found >= nlink or nlink == 0)
