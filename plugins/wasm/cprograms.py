"""C and C++ on the WASM runtime: compiled to wasm32-wasi by zig's clang (the PyPI package
`ziglang`) inside the jail of plugins.wasm.jail, cached by source, run by the launcher's
`program` mode with the sandbox's /work preopened.

The toolchain: `zig cc`/`zig c++ -target wasm32-wasi` with the flags below, fixed (a request
cannot add flags). C++ has no exceptions (zig's wasm32-wasi libc++ is built without them), so
`throw` is a compile error. A constructor linked into every program makes /work the working
directory, as on every other runtime (wasi-libc starts in "/", where nothing is preopened).

Two caches, both under the WASM cache folder:
- zig's global cache, holding wasi-libc, libc++ and compiler-rt for exactly these flags: zig builds
  them at its first compile (minutes), so `warm` builds them once, jailed like any compile but
  with the cache writable, into a folder that then never changes; each compile sees it read-only
  through an overlay whose writes stay in that compile's own tmpfs.
- compiled programs: one `.cwasm` per (language, source, flags, zig, wasmtime, engine flags, and
  the code of this module and the jail), so the same source runs again without zig or Cranelift;
  least recently used go first beyond `compiled_cache_mb`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from guest_agent import languages
from plugins.common import CACHE_ENV, cache_root, file_lock, private_dir, progress_ticking
from plugins.wasm import artifacts, jail
from plugins.wasm.disk import WORK_ROOT_ENV

log = logging.getLogger(__name__)

#: The languages this module builds (ids of guest_agent/languages.py).
LANGUAGES = frozenset({"c", "cpp"})

#: Every flag of a compile, in one place: they decide what zig's cache holds and are hashed into
#: both caches' names. wasi-libc's emulations make common POSIX calls link (signal, clock,
#: getpid, mmap); -s strips debug info (a hello world is 23 KB instead of 970 KB).
COMMON_FLAGS = (
    "-target", "wasm32-wasi", "-O2", "-s",
    "-D_WASI_EMULATED_SIGNAL", "-D_WASI_EMULATED_PROCESS_CLOCKS", "-D_WASI_EMULATED_GETPID",
    "-D_WASI_EMULATED_MMAN",
    "-lwasi-emulated-signal", "-lwasi-emulated-process-clocks", "-lwasi-emulated-getpid", "-lwasi-emulated-mman",
)
DRIVER_FLAGS = {
    "c": ("cc", *COMMON_FLAGS, "-lm"),
    "cpp": ("c++", *COMMON_FLAGS, "-fno-exceptions"),
}
#: Linked into every program, before main: relative paths then mean /work.
START_FILE = "sandgate_start.c"
START_SOURCE = (b"#include <unistd.h>\n"
                b"__attribute__((constructor)) static void sandgate_start(void) { chdir(\"/work\"); }\n")
OUTPUT = f"{jail.OUT_DIR}/main.wasm"
#: The programs `warm` compiles to fill zig's cache (what every C and C++ compile links).
WARM_SOURCES = {
    "c": b"#include <stdio.h>\n#include <math.h>\nint main(void) { printf(\"%f\\n\", sqrt(2.0)); return 0; }\n",
    "cpp": b"#include <iostream>\n#include <string>\n#include <vector>\n"
           b"int main() { std::vector<std::string> v{\"warm\"}; std::cout << v[0] << std::endl; }\n",
}
#: Limits of the warm-up compiles: trusted input, building all of wasi-libc and libc++ in parallel.
WARM_LIMITS = jail.JailLimits(wall_s=3600.0, cpu_s=36000.0, memory_bytes=8 << 30, disk_bytes=2 << 30,
                              processes=4096, open_files=4096)
#: Checked at start: a C program compiled from the warm cache must take no longer than this.
PROBE_LIMITS = jail.JailLimits(wall_s=60.0, cpu_s=60.0)
PROBE_SOURCE = b"int main(void) { return 0; }\n"
#: Modules up to this size are compiled by wasmtime in the gateway (see `_serialize`).
IN_PROCESS_BYTES = 4 << 20


class ToolchainMissing(RuntimeError):
    """zig (the ziglang package) is not installed, or the jail cannot run here."""


#: The start-up probe's verdict ("" when a jailed compile works), by (mount point, zig cache, zig).
_PROBED: dict[tuple[str, str, str], str] = {}


# Locating the toolchain.


def installed_zig_dir() -> Path:
    """The ziglang package's folder (the `zig` binary and its `lib/`), found without importing."""
    spec = importlib.util.find_spec("ziglang")
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainMissing("the ziglang package is not installed (pip install ziglang)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not os.access(folder / "zig", os.X_OK) or not (folder / "lib").is_dir():
        raise ToolchainMissing(f"{folder} holds no zig binary and lib folder")
    return folder


def _dist_info() -> Path:
    site = installed_zig_dir().parent
    for name in os.listdir(site):
        if name.startswith("ziglang-") and name.endswith(".dist-info"):
            return site / name
    raise ToolchainMissing(f"no ziglang dist-info folder beside {site / 'ziglang'}")


def zig_version() -> str:
    """ziglang's version, from its dist-info folder's name (zig itself takes ~50 ms to ask)."""
    return _dist_info().name[len("ziglang-"):-len(".dist-info")]


def toolchain_dir() -> Path:
    """zig as every jail sees it: the ziglang package's folder linked into the cache once per
    ziglang build (the hashes its RECORD lists for the package's files name the copy). zig's library
    cache trusts an input file while its inode and mtime are unchanged: the same ziglang installed
    in another virtualenv (a CI clone's) has new inodes, so with the package's own folder every
    entry `warm` made would miss and zig would rebuild libc inside a jail that cannot. Hard links
    (a copy across file systems) cost nothing on the usual single disk."""
    record = _dist_info() / "RECORD"
    try:
        # The package's own files only: the rest (the console script's shebang, install metadata)
        # differs from one virtualenv to the next.
        lines = sorted(line for line in record.read_text().splitlines() if line.startswith("ziglang/"))
    except OSError as exc:
        raise ToolchainMissing(f"cannot read {record}: {exc.strerror}") from None
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
    dest = artifacts.wasm_cache_dir() / f"zig-{zig_version()}-{digest}"
    if dest.is_dir():
        return dest
    with file_lock(dest.parent / f".{dest.name}.lock"):
        if not dest.is_dir():
            building = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                shutil.copytree(installed_zig_dir(), building / "zig", copy_function=_link_or_copy,
                                ignore=shutil.ignore_patterns("__pycache__"))
                os.rename(building / "zig", dest)
            finally:
                shutil.rmtree(building, ignore_errors=True)
    return dest


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def zig_cache_dir() -> Path:
    """zig's global cache for this zig (`toolchain_dir`, the very files) and these flags (made by
    `warm`, then never written)."""
    return artifacts.wasm_cache_dir() / f"zig-cache-{toolchain_dir().name}-{_short_hash(DRIVER_FLAGS)[:12]}"


def zig_cache_dir_ready() -> bool:
    """Whether `warm` has nothing to build (False too when zig is missing: `warm` then says so)."""
    try:
        return zig_cache_dir().is_dir()
    except ToolchainMissing:
        return False


def programs_dir() -> Path:
    return private_dir(artifacts.wasm_cache_dir() / "programs")


def jail_mount_point() -> Path:
    """An empty folder each jail mounts its root over (in its own mount namespace)."""
    path = artifacts.wasm_cache_dir() / "jail-root"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


@functools.cache
def _recipe_digest() -> str:
    """The digest of the code that decides what a compile may see and produce (this module and
    the jail): a program compiled under an older jail is never reused by a newer one."""
    h = hashlib.sha256()
    for module in (__file__, jail.__file__):
        h.update(Path(module).read_bytes())
    return h.hexdigest()


def program_path(language: str, code: bytes) -> Path:
    """Where the compiled program for this source is (or will be) cached: the name carries the
    source's digest with everything else that changes the machine code."""
    digest = _short_hash(language, hashlib.sha256(code).hexdigest(), DRIVER_FLAGS, START_SOURCE.decode(),
                         zig_version(), _recipe_digest())
    name = (f"{language}-{digest[:32]}-wasmtime{artifacts.wasmtime_version()}-{os.uname().machine}-"
            f"{artifacts.flags_hash()}.cwasm")
    return programs_dir() / name


# The jailed compile.


def compile_spec(language: str, limits: jail.JailLimits, *, cache_writable: bool = False,
                 cache_dir: Path | None = None) -> jail.JailSpec:
    """The jail's spec for compiling one `language` source (the bytes on the jail's stdin)."""
    source = f"{jail.SRC_DIR}/{languages.BY_ID[language].filename}"
    start = f"{jail.SRC_DIR}/{START_FILE}"
    # The start file is C in both languages; `-x none` returns to telling by extension.
    argv = [f"{jail.TOOLCHAIN}/zig", *DRIVER_FLAGS[language], "-o", OUTPUT, "-x", "c", start, "-x", "none", source]
    env = {"ZIG_GLOBAL_CACHE_DIR": jail.CACHE, "ZIG_LOCAL_CACHE_DIR": f"{jail.TMP}/zig-local", "HOME": jail.TMP,
           "TMPDIR": jail.TMP, "PATH": jail.TOOLCHAIN}
    return jail.JailSpec(toolchain_dir=str(toolchain_dir()), cache_dir=str(cache_dir or zig_cache_dir()),
                         mount_point=str(jail_mount_point()), argv=argv, env=env, source_path=source,
                         output_path=OUTPUT, limits=limits, cache_writable=cache_writable,
                         extra_files={start: START_SOURCE.decode()})


def jail_env() -> dict[str, str]:
    """Stage 1's whole environment: what Python needs to import the jail, and the orphan marker."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
            "PYTHONPATH": artifacts.child_env()["PYTHONPATH"], CACHE_ENV: str(cache_root())}


def warm(progress: Callable[[float, str], None] | None = None) -> Path:
    """zig's global cache, built first if missing (a few minutes, once per zig and flags): a
    jailed compile of a C and a C++ program with the cache writable, into a fresh folder renamed
    into place only when both succeeded, under a lock so concurrent callers build it once."""
    dest = zig_cache_dir()
    if dest.is_dir():
        return dest
    with progress_ticking(progress, "waiting for another process building the C/C++ library cache") as phase, \
            file_lock(dest.parent / f".{dest.name}.lock"):
        if not dest.is_dir():
            building = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                for language in ("c", "cpp"):
                    phase[0] = f"building the {language} library cache for zig (once; a few minutes)"
                    spec = compile_spec(language, WARM_LIMITS, cache_writable=True, cache_dir=building)
                    result = asyncio.run(jail.run(spec, WARM_SOURCES[language], jail_env()))
                    if not result.ok:
                        raise ToolchainMissing(f"zig could not build its {language} libraries: {result.message} "
                                               f"{result.stderr.decode(errors='replace')[-2000:]}")
                shutil.rmtree(building / "tmp", ignore_errors=True)
                os.chmod(building, 0o700)
                os.rename(building, dest)
            except BaseException:
                shutil.rmtree(building, ignore_errors=True)
                raise
    return dest


@dataclass
class Build:
    """What `CPrograms.build` made: a compiled program to run, or why there is none."""

    #: The program's `.cwasm`, when the compile succeeded (or was cached).
    module: Path | None
    #: The jail's result when the compile failed (the diagnostics are in its stderr).
    failure: jail.JailResult | None = None
    #: CPU the compile used (0 for a cache hit): the sandbox that asked is charged.
    cpu_s: float = 0.0
    cached: bool = False


@dataclass
class _Flight:
    task: asyncio.Task[Build]
    waiters: int = 0


class CPrograms:
    """The WASM runtime's C/C++ builder: jailed compiles (at most `concurrency` at a time; one per
    distinct source, shared by everyone who asks for it meanwhile) and the compiled-program cache."""

    def __init__(self, limits: jail.JailLimits, concurrency: int, cache_bytes: int, work_root: Path) -> None:
        self.limits = limits
        self.cache_bytes = cache_bytes
        self.slots = asyncio.Semaphore(concurrency)
        self.env = {**jail_env(), WORK_ROOT_ENV: str(work_root)}
        self._flights: dict[Path, _Flight] = {}

    @classmethod
    async def start(cls, limits: jail.JailLimits, concurrency: int, cache_bytes: int, work_root: Path,
                    progress: Callable[[float, str], None] | None = None) -> CPrograms:
        """Build zig's cache if missing, then prove the jail works here with one compile from it.
        Raises ToolchainMissing (with the reason) when C and C++ cannot be offered."""
        await asyncio.to_thread(warm, progress)
        programs = cls(limits, concurrency, cache_bytes, work_root)
        probe = (str(jail_mount_point()), str(zig_cache_dir()), str(toolchain_dir()))
        if probe not in _PROBED:  # once per process: the host does not change (tests start many gateways)
            result = await jail.run(compile_spec("c", PROBE_LIMITS), PROBE_SOURCE, programs.env)
            _PROBED[probe] = "" if result.ok else (f"a jailed compile fails here: {result.reason}: {result.message} "
                                                   f"{result.stderr.decode(errors='replace')[:500]}")
        if _PROBED[probe]:
            raise ToolchainMissing(_PROBED[probe])
        return programs

    async def build(self, language: str, code: str, cpu_s: float) -> Build:
        """The compiled program for `code`: from the cache, or compiled now with at most `cpu_s`
        of CPU per compiler process (the caller's remaining budget, capped by the settings).
        Cancelling stops the compile unless someone else waits for the same source."""
        source = code.encode()
        dest = program_path(language, source)
        if _touch(dest):
            return Build(dest, cached=True)
        flight = self._flights.get(dest)
        first = flight is None
        if flight is None:
            flight = self._flights[dest] = _Flight(asyncio.create_task(self._compile(language, source, dest, cpu_s)))
            flight.task.add_done_callback(lambda _: self._flights.pop(dest, None))
        flight.waiters += 1
        try:
            built = await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():  # nobody else wants it: stop the jail, and
                flight.task.cancel()                           # return only once it is gone
                with contextlib.suppress(asyncio.CancelledError):
                    await flight.task
            raise
        finally:
            flight.waiters -= 1
        if not first:  # only the exec that started the compile pays for it
            return Build(built.module, built.failure, 0.0, cached=built.module is not None)
        return built

    async def _compile(self, language: str, source: bytes, dest: Path, cpu_s: float) -> Build:
        limits = self.limits
        if cpu_s < limits.cpu_s:
            limits = dataclasses.replace(limits, cpu_s=max(cpu_s, 0.01))
        async with self.slots:  # both steps: wasmtime's compile of a C++ module is ~0.7 s of CPU too
            result = await jail.run(compile_spec(language, limits), source, self.env)
            if not result.ok:
                return Build(None, result, result.cpu_s)
            try:
                await _serialize(result.output, dest, self.limits)
            except RuntimeError as exc:
                result.reason, result.message, result.exit_code = "crash", str(exc), None
                return Build(None, result, result.cpu_s)
        await asyncio.to_thread(_evict, dest.parent, self.cache_bytes, keep=dest)
        return Build(dest, None, result.cpu_s)


def _touch(path: Path) -> bool:
    """Mark a cached program as used now (the eviction goes by mtime); False if there is none."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


async def _serialize(wasm: bytes, dest: Path, limits: jail.JailLimits) -> None:
    """Compile the jail's wasm (untrusted output: wasmtime validates it) for the runtime's engine
    into `dest`, atomically. A module up to IN_PROCESS_BYTES is compiled in a thread here (a few
    milliseconds; a child process would cost half a second of Python and wasmtime start-up);
    a larger one in a child process under the compile limits, whose memory is not the gateway's."""
    fd, out = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        if len(wasm) <= IN_PROCESS_BYTES:
            try:
                await asyncio.to_thread(_compile_into, wasm, out)
            except Exception as exc:  # wasmtime's refusal of an invalid module, say
                raise RuntimeError(f"wasmtime could not compile the program: {exc}") from None
        else:
            await _compile_in_child(wasm, out, limits)
        os.replace(out, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)


def _compile_into(wasm: bytes, out: str) -> None:
    """`wasm` compiled and serialized into the file `out` (0600), by an engine with the launchers'
    flags (so their `deserialize_file` accepts it). A fresh engine each time (~16 ms): one kept
    for the process's life would be torn down after wasmtime's own module at exit."""
    import wasmtime

    data = wasmtime.Module(artifacts.new_engine(), wasm).serialize()
    fd = os.open(out, os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


async def _compile_in_child(wasm: bytes, out: str, limits: jail.JailLimits) -> None:
    fd, source = tempfile.mkstemp(prefix=".program.", suffix=".wasm", dir=Path(out).parent)
    with os.fdopen(fd, "wb") as f:
        f.write(wasm)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "plugins.wasm.cprograms", "--serialize", source, out, str(limits.memory_bytes),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env=artifacts.child_env(), start_new_session=True)
        try:
            async with asyncio.timeout(limits.wall_s):
                assert proc.stderr is not None
                err, _ = await jail.read_bounded(proc.stderr, 1 << 14)
                code = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 9)
            await proc.wait()
            raise
        finally:
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
        if code != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"wasmtime could not compile the program: {lines[-1] if lines else f'exit {code}'}")
    finally:
        os.unlink(source)


def _serialize_main(source: str, out: str, memory_bytes: int) -> None:
    """The child's work: a wasm file compiled for the runtime's engine into `out`."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    with open(source, "rb") as f:
        _compile_into(f.read(), out)


def _evict(folder: Path, budget: int, keep: Path) -> None:
    """Remove the least recently used programs until the folder holds at most `budget` bytes."""
    entries = []
    for entry in os.scandir(folder):
        if entry.name.endswith(".cwasm") and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                entries.append((st.st_mtime, st.st_size, Path(entry.path)))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= budget:
            break
        if path != keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 4 and args[0] == "--serialize":
        _serialize_main(args[1], args[2], int(args[3]))
        return 0
    if args:
        print("usage: python -m plugins.wasm.cprograms   (builds zig's C/C++ library cache)", file=sys.stderr)
        return 2
    from plugins.common import TerminalProgress

    print(warm(TerminalProgress()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
