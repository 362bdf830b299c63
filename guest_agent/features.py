"""What this interpreter can really do, detected at run time (docs/protocol.md §2, capabilities).

The same agent runs under host CPython (Linux: threads, processes, signals, ptys) and under
CPython compiled for WASI (one thread, no processes, no signals). Nothing is assumed from the
platform name alone: each feature is probed, so a WASI build with threads, or a minimal Linux
Python without `termios`, advertises exactly what it has.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import languages


@dataclass(frozen=True)
class Features:
    """The platform facts the agent's behaviour depends on."""

    platform: str
    #: Threads can be started: execs run concurrently with the request loop (`exec.concurrent`).
    threads: bool
    #: Child processes can be spawned (`exec.process`).
    processes: bool
    #: Process groups can be signalled (`exec.signal`).
    signals: bool
    #: Pseudo-terminals with window sizes and a controlling terminal (`exec.pty`).
    pty: bool
    #: `PyThreadState_SetAsyncExc` is reachable (interrupting in-interpreter Python on a thread).
    async_exc: bool
    #: The agent owns its (virtual) machine: it may set the clock, reseed entropy and set the
    #: sandbox's limits (`guest.setup`). Only by `--vm`, never detected.
    system: bool = False
    #: TCP sockets and `selectors` work (not under WASI): published ports reach the guest's
    #: loopback through the agent (`net.connect`).
    sockets: bool = False
    #: The language table's programs found on the agent's PATH at start (program -> path): the
    #: languages they make whole run as processes (`exec.<language>`). Looked up once: a program
    #: installed later (say, by a pip or apt-get of the sandbox's own) is not offered.
    programs: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def languages(self) -> list[str]:
        """The languages this agent runs: python in its own interpreter, others as processes."""
        found = languages.offered_by_programs(self.programs.get) if self.processes else []
        return ["python", *(lang for lang in found if lang != "python")]

    @property
    def capabilities(self) -> list[str]:
        """The `hello` capabilities, in the order of the protocol's table."""
        caps = [f"exec.{lang}" for lang in self.languages]
        if self.processes:
            caps.append("exec.process")
        caps.append("exec.stdin")
        if self.processes and self.signals:
            caps.append("exec.signal")
        if self.pty:
            caps.append("exec.pty")
        if self.threads:
            caps.append("exec.concurrent")
        caps += ["fs", "fs.watch", "metrics"]
        if self.sockets:
            caps.append("net.connect")
        if self.system:
            caps.append("guest.setup")
        return caps


def detect(*, single_thread: bool = False, system: bool = False) -> Features:
    """Probe this interpreter.

    Args:
        single_thread: behave as a platform without threads (and so without processes) even
            where threads exist: how the tests exercise the WASI code paths on the host.
        system: the agent owns the machine (`--vm`); see `Features.system`.
    """
    threads = not single_thread and _can_start_threads()
    processes = threads and sys.platform != "wasi" and _importable("_posixsubprocess")
    signals = processes and hasattr(os, "killpg")
    pty = (
        processes
        and hasattr(os, "openpty")
        and _importable("fcntl")
        and _importable("termios")
        and all(hasattr(sys.modules["termios"], n) for n in ("TIOCSWINSZ", "TIOCSCTTY"))
    )
    return Features(
        platform=sys.platform,
        threads=threads,
        processes=processes,
        signals=signals,
        pty=pty,
        async_exc=threads and _has_async_exc(),
        system=system,
        sockets=threads and sys.platform != "wasi" and _importable("_socket") and _importable("select"),
        programs=languages.find_programs(shutil.which) if processes else {},
    )


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _can_start_threads() -> bool:
    # WASI builds import `threading` fine and fail only when a thread is started.
    try:
        import threading

        thread = threading.Thread(target=lambda: None, name="agent-probe", daemon=True)
        thread.start()
        thread.join()
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def _has_async_exc() -> bool:
    try:
        import ctypes

        return hasattr(ctypes.pythonapi, "PyThreadState_SetAsyncExc")
    except (ImportError, AttributeError, OSError):
        return False
