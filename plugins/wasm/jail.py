"""A jail for the native C/C++ compiler: untrusted source goes in, a wasm module (or the
compiler's diagnostics) comes out, and the compiler sees nothing of the host.

The compiler is attack surface: `#include "/etc/passwd"` would read a host file at compile time,
and a crafted source could make it run for ever, eat all memory or write without end. So it runs:

- in fresh user, mount, network, PID, IPC and UTS namespaces (`unshare`, util-linux, which the
  WASM runtime's disk holders already need): no network at all, no other process to see;
- on a root of its own (`pivot_root` onto a tmpfs; the host's tree is detached): the toolchain
  read-only at /zig, the shared compiler cache at /cache as an overlay whose lower layer is never
  written (each compile's writes land in its own tmpfs), a size-limited tmpfs at /tmp holding the
  source and everything the compiler writes, and /proc for this PID namespace only, read-only,
  with nothing but the process folders (`subset=pid`: no /proc/sys); the root itself is read-only;
- without capabilities or a way back to them (bounding set emptied, securebits locked, no_new_privs)
  and with rlimits: address space, CPU per process, open files, processes, no core;
- under a wall-clock limit that kills the whole PID namespace, kept by stage 2 (PID 1 inside)
  and, as a backstop, by the gateway (`run`).

Stage 1 is `unshare ... python -m plugins.wasm.jail --status-fd N`; stage 2 (`main`, PID 1 in the
namespaces) reads a JSON spec line and the source from stdin, builds the root, drops everything,
runs the compiler, and writes the output file's bytes to stdout when it exits 0. Its verdict is
one JSON line on the status fd, which the compiler cannot reach (it is closed before the exec):
`{"exit_code", "signal", "reason", "message", "cpu_s"}`; the compiler's stderr (at most
`stderr_bytes` of it, head kept) goes to stderr.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from plugins.linux import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REMOUNT,
    PR_SET_SECUREBITS,
    Syscalls,
)

if TYPE_CHECKING:  # stage 2 starts faster without asyncio
    import asyncio

#: Where things are inside the jail.
TOOLCHAIN = "/zig"
CACHE = "/cache"
TMP = "/tmp"
SRC_DIR = "/tmp/src"
OUT_DIR = "/tmp/out"
#: The gateway's wait may exceed the jail's own wall limit by this before it kills stage 1.
BACKSTOP_GRACE_S = 5.0
#: Why a compile stopped, when not by itself: the verdict's "reason".
REASONS = ("timeout", "cpu", "memory", "output", "crash", "killed", "jail")
#: A failed compile whose processes used this close to the CPU limit was stopped by it (the
#: kernel's user+system figures are sampled, so they can fall a little short of the limit).
CPU_SLACK_S = 0.25


@dataclass(frozen=True)
class JailLimits:
    """What one jailed compile may use (README: `[runtimes.wasm]` compile_* settings)."""

    wall_s: float = 60.0
    #: Per process (RLIMIT_CPU); the wall limit bounds the whole compile anyway.
    cpu_s: float = 60.0
    #: Per process address space (RLIMIT_AS).
    memory_bytes: int = 1 << 30
    #: The tmpfs at /tmp: source, objects, the output and the cache's copy-ups.
    disk_bytes: int = 256 << 20
    #: How much of the compiler's stderr comes back (the head: the first errors matter most).
    stderr_bytes: int = 64 << 10
    #: RLIMIT_NPROC (threads count too) and RLIMIT_NOFILE.
    processes: int = 512
    open_files: int = 512


@dataclass(frozen=True)
class JailSpec:
    """One jailed run: the host folders it sees, what it runs, and its limits."""

    #: The toolchain's folder (read-only at /zig).
    toolchain_dir: str
    #: The shared compiler cache: an overlay's read-only lower layer at /cache, or, when
    #: `cache_writable` (only to build it, from trusted input), bound read-write.
    cache_dir: str
    #: An empty host folder the jail's root tmpfs is mounted over (in the jail's own namespace).
    mount_point: str
    #: argv inside the jail (argv[0] an absolute path under /zig).
    argv: list[str]
    env: dict[str, str]
    #: The source file (stdin's bytes after the spec line) inside the jail, under /tmp/src.
    source_path: str
    #: The file whose bytes go to stdout when the compiler exits 0, under /tmp/out.
    output_path: str
    limits: JailLimits = field(default_factory=JailLimits)
    cache_writable: bool = False
    #: More files under /tmp/src, by path (trusted: written by the gateway, not the request).
    extra_files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JailSpec:
        raw = json.loads(text)
        raw["limits"] = JailLimits(**raw["limits"])
        return cls(**raw)


@dataclass
class JailResult:
    """How a jailed run ended."""

    exit_code: int | None
    signal: str | None
    #: None when the compiler ended by itself; else one of REASONS.
    reason: str | None
    message: str
    stderr: bytes
    #: The output file's bytes on success (exit 0), else b"".
    output: bytes
    cpu_s: float

    @property
    def ok(self) -> bool:
        return self.reason is None and self.exit_code == 0 and bool(self.output)


def stage1_argv(status_fd: int) -> list[str]:
    """The host-side command: namespaces, then stage 2 as PID 1 of the new PID namespace (its
    Python without `site`: stage 2 needs the standard library and this module, on PYTHONPATH).
    `--kill-child`: stage 2 (and so the whole namespace) dies with unshare; `setpriv
    --pdeathsig`: unshare dies with the gateway."""
    return ["setpriv", "--pdeathsig", "KILL",
            "unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", "--net", "--pid",
            "--ipc", "--uts", "--fork", "--kill-child",
            sys.executable, "-S", "-m", "plugins.wasm.jail", "--status-fd", str(status_fd)]


async def run(spec: JailSpec, source: bytes, env: Mapping[str, str]) -> JailResult:
    """Run `spec` with `source` in a new jail and return how it ended. `env` is stage 1's whole
    environment (PYTHONPATH to find this module, the orphan marker). Cancelling kills the jail
    and returns once all of it is gone. Must run on the event loop's thread (the parent-death
    signal follows the forking thread)."""
    import asyncio

    status_r, status_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *stage1_argv(status_w), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=(status_w,), env=dict(env), start_new_session=True)
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    limits = spec.limits
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(limits.wall_s + BACKSTOP_GRACE_S):
            reads = asyncio.gather(read_bounded(proc.stdout, limits.disk_bytes),
                                   read_bounded(proc.stderr, limits.stderr_bytes))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(spec.to_json().encode() + b"\n" + source)
                await proc.stdin.drain()
                proc.stdin.close()
            (output, out_cut), (stderr, _) = await reads
            await proc.wait()
        status = _read_status(status_r)
    except TimeoutError:
        await _kill(proc)
        return JailResult(None, "SIGKILL", "timeout", f"the compile ran past its {limits.wall_s:g} s limit",
                          b"", b"", 0.0)
    except BaseException:
        await _kill(proc)
        raise
    finally:
        os.close(status_r)
        _close(proc)
    try:
        verdict = json.loads(status.splitlines()[-1]) if status.strip() else {}
    except ValueError:
        verdict = {}
    if not isinstance(verdict, dict) or "exit_code" not in verdict:
        code = proc.returncode
        why = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit {code}"
        return JailResult(None, "SIGKILL" if code == -signal.SIGKILL else None, "killed",
                          f"the compiler's jail ended without a verdict ({why})", stderr, b"", 0.0)
    reason = verdict.get("reason")
    if out_cut and reason is None:
        reason, verdict["message"] = "output", f"the output exceeds {limits.disk_bytes} bytes"
    exit_code = verdict.get("exit_code")
    return JailResult(exit_code if isinstance(exit_code, int) else None, verdict.get("signal"), reason,
                      str(verdict.get("message") or ""), stderr, output if exit_code == 0 and not reason else b"",
                      float(verdict.get("cpu_s") or 0.0))


async def read_bounded(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Read `stream` to its end: up to `limit` bytes of `stream`, and whether there was more (drained, not kept)."""
    data = bytearray()
    cut = False
    while chunk := await stream.read(1 << 16):
        room = limit - len(data)
        if len(chunk) > room:
            cut = True
        data += chunk[:max(room, 0)]
    return bytes(data), cut


def _read_status(fd: int) -> bytes:
    """The status pipe's contents, read once stage 1 has exited: stage 2 writes one short line
    (atomic on a pipe) just before it exits."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while (chunk := os.read(fd, 4096)) and len(data) < 1 << 16:
            data += chunk
    return data


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill stage 1 and wait until the whole jail is gone. Stage 2 (the namespace's PID 1) dies
    with stage 1, and a PID namespace's init ends only after every other process in it has: so
    the jail is gone when stage 2 is, which a pidfd tells (it is not our child to wait for)."""
    import asyncio

    pidfds = []
    if proc.returncode is None:
        pidfds = _child_pidfds(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)  # os.kill: Process.kill may reap behind asyncio's back
    await proc.wait()
    loop = asyncio.get_running_loop()
    for fd in pidfds:
        try:
            exited: asyncio.Future[None] = loop.create_future()

            def readable(future: asyncio.Future[None] = exited) -> None:
                if not future.done():
                    future.set_result(None)

            loop.add_reader(fd, readable)
            try:
                async with asyncio.timeout(BACKSTOP_GRACE_S):
                    await exited
            except TimeoutError:
                pass  # never seen: the kernel kills the namespace at once
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)


def _child_pidfds(pid: int) -> list[int]:
    """pidfds of `pid`'s children (stage 2), or none where the kernel cannot tell."""
    fds = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    for child in children:
        with contextlib.suppress(OSError):
            fds.append(os.pidfd_open(int(child)))
    return fds


def _close(proc: asyncio.subprocess.Process) -> None:
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


# ---------------------------------------------------------------------------------------------
# Stage 2: PID 1 inside the namespaces (root in its own user namespace, nothing outside it).

#: noroot, no_setuid_fixup, keep_caps and no_cap_ambient_raise, each set and locked: root in the
#: jail gains nothing from being root, and nothing can change that back.
SECUREBITS_LOCKED_DOWN = 0xFF


class JailError(Exception):
    """The jail could not be built (stage 2): reported with reason "jail"."""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--status-fd":
        print("usage: python -m plugins.wasm.jail --status-fd N (spec line and source on stdin)", file=sys.stderr)
        sys.exit(2)
    status_fd = int(args[1])
    os.set_inheritable(status_fd, False)
    verdict: dict[str, Any]
    try:
        verdict = _stage2(sys.stdin.buffer)
    except JailError as exc:
        verdict = {"exit_code": None, "signal": None, "reason": "jail", "message": str(exc)}
    except Exception as exc:  # reported, never a traceback the gateway has to parse
        verdict = {"exit_code": None, "signal": None, "reason": "jail", "message": f"{type(exc).__name__}: {exc}"}
    times = os.times()
    verdict["cpu_s"] = round(times.user + times.system + times.children_user + times.children_system, 3)
    with contextlib.suppress(OSError):
        os.write(status_fd, (json.dumps(verdict) + "\n").encode())
    os._exit(0)


def _stage2(stdin: BinaryIO) -> dict[str, Any]:
    import resource
    import subprocess
    import threading

    calls = Syscalls(JailError)
    calls.die_with_parent()
    spec_line = stdin.readline()
    if not spec_line.endswith(b"\n"):
        raise JailError("no spec line on stdin")
    spec = JailSpec.from_json(spec_line.decode())
    source = stdin.read()
    limits = spec.limits

    root = spec.mount_point
    calls.mount("sandgate-jail", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=64,mode=0755")
    for folder in ("zig", "cache", "tmp", "proc", ".old"):
        os.mkdir(f"{root}/{folder}", 0o755)
    calls.bind_readonly(spec.toolchain_dir, f"{root}{TOOLCHAIN}")
    inodes = max(1024, limits.disk_bytes // 4096)
    calls.mount("sandgate-tmp", f"{root}{TMP}", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={limits.disk_bytes},nr_inodes={inodes},mode=0700")
    for folder in (SRC_DIR, OUT_DIR, "/tmp/.cache-upper", "/tmp/.cache-work"):
        os.mkdir(f"{root}{folder}", 0o700)
    if spec.cache_writable:
        calls.mount(spec.cache_dir, f"{root}{CACHE}", None, MS_BIND)
    else:
        if any(c in spec.cache_dir for c in ",:\\"):
            raise JailError(f"the cache folder's path cannot be an overlay layer: {spec.cache_dir!r}")
        calls.mount("sandgate-cache", f"{root}{CACHE}", "overlay", MS_NOSUID | MS_NODEV,
               f"lowerdir={spec.cache_dir},upperdir={root}/tmp/.cache-upper,workdir={root}/tmp/.cache-work")
    if not spec.output_path.startswith(OUT_DIR + "/"):
        raise JailError("the output must be under /tmp/out")
    for path, content in [(spec.source_path, source), *((p, t.encode()) for p, t in spec.extra_files.items())]:
        if not path.startswith(SRC_DIR + "/") or "/.." in path:
            raise JailError(f"sources must be under {SRC_DIR}: {path!r}")
        try:
            with open(f"{root}{path}", "wb") as f:
                f.write(content)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            room = limits.disk_bytes >> 20
            return {"exit_code": None, "signal": None, "reason": "output",
                    "message": f"the source does not fit in the compile's {room} MB of scratch space"}
    calls.mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "subset=pid")
    calls.mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)

    calls.pivot_root(root, f"{root}/.old")

    # No RLIMIT_FSIZE: the /tmp tmpfs (the only writable place) bounds every file, and says why
    # (ENOSPC); LLVM turns the SIGXFSZ of a file-size limit into a silent abort.
    for which, value in ((resource.RLIMIT_AS, limits.memory_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
                         (resource.RLIMIT_NPROC, limits.processes),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))
    cpu = max(1, int(limits.cpu_s + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first, SIGKILL a second later
    # No capabilities now or after any exec, and no way to gain one (setuid files, file caps).
    calls.check(calls.libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN, 0, 0, 0), "prctl(SECUREBITS)")
    calls.keep_only_capabilities(())

    stdin_r, stdin_w = os.pipe()  # the compiler's stdin: empty (there is no /dev/null here)
    os.close(stdin_w)
    diag_r, diag_w = os.pipe()  # its stdout and stderr, in one stream as a terminal would show them
    compiler = subprocess.Popen(spec.argv, stdin=stdin_r, stdout=diag_w, stderr=diag_w, env=spec.env,
                                cwd=TMP, close_fds=True)
    os.close(stdin_r)
    os.close(diag_w)
    kept = bytearray()
    stderr_thread = threading.Thread(target=_copy_head, args=(diag_r, kept, limits.stderr_bytes))
    stderr_thread.start()
    deadline = time.monotonic() + limits.wall_s
    reason = message = None
    try:
        code = compiler.wait(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        reason, message = "timeout", f"the compile ran past its {limits.wall_s:g} s limit"
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)  # PID 1: every other process of the namespace (helpers, leftovers)
    code = compiler.wait()
    _reap_all()
    stderr_thread.join(max(0.1, deadline - time.monotonic()))
    os.write(2, bytes(kept))
    sig = signal.Signals(-code).name if code < 0 else None
    if reason is None:
        times = os.times()
        reason, message = _classify(code, bytes(kept), times.children_user + times.children_system, limits)
    if reason is None and code == 0:
        _send_output(spec.output_path)
    return {"exit_code": None if code < 0 or reason == "timeout" else code, "signal": sig or (
        "SIGKILL" if reason == "timeout" else None), "reason": reason, "message": message or ""}


def _classify(code: int, output: bytes, cpu_used: float, limits: JailLimits) -> tuple[str | None, str | None]:
    """Which limit stopped a failed compile, if one did. Signals say little: LLVM turns SIGXCPU
    into an abort of its own, and a failed allocation under the address-space limit can be a
    crash without a word; so the compiler's last words decide first, then the CPU it used."""
    if code == 0:
        return None, None
    mb = limits.memory_bytes >> 20
    lowered = output.lower()
    if code == -signal.SIGXFSZ or any(sign in lowered for sign in (b"no space left on device", b"nospaceleft",
                                                                   b"file too large", b"filetoobig")):
        return "output", f"the compiler filled its {limits.disk_bytes >> 20} MB of scratch space"
    if any(sign in lowered for sign in (b"out of memory", b"outofmemory", b"bad_alloc", b"cannot allocate")):
        return "memory", f"the compiler ran out of memory (its limit is {mb} MB)"
    # A compiler process died of a signal: zig itself, or a clang it ran (then clang's driver
    # says so: "failed due to signal", or the frontend's exit code, 128 + the signal).
    crashed = code < 0 or b"failed due to signal" in lowered \
        or re.search(rb"command failed with exit code 1[2-5][0-9]", lowered) is not None
    if crashed and cpu_used >= limits.cpu_s - max(CPU_SLACK_S, limits.cpu_s * 0.02):
        return "cpu", f"the compiler used up its {limits.cpu_s:g} s of CPU"
    if crashed:
        how = f" ({signal.Signals(-code).name})" if code < 0 else ""
        return "crash", f"the compiler crashed{how}; it may have run out of memory (its limit is {mb} MB)"
    return None, None


def _copy_head(fd: int, kept: bytearray, limit: int) -> None:
    """Keep the first `limit` bytes read from `fd` and drain the rest (the compiler never blocks)."""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 1 << 16):
            kept += chunk[:max(limit - len(kept), 0)]
    os.close(fd)


def _reap_all() -> None:
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-1, 0)


def _send_output(path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            view = memoryview(chunk)
            while view:
                view = view[os.write(1, view):]


if __name__ == "__main__":
    main()
