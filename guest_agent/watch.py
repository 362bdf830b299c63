"""fs.watch: a directory's changes as a stream of `change` events (docs/protocol.md §3, fs.watch).

Two backends, chosen per watch:

- inotify (a Linux guest with threads: microVM, pod): the kernel's events, read through ctypes on a
  thread per watch. A recursive watch adds a watch for each directory, and for each new one as it
  appears (its contents, which may have arrived before its watch did, are reported as created);
  IN_MOVED_FROM/IN_MOVED_TO pairs become one `moved`; a full kernel queue (IN_Q_OVERFLOW) becomes
  an `overflow` event.
- polling (no inotify: WASI, or a guest whose kernel lacks it): a snapshot of the tree every
  `poll_interval` seconds, diffed with the previous one (guest_agent/treediff.py). On a
  single-threaded agent the request loop runs the polls between requests (`WatchRegistry.due`);
  while an exec runs there, nothing is polled, and its changes are reported after it.

Events are coalesced over a short window (`SETTLE_S`, or one poll), per path: created then
modified is `created`; modified twice is one `modified`; created then deleted is nothing; deleted
then created is `modified`; a file created and renamed within the window (an editor's write to a
temporary file and rename over the original) is `created` at its final name, or `modified` when a
file of that name existed before. `overflow` means changes were lost (the kernel's queue was full,
or the tree grew past `MAX_WATCH_ENTRIES`): re-list to resync. Paths are relative to the watched
directory, "/"-separated, as fs.list shows its entries.

Stdlib only; ctypes is imported only where inotify is tried.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._log import log_exception
from .fsops import Root, os_error
from .records import Stream
from .treediff import CREATED, DELETED, MODIFIED, MOVED, Change, diff, snapshot
from .wire import ProtocolError, field

#: Watches one sandbox may have at a time.
MAX_WATCHES = 16
#: The most entries (files and directories) one watch follows; a tree past it gets `overflow`.
MAX_WATCH_ENTRIES = 10_000
#: inotify: how long a batch waits for more events to coalesce with, and at most in all.
SETTLE_S = 0.025
MAX_BATCH_S = 0.25
#: How long `stop` waits for a watch's thread.
STOP_WAIT_S = 2.0
OVERFLOW = "overflow"
BACKEND_INOTIFY, BACKEND_POLL = "inotify", "poll"


def _text(name: str) -> str:
    """A name as wire text (msgpack cannot carry the surrogates of a name that is not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _under(path: str, folder: str) -> bool:
    return folder == "" or path == folder or path.startswith(folder + "/")


# ---------------------------------------------------------------------------------------------
# Coalescing (sans-I/O)
# ---------------------------------------------------------------------------------------------


class Coalescer:
    """One batch of raw changes, folded per path (module doc). `existed(path)` says whether a path
    existed when the batch began; it is asked at a path's first mention, before the caller applies
    that change to what it knows."""

    def __init__(self, existed: Callable[[str], bool]) -> None:
        self._existed = existed
        self._before: dict[str, bool] = {}
        self._out: dict[str, Change] = {}  # by path (a move: by its destination), in order
        self.overflowed = False

    def _was(self, path: str) -> bool:
        if path not in self._before:
            self._before[path] = self._existed(path)
        return self._before[path]

    def created(self, path: str, is_dir: bool) -> None:
        existed = self._was(path)
        prev = self._out.pop(path, None)
        if existed and not is_dir and (prev is None or prev.kind == DELETED):
            self._out[path] = Change(MODIFIED, path, False)  # replaced
        else:
            self._out[path] = Change(CREATED, path, is_dir)

    def modified(self, path: str) -> None:
        self._was(path)
        prev = self._out.get(path)
        if prev is None or prev.kind == DELETED:
            self._out[path] = Change(MODIFIED, path, False)

    def deleted(self, path: str, is_dir: bool) -> None:
        existed = self._was(path)
        prev = self._out.pop(path, None)
        if is_dir:  # what was created inside it within the batch never was, for the client
            for key in [k for k, c in self._out.items() if _under(k, path) and c.kind != DELETED]:
                del self._out[key]
        if prev is not None and prev.kind == MOVED and prev.src is not None:
            self.deleted(prev.src, is_dir)  # what moved here is gone from where it was
            if not existed:
                return
        if prev is not None and prev.kind == CREATED and not existed:
            return
        self._out[path] = Change(DELETED, path, is_dir)

    def moved(self, src: str, dst: str, is_dir: bool) -> None:
        self._was(src)
        dst_existed = self._was(dst)
        prev = self._out.pop(src, None)
        if prev is not None and prev.kind == CREATED:
            self._out.pop(dst, None)
            kind = MODIFIED if dst_existed and not is_dir else CREATED
            self._out[dst] = Change(kind, dst, is_dir)
            if is_dir:
                self._rename(src, dst)
            return
        origin = prev.src if prev is not None and prev.kind == MOVED and prev.src is not None else src
        self._out.pop(dst, None)
        if origin == dst:  # moved away and back within the batch
            if not is_dir:
                self._out[dst] = Change(MODIFIED, dst, False)
            return
        self._out[dst] = Change(MOVED, dst, is_dir, origin)
        if is_dir:
            self._rename(src, dst)

    def _rename(self, src: str, dst: str) -> None:
        """Entries created inside a directory that then moved are reported at their new path."""
        for key in [k for k in self._out if k.startswith(src + "/")]:
            change = self._out.pop(key)
            path = dst + key[len(src):]
            self._out[path] = Change(change.kind, path, change.is_dir, change.src)

    def overflow(self) -> None:
        self.overflowed = True

    def changes(self) -> list[Change]:
        out = list(self._out.values())
        if self.overflowed:
            out.append(Change(OVERFLOW, "", True))
        return out


# ---------------------------------------------------------------------------------------------
# inotify (ctypes)
# ---------------------------------------------------------------------------------------------

IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_EXCL_UNLINK = 0x4000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCH_MASK = (IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
              | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)
_EVENT = struct.Struct("iIII")
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class RawEvent:
    wd: int
    mask: int
    cookie: int
    name: str


def parse_events(data: bytes) -> list[RawEvent]:
    """inotify_event records, as read(2) returns them."""
    events = []
    pos = 0
    while pos + _EVENT.size <= len(data):
        wd, mask, cookie, length = _EVENT.unpack_from(data, pos)
        raw = data[pos + _EVENT.size: pos + _EVENT.size + length].split(b"\0", 1)[0]
        events.append(RawEvent(wd, mask, cookie, os.fsdecode(raw)))
        pos += _EVENT.size + length
    return events


class _Libc:
    """inotify_init1, inotify_add_watch and inotify_rm_watch from the C library."""

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._ctypes = ctypes
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.add = libc.inotify_add_watch
        self.add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.rm = libc.inotify_rm_watch
        self.rm.argtypes = [ctypes.c_int, ctypes.c_int]

    def check(self, result: int, path: str | None = None) -> int:
        if result < 0:
            errno = self._ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), path)
        return result


_libc: _Libc | None = None
_libc_error: str | None = None


def inotify_available() -> bool:
    """Whether this guest has inotify (a C library that offers it, a kernel that allows it)."""
    global _libc, _libc_error
    if _libc is None and _libc_error is None:
        try:
            libc = _Libc()
            os.close(libc.check(libc.init1(IN_NONBLOCK | IN_CLOEXEC)))
            _libc = libc
        except (ImportError, OSError, AttributeError) as exc:
            _libc_error = f"{type(exc).__name__}: {exc}"
    return _libc is not None


class WatchEnded(Exception):
    """The watched directory itself went away (removed, or moved): the watch cannot go on."""


class InotifyTree:
    """The inotify side of one watch: its fd, the directories it watches, the entries it knows."""

    def __init__(self, top: str, recursive: bool, max_entries: int) -> None:
        assert _libc is not None
        self._libc = _libc
        self.top = top
        self.recursive = recursive
        self.max_entries = max_entries
        self.fd = self._libc.check(self._libc.init1(IN_NONBLOCK | IN_CLOEXEC))
        self._dirs: dict[int, str] = {}  # wd -> the directory's relative path ("" is the top)
        self._known: dict[str, bool] = {}  # relative path -> is a directory
        self._full = False
        try:
            self._add_dir("", None, first=True)
        except BaseException:
            self.close()
            raise

    @property
    def entries(self) -> int:
        return len(self._known)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _add_dir(self, rel: str, batch: Coalescer | None, *, first: bool = False) -> None:
        """Watch the directory `rel` and learn its entries (recursively when the watch is); with
        `batch`, what is found is reported as created (it arrived before the watch could see it)."""
        real = os.path.join(self.top, rel) if rel else self.top
        try:
            wd = self._libc.check(self._libc.add(self.fd, os.fsencode(real), WATCH_MASK), rel)
        except OSError:
            if rel == "":
                raise
            return  # gone again, or not a directory any more: its own events say so
        self._dirs[wd] = rel
        found = snapshot(real, recursive=self.recursive, max_entries=self.max_entries - len(self._known) + 1)
        if first and (found.truncated or len(found.entries) > self.max_entries):
            raise ProtocolError("bad_request", f"the directory holds more than {self.max_entries} entries: watch a "
                                               "narrower one (or not recursively)")
        for name, entry in found.entries.items():
            path = _join(rel, _text(name))
            if len(self._known) >= self.max_entries:
                self._overflow(batch)
                return
            if path in self._known:
                continue
            self._known[path] = entry.is_dir
            if batch is not None:
                batch.created(path, entry.is_dir)
            if entry.is_dir and self.recursive:
                try:
                    sub = self._libc.check(self._libc.add(self.fd, os.fsencode(os.path.join(self.top, path)),
                                                          WATCH_MASK), path)
                except OSError:
                    continue
                self._dirs[sub] = path
        if found.truncated:
            self._overflow(batch)

    def _overflow(self, batch: Coalescer | None) -> None:
        if batch is not None and not self._full:
            batch.overflow()
        self._full = True

    def read(self) -> list[RawEvent]:
        try:
            return parse_events(os.read(self.fd, _READ_SIZE))
        except BlockingIOError:
            return []

    def apply(self, events: list[RawEvent], batch: Coalescer) -> None:
        """Fold one read's events into `batch`, keeping the watched directories and known entries
        up to date as they go (a directory's moves rename what is under it).

        Raises:
            WatchEnded: the watched directory was removed or moved.
        """
        moves: dict[int, tuple[str, bool]] = {}  # cookie -> (moved-from path, is a directory)
        for ev in events:
            if ev.mask & IN_Q_OVERFLOW:
                batch.overflow()
                self._resync()
                continue
            folder = self._dirs.get(ev.wd)
            if folder is None:
                continue  # a watch already removed
            if ev.mask & IN_IGNORED:
                del self._dirs[ev.wd]
                if folder == "":
                    raise WatchEnded("the watched directory was removed")
                continue
            if ev.mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                if folder == "":
                    raise WatchEnded("the watched directory was removed or moved")
                continue
            path = _join(folder, _text(ev.name))
            is_dir = bool(ev.mask & IN_ISDIR)
            if ev.mask & IN_CREATE:
                self._created(path, is_dir, batch)
            elif ev.mask & (IN_MODIFY | IN_CLOSE_WRITE):
                if path in self._known and not is_dir:
                    batch.modified(path)
            elif ev.mask & IN_DELETE:
                batch.deleted(path, is_dir)
                self._forget(path)
            elif ev.mask & IN_MOVED_FROM:
                moves[ev.cookie] = (path, is_dir)
            elif ev.mask & IN_MOVED_TO:
                origin = moves.pop(ev.cookie, None)
                if origin is None:  # moved in from outside the watched tree
                    self._created(path, is_dir, batch)
                else:
                    batch.moved(origin[0], path, is_dir)
                    self._renamed(origin[0], path, is_dir)
        for path, is_dir in moves.values():  # moved out of the watched tree
            batch.deleted(path, is_dir)
            self._forget(path, unwatch=True)

    def pending_move(self, events: list[RawEvent]) -> bool:
        """Whether the read ends in an IN_MOVED_FROM whose IN_MOVED_TO may follow in the next read."""
        cookies = {e.cookie for e in events if e.mask & IN_MOVED_FROM}
        cookies -= {e.cookie for e in events if e.mask & IN_MOVED_TO}
        return bool(cookies)

    def _created(self, path: str, is_dir: bool, batch: Coalescer) -> None:
        if path in self._known and not self._known[path] == is_dir:
            self._forget(path, unwatch=True)
        if path not in self._known and len(self._known) >= self.max_entries:
            self._overflow(batch)
            return
        batch.created(path, is_dir)
        self._known[path] = is_dir
        if is_dir and self.recursive:
            self._add_dir(path, batch)

    def _forget(self, path: str, *, unwatch: bool = False) -> None:
        self._known.pop(path, None)
        for key in [k for k in self._known if k.startswith(path + "/")]:
            del self._known[key]
        for wd, folder in list(self._dirs.items()):
            if folder == path or folder.startswith(path + "/"):
                if unwatch:  # moved out: its watch would report from outside the tree
                    self._libc.rm(self.fd, wd)
                del self._dirs[wd]
        if len(self._known) < self.max_entries:
            self._full = False

    def _renamed(self, src: str, dst: str, is_dir: bool) -> None:
        if dst in self._known and not is_dir:
            self._known.pop(dst)
        self._known.pop(src, None)
        self._known[dst] = is_dir
        if not is_dir:
            return
        for key in [k for k in self._known if k.startswith(src + "/")]:
            self._known[dst + key[len(src):]] = self._known.pop(key)
        for wd, folder in self._dirs.items():
            if folder == src or folder.startswith(src + "/"):
                self._dirs[wd] = dst + folder[len(src):]

    def existed(self, path: str) -> bool:
        return path in self._known

    def _resync(self) -> None:
        """After an overflow: learn the tree again (the client was told to re-list)."""
        for wd in list(self._dirs):
            if self._dirs[wd] != "":
                self._libc.rm(self.fd, wd)
                del self._dirs[wd]
        self._known.clear()
        self._full = False
        top_wd = next(iter(self._dirs), None)
        if top_wd is not None:
            del self._dirs[top_wd]
        self._add_dir("", None)


class PollTree:
    """The polling side of one watch: the last snapshot, diffed with each new one."""

    def __init__(self, top: str, recursive: bool, max_entries: int) -> None:
        self.top = top
        self.recursive = recursive
        self.max_entries = max_entries
        self.last = snapshot(top, recursive=recursive, max_entries=max_entries)
        if self.last.missing:
            raise ProtocolError("not_found", "the directory to watch is gone")
        if self.last.truncated:
            raise ProtocolError("bad_request", f"the directory holds more than {max_entries} entries: watch a "
                                               "narrower one (or not recursively)")

    @property
    def entries(self) -> int:
        return len(self.last.entries)

    def poll(self) -> list[Change]:
        """What changed since the last poll.

        Raises:
            WatchEnded: the watched directory is gone.
        """
        new = snapshot(self.top, recursive=self.recursive, max_entries=self.max_entries)
        if new.missing:
            raise WatchEnded("the watched directory was removed or moved")
        changes = diff(self.last, new, moves=True)
        if new.truncated and not self.last.truncated:
            changes.append(Change(OVERFLOW, "", True))
        self.last = new
        return changes


# ---------------------------------------------------------------------------------------------
# The watches of one agent
# ---------------------------------------------------------------------------------------------


class Watch:
    """One fs.watch stream."""

    def __init__(self, watch_id: str, stream: Stream, tree: InotifyTree | PollTree, interval: float) -> None:
        self.watch_id = watch_id
        self.stream = stream
        self.tree = tree
        self.interval = interval
        self.next_poll = time.monotonic() + interval
        self.stopping = False
        self._wake_r, self._wake_w = (-1, -1)
        self.thread: threading.Thread | None = None

    @property
    def backend(self) -> str:
        return BACKEND_INOTIFY if isinstance(self.tree, InotifyTree) else BACKEND_POLL

    def emit(self, changes: list[Change]) -> None:
        for change in changes:
            fields: dict[str, Any] = {"change": change.kind, "path": change.path, "dir": change.is_dir}
            if change.src is not None:
                fields["src"] = change.src
            self.stream.emit("change", **fields)

    def end(self, error: ProtocolError | None = None) -> None:
        if isinstance(self.tree, InotifyTree):
            self.tree.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if error is None:
            self.stream.emit("end")
        else:
            self.stream.emit("end", error=error.to_wire())

    # -- polling ---------------------------------------------------------------------------------

    def poll_once(self) -> bool:
        """One poll; False once the watch ended (its directory went away)."""
        assert isinstance(self.tree, PollTree)
        try:
            self.emit(self.tree.poll())
        except WatchEnded as exc:
            self.emit([Change(DELETED, "", True)])
            self.end(ProtocolError("not_found", str(exc)))
            return False
        self.next_poll = time.monotonic() + self.interval
        return True

    # -- a thread per watch (where there are threads) --------------------------------------------

    def run_thread(self, on_done: Callable[[], None]) -> None:
        self._wake_r, self._wake_w = os.pipe()
        self.thread = threading.Thread(target=self._run, args=(on_done,), name=f"watch-{self.watch_id}", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        self.stopping = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _run(self, on_done: Callable[[], None]) -> None:
        error: ProtocolError | None = None
        try:
            if isinstance(self.tree, InotifyTree):
                self._run_inotify(self.tree)
            else:
                while not self.stopping:
                    select.select([self._wake_r], [], [], max(0.0, self.next_poll - time.monotonic()))
                    if self.stopping or not self.poll_once():
                        return
        except WatchEnded as exc:
            self.emit([Change(DELETED, "", True)])
            error = ProtocolError("not_found", str(exc))
        except Exception as exc:
            log_exception(f"watch {self.watch_id} failed")
            error = ProtocolError("internal", f"{type(exc).__name__}: {exc}")
        finally:
            on_done()
        if error is not None or self.stopping:
            self.end(error)

    def _run_inotify(self, tree: InotifyTree) -> None:
        while not self.stopping:
            ready, _, _ = select.select([tree.fd, self._wake_r], [], [])
            if self.stopping:
                return
            if tree.fd not in ready:
                continue
            batch = Coalescer(tree.existed)
            started = time.monotonic()
            try:
                while True:
                    events = tree.read()
                    if tree.pending_move(events):
                        events += self._next_read(tree)
                    tree.apply(events, batch)
                    left = MAX_BATCH_S - (time.monotonic() - started)
                    if left <= 0:
                        break
                    ready, _, _ = select.select([tree.fd, self._wake_r], [], [], min(SETTLE_S, left))
                    if tree.fd not in ready or self.stopping:
                        break
            finally:  # the batch's changes go out, also before the end of a watch whose directory went
                self.emit(batch.changes())

    @staticmethod
    def _next_read(tree: InotifyTree) -> list[RawEvent]:
        """A read that ends in an unpaired IN_MOVED_FROM: its IN_MOVED_TO is probably in the
        kernel's next record, so read once more (briefly) before deciding it moved out."""
        ready, _, _ = select.select([tree.fd], [], [], SETTLE_S)
        return tree.read() if ready else []


class WatchRegistry:
    """The agent's watches: fs.watch starts one, fs.unwatch stops it, shutdown stops them all.

    Args:
        root: where watched paths are resolved (and confined).
        threads: run each watch on its own thread (else the request loop polls: `due`).
    """

    def __init__(self, root: Root, *, threads: bool) -> None:
        self.root = root
        self.threads = threads
        self._lock = threading.Lock()
        self._watches: dict[str, Watch] = {}

    def start(self, stream: Stream, message: Mapping[str, Any]) -> None:
        watch_id = field(message, "watch_id", str)  # the gateway always names it on this leg
        path = message["path"]
        with self._lock:
            if watch_id in self._watches:
                raise ProtocolError("exists", f"watch {watch_id!r:.80} is running")
            if len(self._watches) >= MAX_WATCHES:
                raise ProtocolError("busy", f"{MAX_WATCHES} watches are running; stop one first (fs.unwatch)")
        target = self.root.resolve(path)
        try:
            if not os.path.isdir(target.real):
                os.stat(target.real)  # raises FileNotFoundError for a missing one
                raise NotADirectoryError(20, "Not a directory")
        except OSError as exc:
            raise os_error(exc, path) from None
        recursive, interval = message["recursive"], float(message["poll_interval"])
        tree: InotifyTree | PollTree
        if self.threads and inotify_available():
            try:
                tree = InotifyTree(target.real, recursive, MAX_WATCH_ENTRIES)
            except OSError as exc:  # out of inotify instances or watches: poll instead
                if exc.errno not in (24, 28):  # EMFILE, ENOSPC
                    raise os_error(exc, path) from None
                tree = PollTree(target.real, recursive, MAX_WATCH_ENTRIES)
        else:
            tree = PollTree(target.real, recursive, MAX_WATCH_ENTRIES)
        watch = Watch(watch_id, stream, tree, interval)
        with self._lock:
            if watch_id in self._watches or len(self._watches) >= MAX_WATCHES:
                if isinstance(tree, InotifyTree):
                    tree.close()
                raise ProtocolError("busy", "another fs.watch took the place meanwhile")
            self._watches[watch_id] = watch
        stream.emit("start", watch_id=watch_id, backend=watch.backend, entries=tree.entries)
        if self.threads:
            watch.run_thread(lambda: self._discard(watch))

    def _discard(self, watch: Watch) -> None:
        with self._lock:
            if self._watches.get(watch.watch_id) is watch:
                del self._watches[watch.watch_id]

    def stop(self, watch_id: str) -> dict[str, Any]:
        with self._lock:
            watch = self._watches.get(watch_id)
        if watch is None:
            raise ProtocolError("not_found", f"no watch {watch_id!r:.80}")
        self._stop(watch)
        return {}

    def _stop(self, watch: Watch) -> None:
        if watch.thread is None:
            self._discard(watch)
            watch.end()
            return
        watch.wake()
        watch.thread.join(STOP_WAIT_S)

    def due(self) -> float | None:
        """Single thread: run the polls that are due; the seconds until the next (None: none)."""
        with self._lock:
            watches = [w for w in self._watches.values() if w.thread is None]
        now = time.monotonic()
        for watch in watches:
            if watch.next_poll <= now and not watch.poll_once():
                self._discard(watch)
        with self._lock:
            times = [w.next_poll for w in self._watches.values() if w.thread is None]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def close(self) -> None:
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            self._stop(watch)
