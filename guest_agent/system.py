"""What the agent does only when it runs as the system's own agent (`--vm`: a microVM's init child,
root in a guest it owns): keep user processes in the sandbox cgroup, kill them all, and bring a
restored clone up to date (`guest.setup`: clock, entropy, limits).

A clone restored from a snapshot wakes with the template's clock and the template's random state:
every clone would otherwise see the same time and draw the same "random" numbers.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from collections.abc import Mapping
from typing import Any

from .wire import ProtocolError, field

# linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

#: Entropy accepted per setup: enough to reseed, small enough to be no burden.
MAX_ENTROPY = 512
#: Memory left to the kernel and the agent when the sandbox's cgroup limit is derived from the VM's.
AGENT_RESERVE_BYTES = 24 << 20


class SandboxCgroup:
    """The cgroup v2 folder user processes live in (`/sys/fs/cgroup/sandbox`). The agent itself
    lives outside it, so a fork bomb or memory bomb in the sandbox hits the sandbox's limits,
    not the agent, and `kill_all` never kills the agent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def adopt(self, pid: int) -> None:
        """Move a just-started process in. Done right after the spawn (not in the child before
        exec, which would cost a fork instead of vfork: ~15 ms per exec under TCG); a process that
        forks in the microseconds between is caught by `kill_all`'s sweep of the agent's group."""
        try:
            self._write("cgroup.procs", str(pid))
        except ProcessLookupError:
            pass  # it has already exited

    def kill_all(self) -> None:
        """SIGKILL every process in the sandbox at once (`cgroup.kill`: no process can escape by
        forking or leaving its session), then any stray that forked before `adopt` and so stayed
        in the agent's own cgroup (everything there but the agent and its init)."""
        try:
            self._write("cgroup.kill", "1")
        except OSError:
            pass
        keep = {os.getpid(), os.getppid(), 1}
        try:
            with open("/proc/self/cgroup", encoding="ascii") as f:
                own = next(line[3:].strip() for line in f if line.startswith("0::"))
            with open(f"/sys/fs/cgroup{own.rstrip('/')}/cgroup.procs", encoding="ascii") as f:
                strays = [int(p) for p in f.read().split() if int(p) not in keep]
        except (OSError, StopIteration, ValueError):
            strays = []
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def set_limits(self, memory_bytes: int | None, pids: int | None) -> None:
        if memory_bytes is not None:
            self._write("memory.max", str(memory_bytes))
            try:
                self._write("memory.swap.max", "0")
            except OSError:
                pass  # no swap accounting: nothing to limit
        if pids is not None:
            self._write("pids.max", str(pids))

    def read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.path, name), encoding="ascii") as f:
                return f.read().strip()
        except OSError:
            return None

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w", encoding="ascii") as f:
            f.write(value)


def setup(message: Mapping[str, Any], *, root: str, cgroup: SandboxCgroup | None) -> dict[str, Any]:
    """`guest.setup`: make a clone its own. Every field is optional.

    Fields: `time_ns` (int, the host's CLOCK_REALTIME), `entropy` (bytes, mixed into the kernel's
    pool, which is then reseeded), `memory_bytes` and `pids` (the sandbox cgroup's limits; memory
    defaults to the VM's RAM less a reserve for the agent), `disk_bytes` (the root's tmpfs size).
    """
    time_ns = field(message, "time_ns", int, None)
    entropy = field(message, "entropy", bytes, None)
    memory_bytes = field(message, "memory_bytes", int, None)
    pids = field(message, "pids", int, None)
    disk_bytes = field(message, "disk_bytes", int, None)
    if entropy is not None and not 16 <= len(entropy) <= MAX_ENTROPY:
        raise ProtocolError("bad_request", f"'entropy' must be 16 to {MAX_ENTROPY} bytes")
    for name, value in (("memory_bytes", memory_bytes), ("pids", pids), ("disk_bytes", disk_bytes)):
        if value is not None and value <= 0:
            raise ProtocolError("bad_request", f"'{name}' must be positive")
    if time_ns is not None:
        time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
    if entropy is not None:
        _reseed(entropy)
    if cgroup is not None:
        if memory_bytes is None:
            memory_bytes = max(_mem_total() - AGENT_RESERVE_BYTES, 16 << 20)
        cgroup.set_limits(memory_bytes, pids)
    if disk_bytes is not None:
        _resize_tmpfs(root, disk_bytes)
    return {"time_ns": time.time_ns()}


def _reseed(entropy: bytes) -> None:
    """Credit `entropy` to the kernel's pool and reseed its CRNG now, then reseed the agent's own
    generators: Python execs run in this process, whose `random` was seeded in the template."""
    import fcntl

    words = entropy + b"\0" * (-len(entropy) % 4)
    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + words
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
    import random
    import tempfile

    random.seed()
    tempfile._name_sequence = None  # type: ignore[attr-defined]  # its Random() was seeded in the template


def _mem_total() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise ProtocolError("internal", "no MemTotal in /proc/meminfo")


def _resize_tmpfs(root: str, disk_bytes: int) -> None:
    # Python has no mount(2); busybox's mount is in every microVM image.
    import subprocess

    size_kib = max(disk_bytes // 1024, 1)
    proc = subprocess.run(
        ["mount", "-o", f"remount,size={size_kib}k", root],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip()[-300:]
        raise ProtocolError("bad_request", f"cannot set the disk size to {disk_bytes} bytes: {detail}")
