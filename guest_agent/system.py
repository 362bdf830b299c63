"""What the agent does only when it runs as the system's own agent (`--vm`: a microVM's init child,
root in a guest it owns): keep user processes in the sandbox cgroup, kill them all, and bring a
restored clone up to date (`guest.setup`: clock, entropy, limits).

A clone restored from a snapshot wakes with the template's clock and the template's random state:
every clone would otherwise see the same time and draw the same "random" numbers.
"""

from __future__ import annotations

# Imported up front, not when first used: the agent imports this module at start-up with `--vm`, so
# in a template VM all of it is loaded before the snapshot, and no clone pays for it (imports
# are slow in an emulated guest).
import ctypes
import fcntl
import os
import random
import signal
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from .wire import ProtocolError, field

# linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

#: Entropy accepted per setup: enough to reseed, small enough to be no burden.
MAX_ENTROPY = 512
#: Memory kept free for the agent when the sandbox cgroup's limit is derived from what is available.
AGENT_RESERVE_BYTES = 24 << 20


# Writing "0" to cgroup.procs moves the writer; `protect_agent` made the agent unkillable by the OOM
# killer, which its children must not inherit.
_ENTER = 'echo 0 >"$1" && echo 0 >/proc/self/oom_score_adj && shift && exec "$@"'


class SandboxCgroup:
    """The cgroup v2 folder user processes live in (`/sys/fs/cgroup/sandbox`). The agent itself
    lives outside it, so a fork bomb or memory bomb in the sandbox hits the sandbox's limits,
    not the agent, and `kill_all` never kills the agent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` started through a shell that first moves itself into the cgroup (and gives up
        the agent's OOM immunity), then execs it: the program's first instruction, and so any
        fork it makes, is already inside. A move after the spawn would race the program (under
        TCG a short command finishes first), and a preexec_fn would cost a fork instead of
        vfork (~15 ms per exec under TCG); busybox's sh costs ~1 ms."""
        return ["/bin/sh", "-c", _ENTER, "sandgate-enter", self.path + "/cgroup.procs", *argv]

    def enter_then(self, then: Callable[[], None]) -> Callable[[], None]:
        """A preexec_fn (for execs that fork anyway, like pty ones): enter, then `then()`."""
        procs = self.path + "/cgroup.procs"

        def enter() -> None:
            with open(procs, "w", encoding="ascii") as f:
                f.write("0")
            with open("/proc/self/oom_score_adj", "w", encoding="ascii") as f:
                f.write("0")
            then()

        return enter

    def kill_all(self) -> None:
        """SIGKILL every process in the sandbox at once (`cgroup.kill`: no process can escape by
        forking or leaving its session), then any stray in the agent's own cgroup (everything
        there but the agent and its init: a wrapper that failed to move itself)."""
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


def protect_agent() -> None:
    """Make the OOM killer never choose the agent: without it a memory bomb that exhausts the VM
    before its cgroup limit bites could take the agent down instead of itself."""
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as f:
            f.write("-1000")
    except OSError:
        pass  # not root: the cgroup limit alone must do


def setup(message: Mapping[str, Any], *, root: str, cgroup: SandboxCgroup | None) -> dict[str, Any]:
    """`guest.setup`: make a clone its own. Every field is optional.

    Fields: `time_ns` (int, the host's CLOCK_REALTIME), `entropy` (bytes, mixed into the kernel's
    pool, which is then reseeded), `memory_bytes` and `pids` (the sandbox cgroup's limits; memory
    defaults to the memory available now less a reserve, so the cgroup's own OOM kill comes before the
    whole VM runs out), `disk_bytes` (the root's tmpfs size).
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
            memory_bytes = max(_meminfo("MemAvailable") - AGENT_RESERVE_BYTES, 16 << 20)
        cgroup.set_limits(memory_bytes, pids)
    if disk_bytes is not None:
        _resize_tmpfs(root, disk_bytes)
    return {"time_ns": time.time_ns()}


def _reseed(entropy: bytes) -> None:
    """Credit `entropy` to the kernel's pool and reseed its CRNG now, then reseed the agent's own
    generators: Python execs run in this process, whose `random` was seeded in the template."""
    words = entropy + b"\0" * (-len(entropy) % 4)
    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + words
    fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)
    random.seed()
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:  # its name generator's Random() may have been seeded in the template
        tempfile._name_sequence = None  # type: ignore[attr-defined]


def _meminfo(key: str) -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise ProtocolError("internal", f"no {key} in /proc/meminfo")


MS_REMOUNT = 32


def _resize_tmpfs(root: str, disk_bytes: int) -> None:
    # mount(2) through libc: a `mount` child process would cost a fork and an exec.
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"size={max(disk_bytes // 1024, 1)}k".encode()
    if libc.mount(b"tmpfs", root.encode(), b"tmpfs", MS_REMOUNT, options) != 0:
        errno = ctypes.get_errno()
        raise ProtocolError("bad_request", f"cannot set the disk size to {disk_bytes} bytes: {os.strerror(errno)}")
