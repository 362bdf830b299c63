"""Host mounts' I/O: the copy into a new sandbox, and the sync of its permitted changes back.

The host side is walked one directory file descriptor at a time, every component opened with
O_NOFOLLOW relative to its parent, from the mount's directory (checked again against
`[storage] allowed_roots` by real path before each copy or sync): a symlink planted on the host,
or made by anyone while a sync runs, is never followed, so nothing is read or written outside the
mount's directory. Symlinks are never copied in (the sandbox does not see them) and a change that
would replace one on the host fails.

A sync applies the permitted changes in order (gateway/storage/mounts.py `pending`): a written
file goes to a temporary file in its folder, then replaces the old one by rename (atomic); the
old one is kept as a hard link (a deleted file: renamed aside) until the sync is over, so
`on_error: rollback` puts back every file the sync touched. What one sync or copy moves is
bounded: MAX_FILES entries and MAX_BYTES bytes of file contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.runtime.agent_client import AgentClient
from gateway.storage.mounts import Change, MountSpec, copy_mode, pending, pin_name, shown_prefix
from guest_agent.wire import MAX_WRITE_CHUNK, ProtocolError

#: Entries one copy-in or one sync handles at most.
MAX_FILES = 10_000
#: Bytes of file contents one copy-in or one sync moves at most (256 MiB).
MAX_BYTES = 256 * 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_BACKUP = ".sandgate-sync-"
__all__ = ["MAX_BYTES", "MAX_FILES", "MountState", "copy_in", "list_pending", "pin", "scan", "shown_prefix", "sync"]


@dataclass
class MountState:
    """A sandbox's mount: its spec, a lock that makes its syncs one at a time, the last result."""

    spec: MountSpec
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_sync: dict[str, Any] | None = None


def _open_root(mount: MountSpec, allowed_roots: Sequence[str]) -> int:
    real = os.path.realpath(mount.host)
    roots = [os.path.realpath(r) for r in allowed_roots]
    if real != mount.host or not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
        raise ProtocolError("forbidden", f"the mount's host directory {mount.host!r:.200} moved or is no longer "
                                         "under an allowed root")
    return os.open(mount.host, _DIR_FLAGS)


@contextlib.contextmanager
def _folder(root: int, parts: Sequence[str]) -> Iterator[int]:
    """The folder `parts` under `root`, each component opened without following a symlink."""
    fd = os.dup(root)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise ProtocolError("path_escape", f"{'/'.join(parts)!r:.200} is not a plain path")
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


# -- copy in ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostEntry:
    rel: str
    is_dir: bool
    size: int


def scan(mount: MountSpec, allowed_roots: Sequence[str]) -> list[HostEntry]:
    """What a new sandbox gets of the host directory, shallowest first: folders `list` allows and
    regular files `read` allows, neither excluded; symlinks and special files are left out.

    Raises:
        ProtocolError: `bad_request` past MAX_FILES entries or MAX_BYTES bytes."""
    out: list[HostEntry] = []
    total = 0
    root = _open_root(mount, allowed_roots)
    try:
        queue = [""]
        while queue:
            folder = queue.pop(0)
            try:
                with _folder(root, folder.split("/") if folder else []) as fd:
                    names = sorted(os.listdir(fd))
                    stats = {}
                    for name in names:
                        with contextlib.suppress(OSError):
                            stats[name] = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:  # unreadable on the host: not copied
                continue
            for name, st in stats.items():
                rel = f"{folder}/{name}" if folder else name
                perms = mount.permissions
                if stat.S_ISDIR(st.st_mode) and perms.allows(rel, "list"):
                    out.append(HostEntry(rel, True, 0))
                    queue.append(rel)
                elif stat.S_ISREG(st.st_mode) and perms.allows(rel, "read"):
                    out.append(HostEntry(rel, False, st.st_size))
                    total += st.st_size
                else:
                    continue
                if len(out) > MAX_FILES or total > MAX_BYTES:
                    raise ProtocolError("bad_request", f"mount {mount.path}: the host directory holds more than "
                                                       f"{MAX_FILES} entries or {MAX_BYTES >> 20} MiB to copy")
    finally:
        os.close(root)
    return out


def _read_host(mount: MountSpec, allowed_roots: Sequence[str], rel: str) -> bytes:
    root = _open_root(mount, allowed_roots)
    try:
        *parts, name = rel.split("/")
        with _folder(root, parts) as folder:
            fd = os.open(name, _READ_FLAGS, dir_fd=folder)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                return f.read(MAX_BYTES + 1)
    finally:
        os.close(root)


async def copy_in(agent: AgentClient, mount: MountSpec, allowed_roots: Sequence[str], *, modes: bool) -> int:
    """Copy the host directory into the new sandbox at the mount's path; returns the entries
    copied. A host file that cannot be read is left out. `modes`: give the copies the modes of
    `copy_mode` (where the guest has modes at all: not WASI, whose guest is not refused by them)."""
    entries = await asyncio.to_thread(scan, mount, allowed_roots)
    perms = mount.permissions
    await agent.request("fs.mkdir", path=mount.path, parents=True)
    copied = 0
    for entry in entries:
        path = f"{mount.path}/{entry.rel}"
        if entry.is_dir:
            await agent.request("fs.mkdir", path=path, parents=True)
            copied += 1
            continue
        try:
            data = await asyncio.to_thread(_read_host, mount, allowed_roots, entry.rel)
        except OSError:
            continue
        mode = {"mode": copy_mode(perms, entry.rel, is_dir=False)} if modes else {}
        head, last = data[:-MAX_WRITE_CHUNK] if len(data) > MAX_WRITE_CHUNK else b"", data[-MAX_WRITE_CHUNK:]
        for offset in range(0, len(head), MAX_WRITE_CHUNK):
            await agent.request("fs.write", path=path, data=head[offset:offset + MAX_WRITE_CHUNK], offset=offset,
                                truncate=offset == 0)
        # The last chunk sets the mode: a read-only file cannot take more writes where the agent is not root.
        await agent.request("fs.patch", path=path, action="append" if head else "text", data=last, **mode)
        copied += 1
    if not modes:
        return copied
    for entry in reversed(entries):  # deepest first: a folder made read-only takes no more entries
        if entry.is_dir and copy_mode(perms, entry.rel, is_dir=True) != 0o755:
            await agent.request("fs.patch", path=f"{mount.path}/{entry.rel}", action="mkdir",
                                mode=copy_mode(perms, entry.rel, is_dir=True))
    if copy_mode(perms, "", is_dir=True) != 0o755:
        await agent.request("fs.patch", path=mount.path, action="mkdir", mode=copy_mode(perms, "", is_dir=True))
    return copied


async def pin(agent: AgentClient, mounts: Sequence[MountState]) -> None:
    """Make now each mount's sync point (after the copy, and again on a new agent)."""
    for state in mounts:
        await agent.request("fs.changes", keep=pin_name(state.spec))


# -- sync back ------------------------------------------------------------------------------------

class _HostTransaction:
    """The host side of one sync: each step keeps what undoes it until `commit` or `rollback`."""

    def __init__(self, mount: MountSpec, allowed_roots: Sequence[str]) -> None:
        self.mount = mount
        self.root = _open_root(mount, allowed_roots)
        self.undo: list[Callable[[], None]] = []
        self.backups: list[tuple[str, str]] = []  # (folder rel, backup name)
        self.tag = secrets.token_hex(4)

    def _backup_name(self) -> str:
        return f"{_BACKUP}{self.tag}-{len(self.backups)}"

    def _split(self, rel: str) -> tuple[list[str], str]:
        *parts, name = rel.split("/")
        return parts, name

    @staticmethod
    def _lstat(name: str, folder: int) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def mkdir(self, rel: str) -> None:
        parts, name = self._split(rel)
        with _folder(self.root, parts) as folder:
            st = self._lstat(name, folder)
            if st is not None:
                if stat.S_ISDIR(st.st_mode):
                    return
                raise OSError(errno.EEXIST, "the host has something else there")
            os.mkdir(name, 0o755, dir_fd=folder)
        self.undo.append(lambda: self._in(parts, lambda fd: os.rmdir(name, dir_fd=fd)))

    def write(self, rel: str, data: bytes) -> None:
        parts, name = self._split(rel)
        with _folder(self.root, parts) as folder:
            st = self._lstat(name, folder)
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                              "the host has a folder or a symlink there, not a file")
            temp = f"{_BACKUP}{self.tag}-tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    if st is not None:  # the host file keeps its mode
                        os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
                    os.fsync(f.fileno())
                if st is not None:
                    backup = self._backup_name()
                    os.link(name, backup, src_dir_fd=folder, dst_dir_fd=folder, follow_symlinks=False)
                    self.backups.append(("/".join(parts), backup))
                os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=folder)
                raise
        if st is None:
            self.undo.append(lambda: self._in(parts, lambda fd: os.unlink(name, dir_fd=fd)))
        else:
            self.undo.append(lambda: self._in(parts, lambda fd: os.replace(backup, name, src_dir_fd=fd,
                                                                           dst_dir_fd=fd)))

    def remove(self, rel: str) -> None:
        parts, name = self._split(rel)
        with _folder(self.root, parts) as folder:
            st = self._lstat(name, folder)
            if st is None:
                return
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(name, dir_fd=folder)
                self.undo.append(lambda: self._in(parts, lambda fd: os.mkdir(name, stat.S_IMODE(st.st_mode),
                                                                             dir_fd=fd)))
                return
            backup = self._backup_name()
            os.rename(name, backup, src_dir_fd=folder, dst_dir_fd=folder)
            self.backups.append(("/".join(parts), backup))
        self.undo.append(lambda: self._in(parts, lambda fd: os.rename(backup, name, src_dir_fd=fd, dst_dir_fd=fd)))

    def _in(self, parts: list[str], action: Callable[[int], None]) -> None:
        with _folder(self.root, parts) as folder:
            action(folder)

    def rollback(self) -> list[str]:
        """Undo every step, newest first; the errors of steps that could not be undone."""
        errors = []
        for step in reversed(self.undo):
            try:
                step()
            except OSError as exc:
                errors.append(str(exc))
        self.undo.clear()
        self.backups.clear()  # restored by the undo steps
        return errors

    def close(self) -> None:
        """Drop the backups (the sync is kept) and the root."""
        for parts, backup in self.backups:
            with contextlib.suppress(OSError), _folder(self.root, parts.split("/") if parts else []) as folder:
                os.unlink(backup, dir_fd=folder)
        os.close(self.root)


async def _read_sandbox(agent: AgentClient, path: str, limit: int) -> bytes:
    stream = await agent.stream("fs.read", path=path, offset=0)
    chunks: list[bytes] = []
    size = 0
    try:
        async for event in stream:
            if event["ev"] == "data":
                size += len(event["data"])
                if size > limit:
                    raise ProtocolError("bad_request", f"over the sync's bound of {MAX_BYTES >> 20} MiB")
                chunks.append(event["data"])
            elif event["ev"] == "end":
                if "error" in event:
                    raise ProtocolError.from_wire(event["error"])
                break
    finally:
        if not stream.finished:
            stream.discard()
    return b"".join(chunks)


async def list_pending(agent: AgentClient, mount: MountSpec) -> list[Change]:
    """The mount's changes since its sync point (`advance=[]`: asked without making a token)."""
    answer = await agent.request("fs.changes", since=pin_name(mount), advance=[])
    return pending(mount, answer.get("files") or {})


async def sync(agent: AgentClient, state: MountState, allowed_roots: Sequence[str], *,
               paths: Sequence[str] | None = None) -> dict[str, Any]:
    """Apply the mount's permitted pending changes to the host (`paths`: only those, as the sandbox
    shows them, and what lies under them); returns `{path, applied, denied, failed, rolled_back,
    skipped}` and advances the sync point past what was applied (batch: and past what was denied,
    which is reported once)."""
    mount = state.spec
    async with state.lock:
        changes = await list_pending(agent, mount)
        if paths is not None:
            chosen = [p.rstrip("/") for p in paths]
            changes = [c for c in changes if any(c.path == p or c.path.startswith(p + "/") for p in chosen)]
        result: dict[str, Any] = {"path": mount.path, "applied": [], "denied": [], "failed": [],
                                  "rolled_back": False, "skipped": []}
        done: list[str] = []
        txn = await asyncio.to_thread(_HostTransaction, mount, allowed_roots)
        budget, count = MAX_BYTES, 0
        try:
            for i, change in enumerate(changes):
                if not change.permitted:
                    result["denied"].append(change.describe())
                    if mount.sync == "batch":
                        done.append(change.path)
                    continue
                try:
                    count += 1
                    if count > MAX_FILES:
                        raise ProtocolError("bad_request", f"over the sync's bound of {MAX_FILES} entries")
                    if change.kind == "deleted":
                        await asyncio.to_thread(txn.remove, change.rel)
                    else:
                        info = await agent.request("fs.stat", path=f"{mount.path}/{change.rel}")
                        if info.get("type") == "dir":
                            await asyncio.to_thread(txn.mkdir, change.rel)
                        elif info.get("type") == "file":
                            data = await _read_sandbox(agent, f"{mount.path}/{change.rel}", budget)
                            budget -= len(data)
                            await asyncio.to_thread(txn.write, change.rel, data)
                        else:
                            raise ProtocolError("unsupported", f"a {info.get('type')} is not synced (only files "
                                                               "and folders)")
                    result["applied"].append(change.describe())
                    done.append(change.path)
                except (OSError, ProtocolError) as exc:
                    message = exc.message if isinstance(exc, ProtocolError) else os.strerror(exc.errno or 0)
                    result["failed"].append({**change.describe(), "error": message})
                    if mount.on_error == "continue":
                        continue
                    result["skipped"] = [c.describe() for c in changes[i + 1:]]
                    if mount.on_error == "rollback":
                        errors = await asyncio.to_thread(txn.rollback)
                        result["rolled_back"] = True
                        if errors:
                            result["rollback_errors"] = errors
                        done = [d["path"] for d in result["denied"]] if mount.sync == "batch" else []
                        result["applied"] = []
                    break
        finally:
            await asyncio.to_thread(txn.close)
        if done:
            await agent.request("fs.changes", since=pin_name(mount), advance=done)
        state.last_sync = result
        return result
