"""The "local" volume store: one sparse ext4 image per volume on the gateway's host.

The wasm and microvm runtimes mount these: a microVM attaches the image as a virtio-blk disk, a
WASM sandbox's disk holder loop-mounts it in its private mount namespace and preopens it. The
image's size is the quota, so every writer (the guest, the API) meets the kernel's ENOSPC, never a
count kept in the guest. The gateway reaches a volume's files for the API the same way, through
a `MountHolder`: a process in a private mount namespace holding a loop mount for one request.

Loop mounts need root (CAP_SYS_ADMIN in the host's user namespace: a user namespace may not mount
ext4); a gateway that is not root has no "local" store and says so (`available()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
import struct
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import BinaryIO

from gateway.storage.volumes import Volume, VolumeBackend
from guest_agent.wire import CHUNK_SIZE, ProtocolError

log = logging.getLogger(__name__)
#: ext4's superblock: 1024 bytes into the image; the fields `used_bytes` reads (little endian).
SUPERBLOCK_OFFSET = 1024
_SUPERBLOCK = struct.Struct("<IIIII4xI")  # inodes, blocks, reserved, free blocks, free inodes, log block size
_MAGIC_OFFSET = 0x38
EXT4_MAGIC = 0xEF53
READY_TIMEOUT_S = 20.0
_MOUNT = ('mount -t ext4 -o "$3" "$1" "$2" && echo ready && exec sleep infinity </dev/null >/dev/null 2>&1')


def superblock_usage(head: bytes) -> tuple[int, int]:
    """(free bytes, block size) from the first 2 KiB of an ext4 image (sans-I/O).

    Raises:
        ValueError: not an ext4 superblock.
    """
    if len(head) < SUPERBLOCK_OFFSET + 0x3A:
        raise ValueError("too short for an ext4 superblock")
    (magic,) = struct.unpack_from("<H", head, SUPERBLOCK_OFFSET + _MAGIC_OFFSET)
    if magic != EXT4_MAGIC:
        raise ValueError("not an ext4 file system")
    _inodes, _blocks, _reserved, free_blocks, _free_inodes, log_size = _SUPERBLOCK.unpack_from(head, SUPERBLOCK_OFFSET)
    block_size = 1024 << log_size
    return free_blocks * block_size, block_size


def _read_free(image: Path) -> int:
    with image.open("rb") as f:
        return superblock_usage(f.read(2048))[0]


def available() -> str | None:
    """None when this host can hold local volumes, else why not."""
    if os.geteuid() != 0:
        return "local volumes are ext4 images loop-mounted by the gateway, which needs root"
    for tool in ("mkfs.ext4", "e2fsck", "mount", "unshare"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            return f"local volumes need {tool} (Debian: e2fsprogs, util-linux, mount)"
    return None


class MountHolder:
    """A process holding one loop mount of an image in a private mount namespace; the gateway
    reaches the files through `/proc/<pid>/root/<mountpoint>`. Gone with the process."""

    def __init__(self, proc: asyncio.subprocess.Process, mountpoint: Path) -> None:
        self.proc = proc
        self.path = Path(f"/proc/{proc.pid}/root") / mountpoint.relative_to("/")

    @classmethod
    async def start(cls, image: Path, mountpoint: Path, *, readonly: bool) -> MountHolder:
        # noload: a read-only mount must not replay a journal (the image may be in use read-only
        # elsewhere, and a replay is a write).
        options = "loop,ro,noload" if readonly else "loop,rw,nosuid,nodev"
        argv = ["unshare", "--mount", "--propagation", "private", "setpriv", "--pdeathsig", "KILL",
                "sh", "-c", _MOUNT, "sandgate-volume", str(image), str(mountpoint), options]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        holder = cls(proc, mountpoint)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)
        except BaseException:
            await holder.stop()
            raise
        if line.strip() != b"ready":
            error = (await proc.stderr.read(4096)).decode(errors="replace").strip()
            await holder.stop()
            raise ProtocolError("unavailable", f"cannot mount the volume: {error or 'the mount failed'}")
        return holder

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_parent(base: Path, path: str, *, create: bool) -> tuple[int, str]:
    """(fd of the folder holding `path`, its last name), walking the volume one name at a time
    with O_NOFOLLOW: a symlink the guest left in the volume is never followed (its target would be
    resolved in the gateway's file system: the mount is reached through /proc/<pid>/root). Makes
    missing folders when `create`. The caller closes the fd."""
    *folders, name = [part for part in path.split("/") if part not in ("", ".")]
    fd = os.open(base, _NOFOLLOW_DIR)
    try:
        for folder in folders:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(folder, 0o755, dir_fd=fd)
            child = os.open(folder, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _os_error(exc: OSError, path: str) -> ProtocolError:
    from guest_agent.fsops import os_error

    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and not isinstance(exc, NotADirectoryError):
        return ProtocolError("path_escape", f"{path!r:.200} goes through a symbolic link")
    return os_error(exc, path)


def _open_regular(base: Path, path: str, volume: str) -> BinaryIO:
    try:
        parent, name = _open_parent(base, path, create=False)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
        finally:
            os.close(parent)
    except FileNotFoundError:
        raise ProtocolError("not_found", f"no file {path!r:.200} in volume {volume!r}") from None
    except OSError as exc:
        raise _os_error(exc, path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise ProtocolError("is_a_directory", f"{path!r:.200} is a directory")
        raise ProtocolError("io_error", f"{path!r:.200} is not a regular file")
    return os.fdopen(fd, "rb")


class _Upload:
    """A file written beside its target under a temporary name, renamed into place at the end."""

    def __init__(self, base: Path, path: str) -> None:
        self.path = path
        try:
            self.parent, self.name = _open_parent(base, path, create=True)
        except OSError as exc:
            raise _os_error(exc, path) from None
        self.temp = f".{self.name[:200]}.upload-{secrets.token_hex(4)}"
        try:
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                              dir_fd=self.parent)
        except OSError as exc:
            os.close(self.parent)
            raise _os_error(exc, path) from None

    def write(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
            os.rename(self.temp, self.name, src_dir_fd=self.parent, dst_dir_fd=self.parent)
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    def close(self) -> None:
        """Close, removing the temporary file if it was not renamed."""
        os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.temp, dir_fd=self.parent)
        os.close(self.parent)


class LocalVolumes(VolumeBackend):
    """Volumes as ext4 images under `<storage dir>/local`."""

    store = "local"

    def __init__(self, root: Path) -> None:
        self.root = root / "local"
        self.mountpoint = self.root / "mnt"

    def image(self, volume: Volume) -> Path:
        return self.root / f"{volume.id}.ext4"

    def source(self, volume: Volume) -> str:
        return str(self.image(volume))

    def _baseline(self, volume: Volume) -> Path:
        """The free bytes of the fresh file system (journal and tables are not the tenant's)."""
        return self.root / f"{volume.id}.free"

    async def create(self, volume: Volume) -> None:
        await asyncio.to_thread(self.mountpoint.mkdir, parents=True, exist_ok=True, mode=0o700)
        image = self.image(volume)
        with image.open("xb") as f:
            f.truncate(volume.quota_mb << 20)
        # No reserved blocks (the quota is all the tenant's); lazy init keeps creation fast.
        proc = await asyncio.create_subprocess_exec(
            "mkfs.ext4", "-q", "-F", "-m", "0", "-L", volume.name[:16], "-E",
            "lazy_itable_init=1,lazy_journal_init=1", str(image),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        _, stderr = await proc.communicate()
        if proc.returncode != 0:
            image.unlink(missing_ok=True)
            raise ProtocolError("unavailable", f"mkfs.ext4 failed: {stderr.decode(errors='replace').strip()[:300]}")
        self._baseline(volume).write_text(str(_read_free(image)))

    async def delete(self, volume: Volume) -> None:
        self.image(volume).unlink(missing_ok=True)
        self._baseline(volume).unlink(missing_ok=True)

    async def settle(self, volume: Volume) -> None:
        """`e2fsck -p`: replays the journal a killed guest left (so a read-only mount, which
        never replays it, sees every file) and recounts the free blocks `used_bytes` reads; a
        cleanly unmounted file system is only looked at. What it cannot fix is logged."""
        proc = await asyncio.create_subprocess_exec(
            "e2fsck", "-p", str(self.image(volume)), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        output, _ = await proc.communicate()
        if proc.returncode not in (0, 1):  # 1: errors corrected
            log.warning("volume %s (%s): e2fsck -p exited %s: %s", volume.name, volume.id, proc.returncode,
                        output.decode(errors="replace").strip()[-500:])

    async def used_bytes(self, volume: Volume) -> int | None:
        """From the image's superblock: exact once a read-write mount ended (`settle`); while a
        microVM writes, as of its guest's last sync."""
        try:
            baseline = int(self._baseline(volume).read_text())
            return max(0, baseline - await asyncio.to_thread(_read_free, self.image(volume)))
        except (OSError, ValueError):
            return None

    @contextlib.asynccontextmanager
    async def _mounted(self, volume: Volume, *, readonly: bool) -> AsyncIterator[Path]:
        holder = await MountHolder.start(self.image(volume), self.mountpoint, readonly=readonly)
        try:
            yield holder.path
        finally:
            await holder.stop()

    async def read_file(self, volume: Volume, path: str) -> AsyncGenerator[bytes, None]:
        async with self._mounted(volume, readonly=True) as base:
            f = await asyncio.to_thread(_open_regular, base, path, volume.name)
            with f:
                while chunk := await asyncio.to_thread(f.read, CHUNK_SIZE):
                    yield chunk

    async def write_file(self, volume: Volume, path: str, chunks: AsyncIterator[bytes]) -> int:
        async with self._mounted(volume, readonly=False) as base:
            upload = await asyncio.to_thread(_Upload, base, path)
            written = 0
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(upload.write, chunk)
                    written += len(chunk)
                await asyncio.to_thread(upload.commit)
            finally:
                await asyncio.to_thread(upload.close)
            return written
