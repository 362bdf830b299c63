"""A WASM sandbox's /work: a size-limited tmpfs that only a "disk holder" process can see.

Each sandbox gets one holder: `unshare --mount` (plus `--user --map-root-user` when the gateway is
not root) makes a private mount namespace, the holder mounts a tmpfs with `size=<disk_mb>m` over
the sandbox's work folder there, says so on stdout and sleeps. Nobody else sees that mount; the
launchers preopen `/proc/<holder>/root/<work>` as /work and the gateway reaches the files the same
way. So every writer (guest code, WebSocket fs.write, REST PUT) meets the kernel's limit (ENOSPC),
never a count the guest keeps, and `statvfs` on that path reads the tmpfs's usage in O(1).

The holder lives as long as the sandbox (an agent restart keeps the files). Nothing has to be
unmounted: when the holder dies its namespace goes, and the tmpfs with it. `setpriv --pdeathsig
KILL` (after unshare, since a credential change clears the parent-death signal) ends it with the
gateway, even one killed outright; `remove_orphans` catches the rest by their marker variable.

tmpfs is memory, and its inodes cost kernel memory that `size=` does not count (an empty file has
no blocks): `nr_inodes` allows one inode per 4 KiB of quota (at least MIN_INODES), the smallest
block a non-empty file takes, so a full tree of empty files costs about as much kernel memory as
a quarter of its size (~1 KiB per inode), bounded either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from guest_agent.wire import ProtocolError

#: One inode per this many bytes of quota (see the module docstring).
BYTES_PER_INODE = 4096
MIN_INODES = 1024
READY_TIMEOUT_S = 10.0
#: Marks a sandbox process (holder or launcher) with the work root of the gateway that made it,
#: so a restarted gateway can find and kill what a dead one left (plugins.common.remove_orphans).
WORK_ROOT_ENV = "SANDGATE_WORK_ROOT"
#: The tmpfs, then each volume (image, folder, options) given after the first three arguments.
_MOUNT = ('mount -t tmpfs -o "size=$2m,nr_inodes=$3,mode=0700" sandgate-work "$1" && shift 3 && '
          'while [ $# -gt 0 ]; do mount -t ext4 -o "$3" "$1" "$2" || exit 1; shift 3; done && echo ready '
          '&& exec sleep infinity </dev/null >/dev/null 2>&1')


def inode_bound(disk_mb: int) -> int:
    """nr_inodes for a quota of `disk_mb`."""
    return max(MIN_INODES, (disk_mb << 20) // BYTES_PER_INODE)


@dataclass(frozen=True)
class VolumeImage:
    """A volume's ext4 image and the host folder the holder mounts it over (loop, in its namespace)."""

    image: str
    folder: Path
    readonly: bool

    def options(self) -> str:
        # noload: a read-only mount never replays the journal (a write, and others may read it).
        return "loop,ro,noload" if self.readonly else "loop,rw,nosuid,nodev"


def holder_command(work: Path, disk_mb: int, volumes: tuple[VolumeImage, ...] = ()) -> list[str]:
    """The holder's argv: unshare, then setpriv (the parent-death signal), then the mounts."""
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    mounts = [arg for v in volumes for arg in (v.image, str(v.folder), v.options())]
    return [*unshare, "setpriv", "--pdeathsig", "KILL", "sh", "-c", _MOUNT, "sandgate-disk", str(work),
            str(disk_mb), str(inode_bound(disk_mb)), *mounts]


class DiskHolder:
    """One sandbox's tmpfs and the process that holds it."""

    def __init__(self, proc: asyncio.subprocess.Process, work: Path) -> None:
        self.proc = proc
        #: Where this process (and the launchers) reach the tmpfs.
        self.path = self.reach(work)

    def reach(self, folder: Path) -> Path:
        """Where a folder of the holder's namespace (the tmpfs, a volume) is reached from outside."""
        return Path(f"/proc/{self.proc.pid}/root") / folder.relative_to("/")

    @classmethod
    async def start(cls, work: Path, disk_mb: int, work_root: Path,
                    volumes: tuple[VolumeImage, ...] = ()) -> DiskHolder:
        """Mount a `disk_mb` tmpfs over `work`, and the volumes, in a new holder; `unavailable` if
        the host cannot.

        Must run on the event loop's thread: the parent-death signal follows the thread that
        forked the holder, and a worker thread that ends would take the holder with it."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", WORK_ROOT_ENV: str(work_root)}
        try:
            proc = await asyncio.create_subprocess_exec(
                *holder_command(work, disk_mb, volumes), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
                start_new_session=True)
        except OSError as exc:
            raise ProtocolError("unavailable", f"cannot start the WASM disk holder: {exc}") from None
        holder = cls(proc, work)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                ready = await proc.stdout.readline()
                if ready != b"ready\n":
                    err = (await proc.stderr.read(4096)).decode(errors="replace").strip()
                    what = f"{disk_mb} MB tmpfs" + (" and volumes" if volumes else "")
                    raise ProtocolError("unavailable", f"cannot mount the sandbox's {what} "
                                                       f"(unshare/mount): {err or 'no reason given'}")
                await proc.stdout.read()  # EOF: the sleep has its own stdio
                await proc.stderr.read()
        except BaseException:
            await holder.stop()
            raise
        return holder

    def usage(self) -> tuple[int, int] | None:
        """(used, total) bytes of the tmpfs, from the kernel; None once the holder is gone."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return None
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize

    async def stop(self) -> None:
        """Kill the holder: the tmpfs and every file in it go with its namespace."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        transport = getattr(self.proc, "_transport", None)
        if transport is not None:
            transport.close()
