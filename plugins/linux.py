"""The Linux system calls Python's standard library lacks, for the two jails that confine work the
host does for a tenant or a template: the C/C++ compiler's (plugins/wasm/jail.py) and a template's
setup commands' (plugins/microvm/images/confine.py). Both run this in a stage-2 Python started
without `site`, so it is stdlib-only and imports ctypes only when a `Syscalls` is made.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import Any

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
#: glibc has no pivot_root wrapper; its syscall number per machine.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}
#: statvfs flags a bind mount must keep when it is remounted in a user namespace (the kernel
#: refuses to clear them: they are locked), and the mount flag each stands for.
LOCKED_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))


class Syscalls:
    """libc's calls, each raising `error` (the jail's own exception) with what failed and why."""

    def __init__(self, error: type[Exception]) -> None:
        """Call before confining: it reads the host's /proc."""
        import ctypes

        self._ctypes = ctypes
        self.libc: Any = ctypes.CDLL(None, use_errno=True)
        self.error = error
        # Read now: a jail's own /proc (after pivot_root) may not show /proc/sys.
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            self.cap_last = int(f.read())

    def check(self, result: int, what: str) -> None:
        if result != 0:
            raise self.error(f"{what}: {os.strerror(self._ctypes.get_errno())}")

    def die_with_parent(self) -> None:
        self.check(self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        result = self.libc.mount(source.encode() if source else None, target.encode(),
                                 fstype.encode() if fstype else None, self._ctypes.c_ulong(flags),
                                 data.encode() if data else None)
        self.check(result, f"mount {fstype or 'bind'} on {target}")

    def bind_readonly(self, source: str, target: str) -> None:
        """Bind `source` on `target` read-only, keeping the flags the kernel locked on it."""
        self.mount(source, target, None, MS_BIND)
        kept = os.statvfs(target).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
        for st_flag, ms_flag in LOCKED_FLAGS:
            if kept & st_flag:
                flags |= ms_flag
        self.mount(None, target, None, flags)

    def pivot_root(self, new_root: str, put_old: str) -> None:
        """Make `new_root` the root and detach the old one (which was put at `put_old`, a folder
        under `new_root`): unlike a chroot, nothing of the host's tree stays reachable."""
        number = SYS_PIVOT_ROOT.get(os.uname().machine)
        if number is None:
            raise self.error(f"pivot_root: unknown syscall number on {os.uname().machine}")
        self.check(self.libc.syscall(number, new_root.encode(), put_old.encode()), "pivot_root")
        os.chdir("/")
        inside = "/" + os.path.relpath(put_old, new_root)
        self.check(self.libc.umount2(inside.encode(), MNT_DETACH), f"umount {inside}")

    def keep_only_capabilities(self, kept: Iterable[int]) -> None:
        """Drop every capability but `kept` from the bounding, ambient, effective and permitted
        sets (none inheritable), then set no_new_privs: no exec can gain one back (setuid files,
        file capabilities)."""
        kept = frozenset(kept)
        for cap in range(self.cap_last + 1):
            if cap not in kept:
                self.check(self.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(CAPBSET_DROP {cap})")
        self.check(self.libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(CAP_AMBIENT)")
        ctypes = self._ctypes
        words = [sum(1 << cap for cap in kept if cap < 32), sum(1 << (cap - 32) for cap in kept if cap >= 32)]
        header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
        # effective, permitted, inheritable for capabilities 0-31, then the same for 32-63
        data = (ctypes.c_uint32 * 6)(words[0], words[0], 0, words[1], words[1], 0)
        self.check(self.libc.capset(header, data), "capset")
        self.check(self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
