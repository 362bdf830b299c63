"""File-system ops confined to the sandbox's file-system roots (docs/protocol.md §3, fs).

Every path is checked twice: lexically (no NUL, no `..`, absolute paths must lie under a root)
and then by its real location (`os.path.realpath`), so a symlink cannot lead outside the roots.
Ops that act on a name itself (stat, move, remove) resolve only the parent directory and act on
the link, not on what it points to; everything else resolves the whole path. The agent then
works on the resolved real path, which narrows (but inside a guest cannot close) the window in
which a process could swap a symlink: the guest's own processes are the sandbox anyway, and the
hard boundary is the runtime's (WASI preopens, the microVM, the pod).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .wire import CHUNK_SIZE, MAX_WRITE_CHUNK, ProtocolError, field

#: fs.list stops after this many entries (and says `truncated`).
MAX_LIST_ENTRIES = 10_000
#: ...or once the entries would need more than this many bytes, so the reply fits in one frame.
MAX_LIST_BYTES = 960 * 1024
#: An entry's encoded size beyond its name and path (at most 63 bytes, measured; with margin).
_ENTRY_OVERHEAD = 68
MAX_LIST_DEPTH = 16

_OS_ERROR_CODES: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "not_found"),
    (FileExistsError, "exists"),
    (NotADirectoryError, "not_a_directory"),
    (IsADirectoryError, "is_a_directory"),
)
_QUOTA_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def os_error(exc: OSError, path: str | None = None) -> ProtocolError:
    """The wire error for an OSError. The message is the strerror and the path as the client
    gave it: never a host path (the exception's own filename may lie outside the root)."""
    code = next((code for kind, code in _OS_ERROR_CODES if isinstance(exc, kind)), None)
    if code is None:
        code = "disk_quota" if exc.errno in _QUOTA_ERRNOS else "io_error"
    message = exc.strerror or type(exc).__name__
    if path is not None:
        message = f"{message}: {path!r:.300}"
    return ProtocolError(code, message)


@dataclass(frozen=True)
class Resolved:
    real: str  #: the real path to operate on
    #: The path as shown to clients: relative to the working directory ("." for it) when it lies
    #: there, else absolute.
    rel: str
    #: Whether the path is one of the roots themselves (the working directory or an fs root),
    #: which cannot be moved or removed.
    is_root: bool = False


class _Base:
    """One directory paths may lie under, as given and as it really is (it may be a symlink)."""

    def __init__(self, path: str) -> None:
        self.given = os.path.abspath(path)
        self.real = os.path.realpath(path)

    @staticmethod
    def _under(path: str, base: str) -> bool:
        return path == base or path.startswith(base if base.endswith(os.sep) else base + os.sep)

    def lexical(self, absolute: str) -> str | None:
        """`absolute` on the real side of this base, or None when it lies outside."""
        for base in (self.given, self.real):
            if self._under(absolute, base):
                rel = os.path.relpath(absolute, base)
                return self.real if rel == "." else os.path.join(self.real, rel)
        return None

    def holds(self, real: str) -> bool:
        return self._under(real, self.real)


class Root:
    """The sandbox's working directory and the file-system roots paths are confined to.

    Relative paths are taken from the working directory (/work); absolute paths may name anything
    under one of the fs roots: "/" on a microVM or pod (the whole file system), the preopens on
    WASM (/work, volumes, mounts). The working directory is always one of them.
    """

    def __init__(self, path: str, fs_roots: tuple[str, ...] = ()) -> None:
        self.work = _Base(path)
        self.given = self.work.given
        self.real = self.work.real
        bases = [self.work, *(_Base(root) for root in fs_roots)]
        # Deepest first, so a path is checked against the innermost root that holds it.
        self.bases = sorted(bases, key=lambda b: len(b.real), reverse=True)

    def _base_of(self, real: str) -> _Base | None:
        return next((base for base in self.bases if base.holds(real)), None)

    def resolve(self, path: str, *, follow: bool = True) -> Resolved:
        """Map a client path to a real path inside the roots.

        Args:
            path: relative to the working directory, or absolute under an fs root ("" and "." are
                the working directory).
            follow: resolve the final component too. With False, only its parent is resolved,
                for ops that act on the name itself (a symlink is stat'ed, moved or removed,
                never followed).

        Raises:
            ProtocolError: `path_escape` for NUL, `..`, or a location outside the roots.
        """
        if "\0" in path:
            raise ProtocolError("path_escape", "NUL byte in path")
        if ".." in path.split("/"):
            raise ProtocolError("path_escape", "'..' is not allowed in paths")
        if path.startswith("/"):
            absolute = os.path.normpath(path)
            if absolute.startswith("//"):
                absolute = "/" + absolute.lstrip("/")
            lexical = next((hit for hit in (b.lexical(absolute) for b in self.bases) if hit is not None), None)
            if lexical is None:
                raise ProtocolError("path_escape", f"{path!r:.300} is outside the sandbox's file system")
        else:
            rel = os.path.normpath(path) if path else "."
            lexical = self.real if rel == "." else os.path.join(self.real, rel)
        is_root = any(lexical == base.real for base in self.bases)
        if follow or is_root:
            real = os.path.realpath(lexical)
            resolved = real
        else:
            parent, name = os.path.split(lexical)
            real = os.path.join(os.path.realpath(parent), name)
            resolved = os.path.dirname(real)
        base = self._base_of(resolved)
        if base is None or self._unresolved_link(base, resolved):
            raise ProtocolError("path_escape", f"{path!r:.300} leads outside the sandbox's file system")
        if self.work.holds(lexical):
            shown = os.path.relpath(lexical, self.real)
        else:
            shown = lexical
        return Resolved(real, shown, is_root)

    @staticmethod
    def _unresolved_link(base: _Base, real: str) -> bool:
        """Whether a realpath() result still holds a symlink: one it could not read. WASI
        refuses to read links that point out of the preopened root, and a non-strict realpath
        then leaves them in place, looking as if they were inside."""
        path = base.real
        for part in os.path.relpath(real, base.real).split(os.sep):
            if part == ".":
                continue
            path = os.path.join(path, part)
            if os.path.islink(path):
                return True
        return False


def _text(name: str) -> str:
    """A file name as wire text: names that are not UTF-8 get U+FFFD where they are not (msgpack
    cannot encode the surrogates Python keeps them in)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name


def stat_entry(name: str, path: str, st: os.stat_result) -> dict[str, Any]:
    mode = st.st_mode
    if stat_mod.S_ISREG(mode):
        kind = "file"
    elif stat_mod.S_ISDIR(mode):
        kind = "dir"
    elif stat_mod.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    return {
        "name": _text(name),
        "path": _text(path),
        "type": kind,
        "size": st.st_size,
        "mtime": st.st_mtime,
        "mode": stat_mod.S_IMODE(mode),
    }


#: O_NONBLOCK: opening a FIFO must not block the request loop (regular files ignore it).
_OPEN_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _check_regular(st: os.stat_result, path: str) -> None:
    """fs.read and fs.write take regular files only: a FIFO or a device could block forever."""
    if stat_mod.S_ISDIR(st.st_mode):
        raise os_error(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)), path)
    if not stat_mod.S_ISREG(st.st_mode):
        raise ProtocolError("io_error", f"not a regular file: {path!r:.300}")


def _makedirs(path: str) -> None:
    """os.makedirs(exist_ok=True), except that a folder that exists is left alone: under WASI a
    preopen's parent ("/") does not exist, and makedirs would climb to it and fail."""
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)


def _path(message: Mapping[str, Any], name: str = "path") -> str:
    return field(message, name, str)  # type: ignore[no-any-return]


def _non_negative(message: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = field(message, name, int, default)
    if value is not None and value < 0:
        raise ProtocolError("bad_request", f"field {name!r} must not be negative")
    return value  # type: ignore[no-any-return]


class FileOps:
    """The fs.* ops except fs.read's streaming, which the agent drives (see `open_read`)."""

    def __init__(self, root: Root) -> None:
        self.root = root

    def stat(self, message: Mapping[str, Any]) -> dict[str, Any]:
        path = _path(message)
        target = self.root.resolve(path, follow=False)
        try:
            st = os.lstat(target.real)
        except OSError as exc:
            raise os_error(exc, path) from None
        name = "." if target.rel == "." else (os.path.basename(target.rel) or target.rel)
        return stat_entry(name, target.rel, st)

    def list(self, message: Mapping[str, Any]) -> dict[str, Any]:
        path = _path(message)
        depth = field(message, "depth", int, 1)
        if not 1 <= depth <= MAX_LIST_DEPTH:
            raise ProtocolError("bad_request", f"'depth' must be between 1 and {MAX_LIST_DEPTH}")
        target = self.root.resolve(path)
        entries: list[dict[str, Any]] = []
        budget = MAX_LIST_BYTES
        truncated = False
        # Breadth first, so a truncated listing keeps the shallow entries.
        queue: deque[tuple[str, str, int]] = deque([(target.real, "", 1)])
        while queue and not truncated:
            directory, prefix, level = queue.popleft()
            room = MAX_LIST_ENTRIES - len(entries)
            try:
                with os.scandir(directory) as it:
                    batch: list[os.DirEntry[str]] = []
                    for item in it:  # bounded: never hold a huge directory in memory
                        if len(batch) == room:
                            truncated = True
                            break
                        batch.append(item)
            except OSError as exc:
                if level == 1:
                    raise os_error(exc, path) from None
                continue  # an unreadable subdirectory is skipped, its entry is listed
            for item in sorted(batch, key=lambda e: e.name):
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                rel = prefix + item.name
                budget -= 2 * len(_text(item.name)) + len(_text(prefix)) + _ENTRY_OVERHEAD
                if budget < 0:
                    truncated = True
                    break
                entries.append(stat_entry(item.name, rel, st))
                if level < depth and stat_mod.S_ISDIR(st.st_mode):
                    queue.append((item.path, rel + "/", level + 1))
        return {"entries": entries, "truncated": truncated}

    def open_read(self, message: Mapping[str, Any]) -> tuple[int, int, int, int | None]:
        """Open a file for an fs.read stream: (fd, file size, offset, length or None).

        Errors surface here, before the stream starts, so they are plain error replies.
        """
        path = _path(message)
        offset = _non_negative(message, "offset", 0) or 0
        length = _non_negative(message, "length", None)
        target = self.root.resolve(path)
        try:
            fd = os.open(target.real, os.O_RDONLY | _OPEN_FLAGS)
        except OSError as exc:
            raise os_error(exc, path) from None
        try:
            st = os.fstat(fd)
            _check_regular(st, path)
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            raise os_error(exc, path) from None
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size, offset, length

    def write(self, message: Mapping[str, Any]) -> dict[str, Any]:
        path = _path(message)
        data = field(message, "data", bytes)
        if len(data) > MAX_WRITE_CHUNK:
            raise ProtocolError("frame_too_large", f"fs.write takes at most {MAX_WRITE_CHUNK} bytes per request")
        offset = _non_negative(message, "offset", 0) or 0
        truncate = field(message, "truncate", bool, False)
        target = self.root.resolve(path)
        flags = os.O_WRONLY | os.O_CREAT | _OPEN_FLAGS | getattr(os, "O_NOFOLLOW", 0)
        if truncate:
            flags |= os.O_TRUNC
        try:
            fd = os.open(target.real, flags, 0o644)
            try:
                _check_regular(os.fstat(fd), path)
                if offset:
                    os.lseek(fd, offset, os.SEEK_SET)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {"bytes": len(data), "size": size}

    def mkdir(self, message: Mapping[str, Any]) -> dict[str, Any]:
        path = _path(message)
        parents = field(message, "parents", bool, True)
        target = self.root.resolve(path)
        try:
            if parents:
                _makedirs(target.real)
            else:
                os.mkdir(target.real)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {}

    def move(self, message: Mapping[str, Any]) -> dict[str, Any]:
        src_path, dst_path = _path(message, "src"), _path(message, "dst")
        src = self.root.resolve(src_path, follow=False)
        dst = self.root.resolve(dst_path, follow=False)
        if src.is_root or dst.is_root:
            raise ProtocolError("bad_request", "a root of the sandbox's file system cannot be moved or replaced")
        try:
            os.lstat(src.real)
            try:
                os.replace(src.real, dst.real)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                import shutil  # rare paths; not worth its import at every sandbox start

                shutil.move(src.real, dst.real)  # another file system inside the root
        except OSError as exc:
            raise os_error(exc, src_path) from None
        return {}

    def remove(self, message: Mapping[str, Any]) -> dict[str, Any]:
        path = _path(message)
        recursive = field(message, "recursive", bool, False)
        target = self.root.resolve(path, follow=False)
        if target.is_root:
            raise ProtocolError("bad_request", "a root of the sandbox's file system cannot be removed")
        try:
            _remove(target.real, recursive=recursive)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {}


    def patch(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """One fs.patch action (the schema checked its fields). Parents are made as needed;
        `remove` of a missing path and `mkdir` of an existing directory succeed, so a list of
        patches can be applied again."""
        path = _path(message)
        action = message["action"]
        if "mode" in message and not (hasattr(os, "fchmod") and hasattr(os, "chmod")):
            raise ProtocolError("unsupported", "this sandbox's file system has no permission bits (WASI): "
                                               "leave out 'mode'")
        follow = action in ("text", "append", "mkdir")
        target = self.root.resolve(path, follow=follow)
        if target.is_root and action != "mkdir":
            raise ProtocolError("bad_request", f"a {action} patch cannot replace a root of the file system")
        try:
            if action != "remove":
                _makedirs(os.path.dirname(target.real))
            if action in ("text", "append"):
                data = message["data"] if "data" in message else message["text"].encode("utf-8")
                flags = os.O_WRONLY | os.O_CREAT | _OPEN_FLAGS | getattr(os, "O_NOFOLLOW", 0)
                flags |= os.O_APPEND if action == "append" else os.O_TRUNC
                fd = os.open(target.real, flags, 0o644)
                try:
                    _check_regular(os.fstat(fd), path)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    if "mode" in message:
                        os.fchmod(fd, message["mode"])
                finally:
                    os.close(fd)
            elif action == "mkdir":
                _makedirs(target.real)
                if "mode" in message:
                    os.chmod(target.real, message["mode"])
            elif action == "symlink":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target.real)
                os.symlink(message["target"], target.real)
            elif action == "copy":
                source = self.root.resolve(message["src"], follow=False)
                import shutil

                if os.path.isdir(source.real) and not os.path.islink(source.real):
                    shutil.copytree(source.real, target.real, symlinks=True, dirs_exist_ok=True)
                else:
                    shutil.copy2(source.real, target.real, follow_symlinks=False)
            else:  # remove
                with contextlib.suppress(FileNotFoundError):
                    _remove(target.real, recursive=True)
        except OSError as exc:
            raise os_error(exc, path) from None
        return {}


def _remove(real: str, *, recursive: bool) -> None:
    """Remove a file or link, or a folder (with what is in it when `recursive`), never following
    a link."""
    if stat_mod.S_ISDIR(os.lstat(real).st_mode):
        if recursive:
            import shutil  # rare paths; not worth its import at every sandbox start

            shutil.rmtree(real)
        else:
            os.rmdir(real)
    else:
        os.unlink(real)


def read_chunks(fd: int, length: int | None) -> Iterator[bytes]:
    """Yield the file's bytes from its current position in chunks of at most CHUNK_SIZE."""
    remaining = length
    while remaining is None or remaining > 0:
        want = CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining)
        data = os.read(fd, want)
        if not data:
            return
        if remaining is not None:
            remaining -= len(data)
        yield data
