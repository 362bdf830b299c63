"""The WASM runtime: one launcher process per sandbox, CPython-for-WASI running the guest agent.

The launcher (`plugins.wasm.launcher`) owns wasmtime; this module owns processes and directories:
spawning launchers, a warm pool of launchers whose agent already answered, the per-sandbox host
directory preopened as /work, one-shot JavaScript runs, and cleaning all of it up.
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
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from gateway.runtime.agent_client import call_once
from gateway.runtime.base import Backend, ByteChannel, Progress, Runtime, SandboxSpec, StreamChannel
from gateway.runtime.pool import WarmPool
from guest_agent.wire import CHUNK_SIZE, ProtocolError
from plugins.common import TerminalProgress, gateway_work_root, remove_orphans
from plugins.wasm import artifacts
from plugins.wasm.agent_dir import stage_agent_dir
from plugins.wasm.launcher import EXIT_CODES

log = logging.getLogger(__name__)

#: A take wakes the refill this much later, so the fork does not compete with the create that took
#: the warm launcher (bench/: warm create p50 3.8 -> 2.3 ms).
#: How much of a launcher's stderr the gateway keeps (the guest could write without end).
STDERR_TAIL = 16 * 1024
READY_TIMEOUT_S = 30.0


class Launcher:
    """One launcher process and its bounded stderr tail."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.tail = bytearray()
        assert proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._drain(proc.stderr))

    @classmethod
    async def spawn(cls, args: list[str]) -> Launcher:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "plugins.wasm.launcher", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a terminal's ^C reaches the gateway, which then cleans up
        )
        return cls(proc)

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

    async def reason(self) -> str:
        """Why the launcher exited, from its exit code and its last JSON stderr line."""
        code = await self.exited()
        for line in reversed(self.tail.decode("utf-8", "replace").splitlines()):
            if line.startswith("{") and "sandgate_launcher" in line:
                try:
                    info = json.loads(line)
                    return f"{info.get('reason')}: {info.get('message')}"
                except ValueError:
                    break
        return f"the WASM launcher exited with code {code}"

    async def kill(self) -> None:
        if self.proc.returncode is None:
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
        close_pipes(self.proc)

    async def wait_ready(self) -> None:
        """Ping the agent once so a pooled launcher is known to answer at once."""
        await call_once(self.channel(), "ping", READY_TIMEOUT_S, death_reason=self.reason)


def close_pipes(proc: asyncio.subprocess.Process) -> None:
    """Close a finished subprocess's pipes now. asyncio's Process has no public close, and pipes
    nobody reads to EOF would otherwise stay open until garbage collection (ResourceWarning)."""
    transport = getattr(proc, "_transport", None)
    if transport is not None:
        transport.close()


class WasmBackend(Backend):
    def __init__(self, runtime: WasmRuntime, work: Path, memory_mb: int, cpu_seconds: float) -> None:
        self.runtime = runtime
        self.work = work
        self.host_root = work
        self.memory_mb = memory_mb
        self.cpu_seconds = cpu_seconds
        self.launcher: Launcher | None = None
        self._channel: ByteChannel | None = None

    def launcher_args(self, mode: str = "python") -> list[str]:
        return ["--mode", mode, "--work", str(self.work), "--agent-dir", str(self.runtime.agent_dir),
                "--memory-bytes", str(self.memory_mb << 20), "--cpu-seconds", str(self.cpu_seconds)]

    async def boot(self) -> None:
        """Start a launcher and wait until its agent answers. At most one boot per core runs at a
        time: in a burst, booting everything at once makes every create finish last (bench/: 100
        concurrent cold creates, p50 11 s -> ~5 s)."""
        async with self.runtime.boot_slots:
            self.launcher = await Launcher.spawn([*self.launcher_args(), "--", "python", "-m", "guest_agent",
                                                  "--root", "/work"])
            self._channel = self.launcher.channel()
            await self.launcher.wait_ready()

    def channel(self) -> ByteChannel:
        assert self._channel is not None
        return self._channel

    async def wait_exited(self) -> str:
        assert self.launcher is not None
        return await self.launcher.reason()

    async def restart_agent(self) -> None:
        if self.launcher is not None:
            await self.launcher.kill()
        await self.boot()

    async def destroy(self) -> None:
        if self.launcher is not None:
            await self.launcher.kill()
        await asyncio.to_thread(shutil.rmtree, self.work, True)

    async def host_metrics(self) -> dict[str, Any]:
        if self.launcher is None:
            return {}
        return await asyncio.to_thread(process_metrics, self.launcher.proc.pid)

    def oneshot_languages(self) -> frozenset[str]:
        return frozenset({"javascript"})

    async def run_oneshot(
        self, language: str, code: str, *, stdin: bytes, env: Mapping[str, str], timeout: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        """QuickJS, one launcher per run, sharing the sandbox's /work and limits."""
        if language != "javascript":
            raise ProtocolError("unsupported", f"the WASM runtime does not run {language} itself")
        started = time.monotonic()
        with tempfile.NamedTemporaryFile("w", suffix=".js", dir=self.runtime.private_dir, delete=False) as f:
            f.write(code)
        env_args = [arg for k, v in env.items() for arg in ("--env", f"{k}={v}")]
        launcher = await Launcher.spawn([*self.launcher_args("javascript"), "--code-file", f.name, *env_args])
        try:
            assert launcher.proc.stdin is not None and launcher.proc.stdout is not None
            yield {"ev": "start", "pid": None}
            error = None
            try:
                async with asyncio.timeout(timeout):
                    launcher.proc.stdin.write(stdin)  # the script reads it with std.in
                    launcher.proc.stdin.close()
                    while chunk := await launcher.proc.stdout.read(CHUNK_SIZE):
                        yield {"ev": "data", "fd": "stdout", "data": chunk}
                    code_: int | None = await launcher.exited()
            except TimeoutError:
                code_ = None
                error = ProtocolError("timeout", f"the script ran past its {timeout:g} s timeout").to_wire()
            await launcher.kill()  # after a timeout; a no-op wait otherwise
            err = _without_launcher_line(bytes(launcher.tail))
            if err:
                yield {"ev": "data", "fd": "stderr", "data": err}
            end: dict[str, Any] = {"ev": "end", "exit_code": code_, "signal": None,
                                   "duration_ms": round((time.monotonic() - started) * 1000, 3)}
            if error is not None:
                end["error"] = error
            elif code_ in EXIT_CODES.values():  # the launcher's own codes: QuickJS exits 0 or 1
                end["error"] = ProtocolError("guest_died", await launcher.reason()).to_wire()
            yield end
        finally:
            await launcher.kill()
            with contextlib.suppress(OSError):
                os.unlink(f.name)


def _without_launcher_line(err: bytes) -> bytes:
    lines = err.splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(b'{"sandgate_launcher"')]
    return b"".join(kept).strip(b"\n") + (b"\n" if kept and b"".join(kept).strip() else b"")


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
    """Settings (`[runtimes.wasm]`): pool_size (default 2), pool_refill_per_s (default 4),
    memory_mb and cpu_seconds of pooled sandboxes (defaults 256 and 600)."""

    id = "wasm"
    description = "CPython 3.15 and QuickJS on wasmtime; in-process Python, one-shot JavaScript"
    capabilities = frozenset()

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.default_memory_mb = int(config.get("memory_mb", 256))
        self.default_cpu_seconds = float(config.get("cpu_seconds", 600.0))
        self.pool: WarmPool[WasmBackend] = WarmPool(
            self.id,
            int(config.get("pool_size", 2)),
            float(config.get("pool_refill_per_s", 4.0)),
            make=self._make_pooled,
            alive=lambda backend: backend.launcher is not None and backend.launcher.proc.returncode is None,
            discard=lambda backend: backend.destroy(),
        )
        self.work_root = gateway_work_root(self.id)
        self.private_dir = self.work_root / ".private"
        self.agent_dir = Path()
        self.boot_slots = asyncio.Semaphore(os.cpu_count() or 1)

    @classmethod
    def build_images(cls, config: Mapping[str, Any], template: str | None, progress: Progress) -> list[str]:
        if template is not None:
            raise ValueError("the wasm runtime has no templates")
        lines = [f"{kind}: {artifacts.ensure_compiled(kind, progress)}" for kind in artifacts.KINDS]
        return [*lines, f"agent: {stage_agent_dir()}"]

    async def start(self) -> None:
        for kind in ("python", "javascript"):
            if not artifacts.compiled_module_path(kind).exists():
                log.warning("compiling the WASM %s module once (1-3 minutes; `sandgate images build wasm` "
                            "does this ahead of time)", kind)
            await asyncio.to_thread(artifacts.ensure_compiled, kind, TerminalProgress())
        self.agent_dir = await asyncio.to_thread(stage_agent_dir)
        await asyncio.to_thread(remove_orphans, self.work_root)
        self.private_dir.mkdir(parents=True, mode=0o700)
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        await asyncio.to_thread(shutil.rmtree, self.work_root, True)

    def new_backend(self, memory_mb: int, cpu_seconds: float) -> WasmBackend:
        work = self.work_root / secrets.token_hex(8)
        work.mkdir(parents=True, mode=0o700)
        return WasmBackend(self, work, memory_mb, cpu_seconds)

    async def _make_pooled(self) -> WasmBackend:
        backend = self.new_backend(self.default_memory_mb, self.default_cpu_seconds)
        try:
            await backend.boot()
        except BaseException:  # failed, or the pool is stopping mid-boot: leave nothing behind
            await asyncio.shield(backend.destroy())
            raise
        return backend

    def check_create(self, template: str | None, network: bool) -> None:
        if network:
            raise ProtocolError("unsupported", "WASM sandboxes have no network")
        if template is not None:
            raise ProtocolError("unsupported", "the WASM runtime has no templates")

    async def create(self, spec: SandboxSpec) -> Backend:
        if (spec.memory_mb, spec.cpu_seconds) == (self.default_memory_mb, self.default_cpu_seconds):
            warm = self.pool.take()
            if warm is not None:
                return warm
        backend = self.new_backend(spec.memory_mb, spec.cpu_seconds)
        try:
            await backend.boot()
        except BaseException:
            await backend.destroy()
            raise
        return backend
