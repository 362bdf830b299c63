"""Start `sandgate serve` as a real subprocess, the way users run it (shared by several tests)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    #: What the gateway printed before it started listening.
    banner: str
    #: Everything it printed after, read all along (an unread pipe would fill and freeze it).
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def call(self, key: str, method: str, path: str, body: Any = None) -> Any:
        """One REST call; the JSON answer (None for an empty body)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def stop(self) -> str:
        """SIGTERM, wait for a clean exit (the drain), and return the rest of the output."""
        self.proc.terminate()
        code = self.proc.wait(timeout=60)
        if self.reader is not None:
            self.reader.join(timeout=60)
        rest = "".join(self.output)
        assert code == 0, rest
        return rest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(env: Mapping[str, str], *args: str, command: Sequence[str] = (sys.executable, "-m", "gateway.cli"),
          cwd: Path | None = None) -> Iterator[Served]:
    """`<command> serve --port <free> *args` (the checkout's CLI unless `command` names another,
    such as an installed wheel's `sandgate`), ready to take requests. The microVM runtime is blocked
    unless `env` says otherwise: its pool would boot VMs these tests never use."""
    port = free_port()
    env = {"SANDGATE_BLOCKED_PLUGINS": "microvm", **env}  # "" defers to a config file's list
    with subprocess.Popen([*command, "serve", "--port", str(port), *args], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env)) as proc:
        assert proc.stdout is not None
        banner = []
        for line in proc.stdout:  # aiohttp prints this once it listens
            banner.append(line)
            if "Running on" in line:
                break
        else:
            raise AssertionError("the gateway exited before listening:\n" + "".join(banner))
        served = Served(proc, port, "".join(banner))
        stdout = proc.stdout
        served.reader = threading.Thread(target=lambda: served.output.extend(stdout), name="gateway-output",
                                         daemon=True)
        served.reader.start()
        try:
            yield served
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            served.reader.join(timeout=60)
