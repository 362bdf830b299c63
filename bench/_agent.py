"""A WASM launcher running the guest agent, spawned directly (no gateway), exactly as
plugins/wasm/runtime.py's WasmBackend spawns it, with a blocking frame client over its pipes.

    python -m plugins.wasm.launcher --mode python --work DIR --agent-dir $(stage_agent_dir())
        --memory-bytes 268435456 --cpu-seconds 600 -- python -m guest_agent --root /work
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from _common import PYTHON, ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

from guest_agent.wire import FrameDecoder, encode_frame
from plugins.wasm.agent_dir import stage_agent_dir


def launcher_argv(work: str, memory_mb: int = 256, cpu_seconds: float = 600.0) -> list[str]:
    return [PYTHON, "-m", "plugins.wasm.launcher", "--mode", "python", "--work", work,
            "--agent-dir", str(stage_agent_dir()), "--memory-bytes", str(memory_mb << 20),
            "--cpu-seconds", str(cpu_seconds), "--", "python", "-m", "guest_agent", "--root", "/work"]


class DirectAgent:
    """One launcher + agent, spoken to with guest_agent.wire over blocking pipe I/O."""

    def __init__(self) -> None:
        self.work = tempfile.mkdtemp(prefix="sandgate-bench-")
        self.argv = launcher_argv(self.work)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=ROOT, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.fd_in = self.proc.stdout.fileno()
        self.fd_out = self.proc.stdin.fileno()
        self.decoder = FrameDecoder()
        self.pending: list[dict[str, Any]] = []
        self.next_id = 1

    def send(self, message: dict[str, Any]) -> None:
        os.write(self.fd_out, encode_frame(message))

    def receive(self) -> dict[str, Any]:
        while not self.pending:
            data = os.read(self.fd_in, 1 << 18)
            if not data:
                raise EOFError("the agent closed its channel")
            self.decoder.receive_data(data)
            self.pending.extend(self.decoder.messages_received())
        return self.pending.pop(0)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        self.send({"id": rid, "op": op, **fields})
        while True:
            message = self.receive()
            if message.get("id") == rid:
                return message

    def exec_python(self, code: str, on_data: Any = None) -> dict[str, Any]:
        """Run `code`; returns the end event. `on_data(bytes)` sees every output chunk."""
        rid = self.next_id
        self.next_id += 1
        self.send({"id": rid, "op": "exec.start", "exec_id": f"x{rid}", "language": "python", "code": code})
        while True:
            message = self.receive()
            if message.get("id") != rid:
                continue
            ev = message.get("ev")
            if ev == "data" and on_data is not None:
                on_data(message["data"])
            elif ev == "end" or ("error" in message and ev is None):
                return message

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> DirectAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
