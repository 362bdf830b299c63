"""The guest half of the `metrics` op: what this platform can tell, None for what it can't."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

#: Where the root's file system cannot be asked (no statvfs), its files are summed, up to this many.
_WALK_LIMIT = 50_000


def guest_metrics(root: str, started: float, execs_running: int, *, whole_machine: bool = False) -> dict[str, Any]:
    """Args:
    root: the sandbox root (its file system's usage is `disk_bytes`).
    started: the agent's start, `time.monotonic()`.
    execs_running: the agent's running execs.
    whole_machine: the sandbox is the whole (virtual) machine: memory is the machine's in use.
    """
    return {
        "uptime_s": round(time.monotonic() - started, 3),
        "cpu_s": _cpu_seconds(),
        "memory_bytes": _machine_memory_bytes() if whole_machine else _memory_bytes(),
        "disk_bytes": _disk_bytes(root),
        "execs_running": execs_running,
    }


def _cpu_seconds() -> float | None:
    """CPU time of the agent and the children it has reaped. None on WASI, whose clocks give
    the host's time, not the guest's CPU (the runtime reports that from the host side)."""
    if sys.platform == "wasi":
        return None
    try:
        t = os.times()
        return round(t.user + t.system + t.children_user + t.children_system, 3)
    except (AttributeError, OSError):
        pass
    try:
        return round(time.process_time(), 3)
    except OSError:
        return None


def _memory_bytes() -> int | None:
    """Memory in use in the guest: the agent's cgroup (a pod or container) if it has a limit
    file to read, else the machine's, else None (WASI)."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            for line in f:
                if line.startswith("0::"):
                    path = "/sys/fs/cgroup" + line[3:].strip().rstrip("/") + "/memory.current"
                    with open(path, encoding="ascii") as current:
                        return int(current.read())
    except (OSError, ValueError):
        pass
    return _machine_memory_bytes()


def _machine_memory_bytes() -> int | None:
    """The machine's memory in use: total minus available."""
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        return info["MemTotal"] - info["MemAvailable"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _disk_bytes(root: str) -> int | None:
    """Bytes of the files under the root (what a sandbox's disk quota counts): the root may share
    its file system with others (WASM's host directory), so the file system's usage would lie."""
    total, seen = 0, 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    seen += 1
                    if seen > _WALK_LIMIT:
                        return None
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total
