"""The WASM runtime: one launcher process per sandbox, CPython-for-WASI running the guest agent.

The launcher (`plugins.wasm.launcher`) owns wasmtime; this module owns processes and directories:
spawning launchers, a warm pool of launchers whose agent already answered, the per-sandbox /work
(a tmpfs of disk_mb held by plugins.wasm.disk), one-shot runs of the languages the runtime runs
itself (JavaScript with QuickJS, Ruby and PHP: plugins.wasm.interpreters, C and C++ programs built by
plugins.wasm.cprograms), and cleaning all of it up.

Every process of a sandbox counts against its limits: its launchers draw on one CPU budget (each
new launcher gets what is left; a finished one is charged from its exit report or, when killed,
from /proc just before), a one-shot run gets the memory the agent's launcher leaves of memory_mb,
and one one-shot run at a time. Launchers get an explicit minimal environment, report on a pipe of
their own (fd --status-fd, never the guest's stderr), and die with the gateway.

Network: the guest has no sockets; its agent's launcher gets the sandbox's handoff socket, and
every `sandgate.fetch` (or urllib request) the guest makes arrives on it as a connection the
gateway's policy proxy serves under the sandbox's network (plugins/wasm/fetch.py). Every sandbox
has the socket, pooled ones included: the network is attached when a create takes the sandbox,
and one without a network has every request refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from gateway.egress import proxy
from gateway.egress.handoff import HandoffListener
from gateway.egress.network import SandboxNetwork
from gateway.egress.upstream import Refused
from gateway.runtime.agent_client import call_once
from gateway.runtime.base import Backend, ByteChannel, CachedImage, Progress, Runtime, SandboxSpec, StreamChannel
from gateway.runtime.pool import WarmPool
from gateway.storage.volumes import VolumeMount
from guest_agent.wire import CHUNK_SIZE, ProtocolError
from plugins.common import CACHE_ENV, TerminalProgress, cache_root, gateway_work_root, remove_orphans
from plugins.wasm import artifacts, cprograms, interpreters, jail, runno
from plugins.wasm.agent_dir import stage_agent_dir
from plugins.wasm.disk import WORK_ROOT_ENV, DiskHolder, VolumeImage
from plugins.wasm.fetch import FETCH_KIND
from plugins.wasm.settings import WasmSettings

log = logging.getLogger(__name__)

#: How much of a launcher's stderr the gateway keeps (the guest could write without end).
STDERR_TAIL = 16 * 1024
READY_TIMEOUT_S = 30.0
#: A sandbox with less CPU budget left than this starts no launcher (it would only trap at once).
MIN_CPU_S = 0.01
#: The least linear memory a JavaScript run gets (QuickJS's initial memory and a little heap),
#: even when the agent's launcher already holds most of memory_mb.
JS_MIN_MEMORY_MB = 16
#: The least memory_mb a WASM sandbox may ask for (Runtime.min_memory_mb): CPython-for-WASI's
#: initial linear memory is 640 pages (40 MiB). Measured: 39 cannot instantiate, 40 boots the
#: agent and runs an exec (and a JavaScript run, which gets JS_MIN_MEMORY_MB).
MIN_MEMORY_MB = 40
#: What a fetch from a sandbox without a network is told (the policy "none" says the same).
NO_NETWORK = "the sandbox has no network"


class Launcher:
    """One launcher process: its bounded stderr tail (the guest's), its exit report (on a pipe of
    its own, which the guest cannot write), and the CPU it used."""

    def __init__(self, proc: asyncio.subprocess.Process, status_fd: int) -> None:
        self.proc = proc
        self.tail = bytearray()
        self._status_fd = status_fd
        self._status: dict[str, Any] | None = None
        #: The most CPU seen used by the process (from /proc, while it ran).
        self._cpu_seen = 0.0
        self._charged = False
        assert proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._drain(proc.stderr))

    @classmethod
    async def spawn(cls, args: list[str], env: Mapping[str, str], pass_fds: tuple[int, ...] = ()) -> Launcher:
        """Start `python -m plugins.wasm.launcher args`, with only `env` for environment (and
        `pass_fds` inherited). Must run on the event loop's thread (see DiskHolder.start: the
        parent-death signal)."""
        status_r, status_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "plugins.wasm.launcher", "--status-fd", str(status_w),
                "--parent-pid", str(os.getpid()), *args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                pass_fds=(status_w, *pass_fds), env=dict(env),
                start_new_session=True,  # a terminal's ^C reaches the gateway, which then cleans up
            )
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        os.set_blocking(status_r, False)
        return cls(proc, status_r)

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            self.tail += chunk
            del self.tail[:-STDERR_TAIL]

    def channel(self) -> StreamChannel:
        assert self.proc.stdout is not None and self.proc.stdin is not None
        return StreamChannel(self.proc.stdout, self.proc.stdin)

    async def exited(self) -> int:
        """Wait for the exit and for the rest of stderr (bounded: nothing else should hold it)."""
        code = await self.proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._stderr_task), 2)
        return code

    def status(self) -> dict[str, Any]:
        """The launcher's exit report ({} if it wrote none: killed). Read once, after the exit:
        the launcher writes one short line (atomic on a pipe) just before it exits."""
        if self._status is None and self._status_fd >= 0:
            data = b""
            with contextlib.suppress(BlockingIOError, OSError):
                while chunk := os.read(self._status_fd, 4096):
                    data += chunk
            os.close(self._status_fd)
            self._status_fd = -1
            try:
                report = json.loads(data.splitlines()[-1]) if data.strip() else {}
            except ValueError:
                report = {}
            self._status = report if isinstance(report, dict) else {}
        return self._status or {}

    async def reason(self) -> str:
        """Why the launcher exited, from its exit code and its exit report."""
        code = await self.exited()
        info = self.status()
        if info.get("reason"):
            return f"{info.get('reason')}: {info.get('message')}"
        return f"the WASM launcher exited with code {code}"

    def sample_cpu(self) -> float:
        """The CPU seconds the process used so far (the most seen: /proc goes with the process)."""
        if self.proc.returncode is None:
            self._cpu_seen = max(self._cpu_seen, process_metrics(self.proc.pid).get("cpu_s", 0.0))
        return self._cpu_seen

    def uncharged_cpu(self) -> float:
        """The CPU this launcher used that no budget has been charged with yet."""
        return 0.0 if self._charged else self.sample_cpu()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.sample_cpu()  # the last look at its CPU before it goes
            # os.kill, not Process.kill: the latter polls first and can reap the child behind
            # asyncio's back ("Unknown child process", a wrong exit code).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        # Nobody reads the agent's stdout once its channel is closed, so its pipe transport may be
        # paused with output buffered, and then never sees end-of-file; asyncio's Process.wait()
        # (Python < 3.12) waits for every pipe to close, so the wait would hang forever (a destroy
        # or an agent restart during a flood). Close that pipe: its data has no reader anyway.
        # Only this pipe: closing the whole transport could reap the child behind asyncio's back.
        transport = getattr(self.proc, "_transport", None)
        stdout_pipe = transport.get_pipe_transport(1) if transport is not None else None
        if stdout_pipe is not None:
            stdout_pipe.close()
        await self.exited()
        self._stderr_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_task
        self.status()
        close_pipes(self.proc)

    async def finish(self) -> float:
        """Kill (if still running) and return the CPU seconds it used, once: later calls return 0,
        so a sandbox's budget is charged exactly once per launcher. The figure is the larger of
        what /proc last showed and what the launcher reported as it exited by itself."""
        await self.kill()
        if self._charged:
            return 0.0
        self._charged = True
        reported = self.status().get("cpu_s")
        return max(self._cpu_seen, float(reported) if isinstance(reported, int | float) else 0.0)

    async def wait_ready(self) -> None:
        """Ping the agent once so a pooled launcher is known to answer at once."""
        await call_once(self.channel(), "ping", READY_TIMEOUT_S, death_reason=self.reason)


def close_pipes(proc: asyncio.subprocess.Process) -> None:
    """Close a finished subprocess's pipes now. asyncio's Process has no public close, and pipes
    nobody reads to EOF would otherwise stay open until garbage collection (ResourceWarning)."""
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


def launcher_env(work_root: Path) -> dict[str, str]:
    """A launcher's whole environment, explicit: what Python needs to import the launcher and find
    the compiled modules, and the orphan marker. Nothing of the gateway's (its API keys)."""
    env = artifacts.child_env()
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": env["PYTHONPATH"],
        CACHE_ENV: str(cache_root()),
        WORK_ROOT_ENV: str(work_root),
    }


def _private_file(folder: Path, suffix: str, text: str) -> str:
    """`text` in a new 0600 file in the runtime's private folder (the caller removes it)."""
    with tempfile.NamedTemporaryFile("w", suffix=suffix, dir=folder, delete=False, encoding="utf-8") as f:
        f.write(text)
    return f.name


def _check_text(what: str, text: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate cannot be encoded for the guest)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError("bad_request", f"{what} is not valid Unicode: a lone surrogate at index "
                                           f"{exc.start}") from None


#: How the one-shot languages are named in messages.
ONESHOT_NAMES = {"javascript": "JavaScript", "ruby": "Ruby", "php": "PHP", "c": "C", "cpp": "C++"}


def volumes_folder(work: Path) -> Path:
    """Where a sandbox's volume mount points are (beside its work folder: the tmpfs would hide them)."""
    return work.with_name(work.name + "-volumes")


class WasmBackend(Backend):
    """One WASM sandbox: its disk holder (the /work tmpfs), the agent's launcher, at most one
    one-shot launcher (JavaScript, Ruby, PHP) at a time, and the CPU budget they all draw from."""

    def __init__(self, runtime: WasmRuntime, work: Path, holder: DiskHolder, memory_mb: int, cpu_seconds: float,
                 disk_mb: int, volumes: tuple[tuple[VolumeImage, str], ...] = ()) -> None:
        self.runtime = runtime
        self.work = work
        self.holder = holder
        #: The volumes the holder mounted, each with its path in the guest.
        self.volumes = volumes
        self.host_root = holder.path
        self.memory_mb = memory_mb
        self.cpu_seconds = cpu_seconds
        self.disk_mb = disk_mb
        #: CPU seconds used by this sandbox's launchers that have ended.
        self.cpu_used = 0.0
        self.launcher: Launcher | None = None
        self.oneshot_launcher: Launcher | None = None
        self._oneshot_running = False
        #: Set by stop_oneshot: stops a C/C++ exec still compiling.
        self._stop_compile = asyncio.Event()
        self._destroyed = False
        self._channel: ByteChannel | None = None
        #: The sandbox's network, attached when a create takes the sandbox (`attach`).
        self.network: SandboxNetwork | None = None
        #: The gateway's end of the handoff socket the agent's launchers fetch through, and theirs.
        self._handoff: HandoffListener | None = None
        self._handoff_end: socket.socket | None = None

    def attach(self, spec: SandboxSpec) -> None:
        """Make this backend `spec`'s sandbox: its fetches are served under its network from now."""
        self.network = spec.egress
        if self._handoff is not None:
            self._handoff.label = spec.sandbox_id

    def _network(self, _request: object) -> SandboxNetwork:
        if self.network is None:
            raise Refused(403, NO_NETWORK)
        return self.network

    def handoff_fd(self) -> int:
        """The launchers' end of the handoff socket (made, and served, on first use)."""
        if self._handoff_end is None:
            listener, end = HandoffListener.pair(
                "wasm", {FETCH_KIND: lambda reader, writer: proxy.handle(reader, writer, self._network)})
            listener.start()
            self._handoff, self._handoff_end = listener, end
        return self._handoff_end.fileno()

    def cpu_remaining(self) -> float:
        """The budget a new launcher gets; `guest_died` (cpu_limit) when none is left."""
        running = sum(launcher.uncharged_cpu() for launcher in (self.launcher, self.oneshot_launcher) if launcher)
        left = self.cpu_seconds - self.cpu_used - running
        if left < MIN_CPU_S:
            raise ProtocolError("guest_died", f"cpu_limit: the sandbox used up its CPU budget "
                                              f"({self.cpu_seconds:g} s)")
        return left

    def launcher_args(self, mode: str, memory_bytes: int, cpu_seconds: float) -> list[str]:
        """The options every launcher of this sandbox gets (its folders and limits)."""
        preopens = [f"--preopen={self.holder.reach(v.folder)}:{guest}{':ro' if v.readonly else ''}"
                    for v, guest in self.volumes]
        return ["--mode", mode, "--work", str(self.holder.path), "--agent-dir", str(self.runtime.agent_dir),
                *preopens, "--memory-bytes", str(memory_bytes), "--cpu-seconds", f"{cpu_seconds:.3f}"]

    async def boot(self) -> None:
        """Start a launcher and wait until its agent answers. At most one boot per core runs at a
        time: in a burst, booting everything at once makes every create finish last (bench/: 100
        concurrent cold creates, p50 11 s -> ~5 s)."""
        async with self.runtime.boot_slots:
            args = self.launcher_args("python", self.memory_mb << 20, self.cpu_remaining())
            fs_roots = [arg for _, guest in self.volumes for arg in ("--fs-root", guest)]
            handoff = self.handoff_fd()
            fetch = ["--handoff-fd", str(handoff),
                     "--fetch-max-bytes", str(self.runtime.settings.fetch_max_response_mb << 20)]
            self.launcher = await Launcher.spawn([*args, *fetch, "--", "python", "-m", "guest_agent", "--root",
                                                  "/work", *fs_roots], self.runtime.launcher_env, (handoff,))
            self._channel = self.launcher.channel()
            await self.launcher.wait_ready()

    def channel(self) -> ByteChannel:
        assert self._channel is not None
        return self._channel

    async def wait_exited(self) -> str:
        assert self.launcher is not None
        return await self.launcher.reason()

    async def _retire(self, launcher: Launcher | None) -> None:
        if launcher is not None:
            self.cpu_used += await launcher.finish()

    async def restart_agent(self) -> None:
        await self._retire(self.launcher)
        await self.boot()

    async def destroy(self) -> None:
        await self._retire(self.launcher)
        await self._retire(self.oneshot_launcher)
        if self._handoff is not None:
            await self._handoff.close()  # ends the fetches it serves
            self._handoff = None
        if self._handoff_end is not None:
            self._handoff_end.close()
            self._handoff_end = None
        await self.holder.stop()
        await asyncio.to_thread(shutil.rmtree, self.work, True)
        await asyncio.to_thread(shutil.rmtree, volumes_folder(self.work), True)
        if not self._destroyed:
            self._destroyed = True
            self.runtime.release_disk(self.disk_mb)

    def disk_usage(self) -> tuple[int, int] | None:
        return self.holder.usage()

    async def host_metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.launcher is not None:
            metrics = await asyncio.to_thread(process_metrics, self.launcher.proc.pid)
        usage = self.disk_usage()
        if usage is not None:
            metrics["disk_used_bytes"], metrics["disk_total_bytes"] = usage
        with contextlib.suppress(ProtocolError):
            metrics["cpu_remaining_s"] = round(self.cpu_remaining(), 3)
        metrics.setdefault("cpu_remaining_s", 0.0)
        metrics["holder_pid"] = self.holder.proc.pid
        return metrics

    def oneshot_languages(self) -> frozenset[str]:
        """JavaScript; Ruby and PHP where the runtime found their modules at start; C and C++ where
        their toolchain works."""
        return frozenset({"javascript", *self.runtime.modules}) | self.runtime.compiled_languages()

    async def stop_oneshot(self) -> None:
        self._stop_compile.set()
        if self.oneshot_launcher is not None and self.oneshot_launcher.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.oneshot_launcher.proc.pid, signal.SIGKILL)  # the run's stream ends as killed

    def run_oneshot(
        self, language: str, code: str, *, stdin: bytes, env: Mapping[str, str], timeout: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        """One launcher per run (QuickJS, a fresh Ruby or PHP instance, a C/C++ program), sharing the sandbox's
        /work and limits: one run at a time (`busy` otherwise), its CPU from the sandbox's
        remaining budget, and its memory what the agent's launcher leaves of memory_mb (its private
        memory, from /proc), at least the language's floor. Everything is checked here, before the
        exec starts."""
        if language not in self.oneshot_languages():
            raise ProtocolError("unsupported", f"the WASM runtime does not run {language} itself")
        name = ONESHOT_NAMES[language]
        _check_text(f"the {name} source", code)
        for key, value in env.items():
            _check_text("an env name", key)
            _check_text(f"env {key!r}", value)
        if self._oneshot_running:
            raise ProtocolError("busy", "the sandbox runs one JavaScript, Ruby, PHP, C or C++ exec at a time; "
                                        "wait for the running one")
        cpu = self.cpu_remaining()
        memory = self._oneshot_memory(language)
        self._oneshot_running = True
        self._stop_compile.clear()
        return self._oneshot(language, code, stdin, env, timeout, memory, cpu)

    def _oneshot_memory(self, language: str) -> int:
        """What the agent's launcher leaves of memory_mb, at least the language's floor. Ruby's
        floor (128 MiB: below it Ruby cannot start) is never more than memory_mb itself;
        JavaScript's small floor is kept as it was, even past memory_mb."""
        agent_bytes = 0
        if self.launcher is not None:
            agent_bytes = process_metrics(self.launcher.proc.pid).get("private_bytes", 0)
        left = (self.memory_mb << 20) - agent_bytes
        if language not in interpreters.LANGUAGES:
            return max(JS_MIN_MEMORY_MB << 20, left)
        return max(min(interpreters.MIN_MEMORY_MB[language], self.memory_mb) << 20, left)

    def _oneshot_args(self, language: str, code: str, stdin: bytes, memory: int, cpu: float,
                      made: list[str]) -> list[str]:
        """The launcher's arguments for one run, writing its files (in the runtime's private
        folder, named in `made` for the caller to remove)."""
        args = self.launcher_args(language, memory, cpu)
        if language == "javascript":
            made.append(_private_file(self.runtime.private_dir, ".js", code))
            return [*args, "--code-file", made[-1]]
        folder = tempfile.mkdtemp(prefix=f"{language}-", dir=self.runtime.private_dir)
        made.append(folder)
        interpreters.prepare(language, Path(folder), code, stdin)
        return [*args, "--module", str(self.runtime.modules[language]), "--code-dir", folder]

    async def _oneshot(self, language: str, code: str, stdin: bytes, env: Mapping[str, str],
                       timeout: float | None, memory: int, cpu: float) -> AsyncIterator[dict[str, Any]]:
        started = time.monotonic()
        files: list[str] = []
        try:
            if language in cprograms.LANGUAGES:
                yield {"ev": "start", "pid": None}  # the compile is part of the exec
                build = await self._build_program(language, code, cpu)
                if build.module is None:
                    for event in compile_failed(build, started):
                        yield event
                    return
                args = [*self.launcher_args("program", memory, self.cpu_remaining()), "--module", str(build.module)]
            else:
                args = self._oneshot_args(language, code, stdin, memory, cpu, files)
            if env:
                files.append(_private_file(self.runtime.private_dir, ".env.json", json.dumps(dict(env))))
                args += ["--env-file", files[-1]]
            launcher = self.oneshot_launcher = await Launcher.spawn(args, self.runtime.launcher_env)
            assert launcher.proc.stdin is not None and launcher.proc.stdout is not None
            if language not in cprograms.LANGUAGES:
                yield {"ev": "start", "pid": None}
            error = None
            try:
                async with asyncio.timeout(timeout):
                    if language != "php":  # PHP reads its stdin from the run's folder
                        launcher.proc.stdin.write(stdin)
                    launcher.proc.stdin.close()
                    while chunk := await launcher.proc.stdout.read(CHUNK_SIZE):
                        yield {"ev": "data", "fd": "stdout", "data": chunk}
                    code_: int | None = await launcher.exited()
            except TimeoutError:
                code_ = None
                error = ProtocolError("timeout", f"the {language} exec ran past its {timeout:g} s timeout").to_wire()
            await launcher.kill()  # after a timeout; a no-op wait otherwise
            _remove(files)  # before the end goes out: nothing of the run is left once it has ended
            err = bytes(launcher.tail)
            if err:
                yield {"ev": "data", "fd": "stderr", "data": err}
            killed_by = signal.Signals(-code_).name if code_ is not None and code_ < 0 else None
            end: dict[str, Any] = {"ev": "end", "exit_code": None if killed_by else code_, "signal": killed_by,
                                   "duration_ms": round((time.monotonic() - started) * 1000, 3)}
            if error is not None:
                end["error"] = error
            elif killed_by is None and launcher.status().get("reason"):  # the launcher's own end: a trap, a limit
                end["error"] = ProtocolError("guest_died", await launcher.reason()).to_wire()
            yield end
        finally:
            self._oneshot_running = False
            if self.oneshot_launcher is not None:
                await self._retire(self.oneshot_launcher)
                self.oneshot_launcher = None
            _remove(files)

    async def _build_program(self, language: str, code: str, cpu: float) -> cprograms.Build:
        """The compiled program (cached or compiled now), the sandbox charged with the compile's
        CPU; a stop (exec.signal) while it compiles ends the exec as killed."""
        programs = self.runtime.programs
        assert programs is not None
        building = asyncio.ensure_future(programs.build(language, code, cpu))
        stopping = asyncio.ensure_future(self._stop_compile.wait())
        try:
            await asyncio.wait((building, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not building.done():
                building.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await building
        if building.cancelled():
            return cprograms.Build(None, jail.JailResult(None, "SIGKILL", "killed", "stopped while compiling",
                                                         b"", b"", 0.0))
        build = building.result()
        self.cpu_used += build.cpu_s
        return build


def compile_failed(build: cprograms.Build, started: float) -> list[dict[str, Any]]:
    """A C/C++ exec whose compile failed: the compiler's diagnostics on stderr, a line saying which
    limit stopped it (if one did), and a non-zero exit; nothing ran. A stop ends it as killed."""
    failure = build.failure
    assert failure is not None
    events: list[dict[str, Any]] = []
    stderr = failure.stderr
    if failure.reason not in (None, "killed"):
        if stderr and not stderr.endswith(b"\n"):
            stderr += b"\n"
        stderr += f"sandgate: the compile was stopped: {failure.message}\n".encode()
    for at in range(0, len(stderr), CHUNK_SIZE):
        events.append({"ev": "data", "fd": "stderr", "data": stderr[at:at + CHUNK_SIZE]})
    end: dict[str, Any] = {"ev": "end", "exit_code": failure.exit_code or 1, "signal": None,
                           "duration_ms": round((time.monotonic() - started) * 1000, 3)}
    if failure.reason == "killed":
        end.update(exit_code=None, signal="SIGKILL")
    elif failure.reason == "jail":
        end["error"] = ProtocolError("unavailable", f"the C/C++ compiler's jail failed: {failure.message}").to_wire()
    events.append(end)
    return events


def _remove(files: list[str]) -> None:
    """Remove a run's files and folders."""
    for name in files:
        if os.path.isdir(name):
            shutil.rmtree(name, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(name)
    files.clear()


def process_metrics(pid: int) -> dict[str, Any]:
    """RSS, private memory and CPU of one host process, from /proc."""
    metrics: dict[str, Any] = {"pid": pid}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        kb = {k.strip(): int(v.split()[0]) for k, v in fields.items() if v.strip().endswith("kB")}
        metrics["rss_bytes"] = kb.get("Rss", 0) * 1024
        metrics["private_bytes"] = (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) * 1024
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        metrics["cpu_s"] = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass  # the process is gone; report what we have
    return metrics


class WasmRuntime(Runtime):
    """Settings: `[runtimes.wasm]`, plugins.wasm.settings.WasmSettings."""

    id = "wasm"
    description = ("CPython 3.15, QuickJS, Ruby 3.2 and PHP 8.2 on wasmtime; in-process Python, one-shot "
                   "JavaScript, Ruby and PHP")
    #: `network`: outbound HTTP through `sandgate.fetch` and urllib (no sockets, no ports).
    capabilities = frozenset({"network"})
    min_memory_mb = MIN_MEMORY_MB
    #: Volumes are ext4 images the sandbox's disk holder loop-mounts and the launcher preopens.
    volume_store = "local"
    guest_speaks_tls = False  # `sandgate.fetch`: the proxy makes the TLS connection

    def languages(self) -> dict[str, list[str]]:
        return {"default": sorted({"python", "javascript", *self.modules, *self.compiled_languages()})}

    def compiled_languages(self) -> frozenset[str]:
        """C and C++ once their toolchain proved itself at start (`start`), else nothing."""
        return cprograms.LANGUAGES if self.programs is not None else frozenset()

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.settings = WasmSettings.from_config(config)
        self.default_memory_mb = self.settings.memory_mb
        self.default_cpu_seconds = self.settings.cpu_seconds
        self.default_disk_mb = self.settings.disk_mb
        #: The sum of disk_mb over live sandboxes (warm pool included): tmpfs is memory.
        self.disk_committed_mb = 0
        self._disk_freed = asyncio.Event()
        self.pool: WarmPool[WasmBackend] = WarmPool(
            self.id,
            self.settings.pool_size,
            self.settings.pool_refill_per_s,
            make=self._make_pooled,
            alive=lambda backend: backend.launcher is not None and backend.launcher.proc.returncode is None,
            discard=lambda backend: backend.destroy(),
        )
        self.work_root = gateway_work_root(self.id)
        self.private_dir = self.work_root / ".private"
        self.launcher_env = launcher_env(self.work_root)
        self.agent_dir = Path()
        self.boot_slots = asyncio.Semaphore(os.cpu_count() or 1)
        #: Ruby and PHP: the compiled module of each that `start` found, and why the others are not.
        self.modules: dict[str, Path] = {}
        #: The C/C++ builder; None when zig or its jail cannot work here (then c and cpp are not offered).
        self.programs: cprograms.CPrograms | None = None

    @classmethod
    def build_images(cls, config: Mapping[str, Any], template: str | None, progress: Progress) -> list[str]:
        """Compile the Python and JavaScript modules, fetch Ruby's and PHP's with npm (unless the
        cache has them) and compile them. A host where npm cannot fetch them (no npm, no registry)
        still builds the rest and says why; a package that is not the pinned one fails the build."""
        if template is not None:
            raise ValueError("the wasm runtime has no templates")
        lines = [f"{kind}: {artifacts.ensure_compiled(kind, progress)}" for kind in artifacts.KINDS]
        where = runno.folder(WasmSettings.from_config(config).runno_dir)
        try:
            fetched = runno.fetch(where, progress)
        except artifacts.ArtifactsMissing as exc:
            lines.append(f"ruby, php: not installed: {exc}")
        else:
            for kind, wasm in zip(artifacts.FETCHED_KINDS, fetched, strict=True):
                lines.append(f"{kind}: {artifacts.ensure_compiled(kind, progress, wasm)}")
        try:
            lines.append(f"c/c++ libraries: {cprograms.warm(progress)}")
        except cprograms.ToolchainMissing as exc:  # the runtime serves without C and C++ then
            lines.append(f"c/c++: not offered here: {exc}")
        return [*lines, f"agent: {stage_agent_dir()}"]

    @classmethod
    def cached_images(cls, config: Mapping[str, Any]) -> list[CachedImage]:
        from plugins.wasm import cached

        return cached.cached_images(WasmSettings.from_config(config))

    @classmethod
    def prune_images(cls, config: Mapping[str, Any]) -> tuple[list[CachedImage], int]:
        from plugins.wasm import cached

        return cached.prune(WasmSettings.from_config(config))

    async def start(self) -> None:
        for kind in ("python", "javascript"):
            if not artifacts.compiled_module_path(kind).exists():
                log.warning("compiling the WASM %s module once (1-3 minutes; `sandgate images build wasm` "
                            "does this ahead of time)", kind)
            await asyncio.to_thread(artifacts.ensure_compiled, kind, TerminalProgress())
        await asyncio.to_thread(self._find_interpreters)
        self.agent_dir = await asyncio.to_thread(stage_agent_dir)
        await asyncio.to_thread(remove_orphans, self.work_root, WORK_ROOT_ENV)
        self.private_dir.mkdir(parents=True, mode=0o700)
        await self._probe_disk_holder()
        await self._start_programs()
        self.pool.start()

    def _find_interpreters(self) -> None:
        """Ruby's and PHP's modules, checked and compiled (once per machine) if `sandgate images
        build wasm` fetched them; a language without one is left out of every sandbox's
        capabilities, and its reason is in `unavailable_languages` (GET /v1/runtimes, `unsupported`)
        and the log."""
        where = runno.folder(self.settings.runno_dir)
        for language in artifacts.FETCHED_KINDS:
            try:
                wasm = runno.verified(language, where)
                if not artifacts.compiled_module_path(language, wasm).exists():
                    log.warning("compiling the WASM %s module once (under a minute)", language)
                self.modules[language] = artifacts.ensure_compiled(language, TerminalProgress(), wasm)
            except (artifacts.ArtifactsMissing, artifacts.CompileError) as exc:
                self.unavailable_languages[language] = str(exc)
                log.warning("the WASM runtime runs no %s: %s", language, exc)

    async def _start_programs(self) -> None:
        """Offer C and C++ if zig is installed and its jail works here; if not, say why and go on
        without them (a request for c or cpp then answers `unsupported`)."""
        settings = self.settings
        if not cprograms.zig_cache_dir_ready():
            log.warning("building zig's C/C++ libraries once (a few minutes; `sandgate images build wasm` "
                        "does this ahead of time)")
        limits = jail.JailLimits(wall_s=settings.compile_timeout_s, cpu_s=settings.compile_cpu_s,
                                 memory_bytes=settings.compile_memory_mb << 20,
                                 disk_bytes=settings.compile_disk_mb << 20)
        try:
            self.programs = await cprograms.CPrograms.start(
                limits, settings.compile_concurrency or os.cpu_count() or 1, settings.compiled_cache_mb << 20,
                self.work_root, TerminalProgress())
        except cprograms.ToolchainMissing as exc:
            log.warning("the WASM runtime runs no C or C++ here: %s", exc)
            for language in cprograms.LANGUAGES:
                self.unavailable_languages[language] = str(exc)

    async def _probe_disk_holder(self) -> None:
        """Mount one tmpfs now, so a host without mount (or user) namespaces turns the runtime off
        at start with the reason, instead of failing every create: disk_mb is never unenforced."""
        probe = self.work_root / ".probe"
        probe.mkdir(mode=0o700)
        try:
            holder = await DiskHolder.start(probe, 1, self.work_root)
            await holder.stop()
        except ProtocolError as exc:
            raise RuntimeError(f"the WASM runtime enforces disk_mb with a tmpfs per sandbox and cannot here: "
                               f"{exc.message}") from None
        finally:
            probe.rmdir()

    async def stop(self) -> None:
        await self.pool.stop()
        await asyncio.to_thread(shutil.rmtree, self.work_root, True)

    def release_disk(self, disk_mb: int) -> None:
        self.disk_committed_mb -= disk_mb
        self._disk_freed.set()

    async def new_backend(self, memory_mb: int, cpu_seconds: float, disk_mb: int,
                          mounts: tuple[VolumeMount, ...] = ()) -> WasmBackend:
        """A sandbox's folder and disk holder with its volumes mounted (no launcher yet);
        `unavailable` when its disk_mb would take the gateway past max_total_disk_mb."""
        limit = self.settings.max_total_disk_mb
        if self.disk_committed_mb + disk_mb > limit:
            raise ProtocolError("unavailable", f"the WASM runtime's disk capacity is used up: live sandboxes hold "
                                               f"{self.disk_committed_mb} of {limit} MB (max_total_disk_mb) and "
                                               f"this one asks {disk_mb} MB")
        self.disk_committed_mb += disk_mb
        work = self.work_root / secrets.token_hex(8)
        volumes = tuple((VolumeImage(m.source, volumes_folder(work) / str(i), m.readonly), m.path)
                        for i, m in enumerate(mounts))
        try:
            work.mkdir(parents=True, mode=0o700)
            for volume, _ in volumes:
                volume.folder.mkdir(parents=True, mode=0o700)
            holder = await DiskHolder.start(work, disk_mb, self.work_root, tuple(v for v, _ in volumes))
        except BaseException:
            self.release_disk(disk_mb)
            await asyncio.to_thread(shutil.rmtree, work, True)
            await asyncio.to_thread(shutil.rmtree, volumes_folder(work), True)
            raise
        return WasmBackend(self, work, holder, memory_mb, cpu_seconds, disk_mb, volumes)

    async def _make_pooled(self) -> WasmBackend:
        # A full gateway is no failure of the pool's: its refill waits for a destroy to free room.
        while self.disk_committed_mb + self.default_disk_mb > self.settings.max_total_disk_mb:
            self._disk_freed.clear()
            await self._disk_freed.wait()
        backend = await self.new_backend(self.default_memory_mb, self.default_cpu_seconds, self.default_disk_mb)
        try:
            await backend.boot()
        except BaseException:  # failed, or the pool is stopping mid-boot: leave nothing behind
            await asyncio.shield(backend.destroy())
            raise
        return backend

    def check_create(self, template: str | None, network: bool) -> None:
        if template is not None:
            raise ProtocolError("unsupported", "the WASM runtime has no templates")

    async def create(self, spec: SandboxSpec) -> Backend:
        wanted = (spec.memory_mb, spec.cpu_seconds, spec.disk_mb)
        # A warm sandbox has its preopens already: one with volumes is made cold.
        if wanted == (self.default_memory_mb, self.default_cpu_seconds, self.default_disk_mb) and not spec.volumes:
            warm = self.pool.take()
            if warm is not None:
                warm.attach(spec)
                return warm
        backend = await self.new_backend(*wanted, spec.volumes)
        backend.attach(spec)
        try:
            await backend.boot()
        except BaseException:
            await backend.destroy()
            raise
        return backend
