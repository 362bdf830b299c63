"""The guest agent as a host subprocess: the smallest real sandgate runtime."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from gateway import hookimpl
from gateway.runtime import Backend, ByteChannel, Runtime, RuntimeRegistry, SandboxSpec, StreamChannel


class LocalBackend(Backend):
    def __init__(self, root: Path) -> None:
        self.host_root = root
        self._proc: asyncio.subprocess.Process | None = None
        self._channel: ByteChannel | None = None

    async def spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "guest_agent", "--root", str(self.host_root),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=self.host_root, start_new_session=True,
        )
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._channel = StreamChannel(self._proc.stdout, self._proc.stdin)

    def channel(self) -> ByteChannel:
        assert self._channel is not None
        return self._channel

    async def wait_exited(self) -> str:
        assert self._proc is not None
        code = await self._proc.wait()
        return f"agent exited with code {code}"

    async def _kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)  # the agent and every process it started
            except ProcessLookupError:
                pass
        if self._proc is not None:
            await self._proc.wait()
            # Close the pipes now rather than at garbage collection (asyncio has no public close).
            transport = getattr(self._proc, "_transport", None)
            if transport is not None:
                transport.close()

    async def restart_agent(self) -> None:
        await self._kill()
        await self.spawn()

    async def destroy(self) -> None:
        await self._kill()
        shutil.rmtree(self.host_root, ignore_errors=True)

    async def host_metrics(self) -> dict[str, Any]:
        if self._proc is None:
            return {}
        return await asyncio.to_thread(_rss, self._proc.pid)


def _rss(pid: int) -> dict[str, Any]:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return {"rss_bytes": rss}


class LocalProcessRuntime(Runtime):
    id = "example-local"
    description = "the guest agent as a plain host process; an example, no isolation"

    async def create(self, spec: SandboxSpec) -> Backend:
        backend = LocalBackend(Path(tempfile.mkdtemp(prefix=f"sandgate-{spec.sandbox_id}-")))
        await backend.spawn()
        return backend


@hookimpl
def sandgate_register_runtimes(registry: RuntimeRegistry) -> None:
    registry.add(LocalProcessRuntime)
