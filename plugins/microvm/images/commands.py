"""Running the build's commands (apt-get, dpkg-deb, debootstrap, mkfs.ext4, ...) with progress."""

from __future__ import annotations

import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

Progress = Callable[[float, str], None]


class Clock:
    """Calls `progress(seconds since the build began, phase)`."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.start = time.monotonic()

    def __call__(self, phase: str) -> None:
        self.progress(time.monotonic() - self.start, phase)


def run(cmd: Sequence[str | Path], clock: Clock, phase: str, *, cwd: Path | None = None,
        env: Mapping[str, str] | None = None, timeout: float | None = None) -> str:
    """Run `cmd`, ticking `clock` while it runs; its output (stdout and stderr), or RuntimeError
    naming the command and the end of its output (also when it runs past `timeout` seconds,
    and is killed)."""
    argv = [str(c) for c in cmd]
    clock(phase)
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd, env=None if env is None else dict(env))
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    clock(phase)
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"{phase}: `{shlex.join(argv)}` ran past its {timeout:g} s") from None
        except TimeoutError as exc:
            proc.kill()
            proc.wait()
            raise RuntimeError(str(exc)) from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        text = out.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{phase}: `{shlex.join(argv)}` failed (exit {code}):\n{text.strip()[-3000:]}")
    return text
