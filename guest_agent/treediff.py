"""Snapshots of a directory tree, and what changed between two of them.

`snapshot(top)` records every entry under `top` (bounded), keyed by its path relative to `top`
("/"-separated, as fs.list shows paths); `diff(old, new)` says what was created, modified, deleted
and (with `moves=True`) moved. Comparing snapshots rather than listening to events makes the
answer robust to editors that replace a file by writing a temporary one and renaming it over the
original: the path is there before and after, with another inode, so it is `modified`.

Used by fs.watch's polling backend (guest_agent/watch.py, where the guest has no inotify: WASI)
and meant for the change tracking of exec results too. Stdlib only (the agent runs on WASI);
`diff` is pure, `snapshot` only reads the file system.
"""

from __future__ import annotations

import os
import stat as stat_mod
from collections import deque
from dataclasses import dataclass, field

#: The most entries one snapshot records (beyond them it is `truncated`).
MAX_ENTRIES = 10_000

CREATED, MODIFIED, DELETED, MOVED = "created", "modified", "deleted", "moved"


@dataclass(frozen=True)
class Entry:
    """What a snapshot keeps of one entry: enough to tell a change, nothing of its content."""

    is_dir: bool
    ino: int
    size: int
    mtime_ns: int


@dataclass
class Snapshot:
    """A tree's entries by relative path. `truncated`: the tree held more than the bound, and the
    entries past it (breadth first, sorted by name within a directory) are not recorded.
    `missing`: `top` itself was gone (or not a directory)."""

    entries: dict[str, Entry] = field(default_factory=dict)
    truncated: bool = False
    missing: bool = False


@dataclass(frozen=True)
class Change:
    """One change: `kind` is created, modified, deleted or moved (then `src` is the old path)."""

    kind: str
    path: str
    is_dir: bool
    src: str | None = None


def _entry(st: os.stat_result) -> Entry:
    return Entry(stat_mod.S_ISDIR(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns)


def snapshot(top: str, *, recursive: bool = True, max_entries: int = MAX_ENTRIES) -> Snapshot:
    """Record the tree under the real path `top` (symlinks are entries, never followed).

    Breadth first and sorted, so a truncated snapshot keeps the same shallow entries each time.
    An entry that vanishes while it is read is left out; an unreadable subdirectory is an entry
    without children."""
    snap = Snapshot()
    try:
        if not stat_mod.S_ISDIR(os.stat(top).st_mode):
            snap.missing = True
            return snap
    except OSError:
        snap.missing = True
        return snap
    queue: deque[tuple[str, str]] = deque([(top, "")])
    while queue:
        directory, prefix = queue.popleft()
        try:
            with os.scandir(directory) as it:
                items = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for item in items:
            if len(snap.entries) >= max_entries:
                snap.truncated = True
                return snap
            try:
                entry = _entry(item.stat(follow_symlinks=False))
            except OSError:
                continue
            rel = prefix + item.name
            snap.entries[rel] = entry
            if recursive and entry.is_dir:
                queue.append((item.path, rel + "/"))
    return snap


def _under(path: str, folder: str) -> bool:
    return path.startswith(folder + "/")


def diff(old: Snapshot, new: Snapshot, *, moves: bool = False) -> list[Change]:
    """What turned `old` into `new`, in an order a client can apply: moves, then deletions
    (deepest first), then creations (shallowest first), then modifications.

    A file is modified when its size, mtime or inode differ (a directory is never `modified`: its
    own mtime only says that its entries changed, and those are reported themselves). An entry
    whose kind changed (a file replaced by a directory) is deleted and created. With `moves`, a
    deleted and a created entry with the same inode are one move; a moved directory's entries
    that moved with it are not reported again."""
    before, after = old.entries, new.entries
    deleted = [p for p in before if p not in after or after[p].is_dir != before[p].is_dir]
    created = [p for p in after if p not in before or after[p].is_dir != before[p].is_dir]
    modified = [p for p, e in after.items() if p in before and not e.is_dir and not before[p].is_dir
                and (e.ino, e.size, e.mtime_ns) != (before[p].ino, before[p].size, before[p].mtime_ns)]
    moved: list[Change] = []
    if moves and deleted and created:
        by_inode = {(before[p].ino, before[p].is_dir): p for p in deleted}
        dir_moves: list[tuple[str, str]] = []
        for path in sorted(created, key=lambda p: (p.count("/"), p)):
            src = by_inode.pop((after[path].ino, after[path].is_dir), None)
            if src is None or any(_under(path, dst) and _under(src, s) and src[len(s):] == path[len(dst):]
                                  for s, dst in dir_moves):
                if src is not None:  # moved along with its directory: not a change of its own
                    deleted.remove(src)
                    created.remove(path)
                    if _changed(before[src], after[path]):
                        modified.append(path)
                continue
            moved.append(Change(MOVED, path, after[path].is_dir, src))
            deleted.remove(src)
            created.remove(path)
            if after[path].is_dir:
                dir_moves.append((src, path))
            elif _changed(before[src], after[path], ino=False):
                modified.append(path)
    changes = moved
    changes += [Change(DELETED, p, before[p].is_dir) for p in sorted(deleted, key=lambda p: (-p.count("/"), p))]
    changes += [Change(CREATED, p, after[p].is_dir) for p in sorted(created, key=lambda p: (p.count("/"), p))]
    changes += [Change(MODIFIED, p, False) for p in sorted(modified)]
    return changes


def _changed(a: Entry, b: Entry, *, ino: bool = True) -> bool:
    if a.is_dir or b.is_dir:
        return False
    return (a.size, a.mtime_ns) != (b.size, b.mtime_ns) or (ino and a.ino != b.ino)
