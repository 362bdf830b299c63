"""Change tracking: which files an exec (or anything since a token) created, modified, deleted.

The tracked roots are the sandbox's working directory (/work) and every other tracked directory:
the agent's fs roots except "/" (WASM's preopens: volumes, mounts), plus the ones the gateway names
with `fs.changes{track}` (a microVM's or pod's volumes and mounts, which live under the fs root /).
A snapshot of them (guest_agent/treediff.py: path -> kind, size, mtime_ns, inode, bounded) is taken
when an exec starts and compared with one taken when it ends: comparing snapshots rather than
listening to events gets an editor's write-a-temporary-and-rename right (`modified`).

Paths are named as the files API names them: relative to the working directory for files under it,
absolute elsewhere. The gateway's own `.sandgate/` folder (invoke reports) is left out.

Named snapshots (`fs.changes`): the tracker keeps a base (taken when the gateway hands the sandbox
out, or at start), the last KEPT_TOKENS tokens it gave out, and the gateway's pinned names (a host
mount's sync point, `mount:<path>`), at most MAX_PINNED of them. Stdlib only (it runs on WASI).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from . import treediff
from .fsops import Root
from .wire import ProtocolError

#: Left out of tracking: where invoke's reports go (gateway/functions/harness.py REPORT_DIR).
PRIVATE_DIR = ".sandgate"
#: Generated tokens kept (least recently made out first); an older one is refused with not_found.
KEPT_TOKENS = 8
#: Names the gateway pins (one per host mount) at most.
MAX_PINNED = 32
#: Entries a snapshot records over all tracked roots; past it the answer says `truncated`.
MAX_ENTRIES = treediff.MAX_ENTRIES
#: Characters of paths one answer lists at most (the agent's frames are 1 MiB at most).
MAX_LISTED_CHARS = 256 * 1024


def files_of(changes: Iterable[treediff.Change], *, truncated: bool) -> dict[str, Any]:
    """The `files` shape of exec ends and results: sorted path lists of files and directories,
    at most MAX_LISTED_CHARS of paths in all (so an exec's `end` always fits in a frame); past
    the snapshot's bound or that one, `truncated: true`."""
    out: dict[str, Any] = {"created": [], "modified": [], "deleted": []}
    for change in changes:
        out[change.kind].append(change.path)
    budget = MAX_LISTED_CHARS
    for kind in out:
        kept = []
        for path in sorted(out[kind]):
            budget -= len(path) + 8
            if budget < 0:
                truncated = True
                break
            kept.append(path)
        out[kind] = kept
    if truncated:
        out["truncated"] = True
    return out


class ChangeTracker:
    """Snapshots of the tracked roots and the named ones `fs.changes` compares with. Thread-safe."""

    def __init__(self, root: Root) -> None:
        self._root = root
        self._extra: tuple[str, ...] = tuple(b.real for b in root.bases if b.real not in ("/", root.real))
        self._lock = threading.Lock()
        self._base: treediff.Snapshot | None = None
        self._tokens: OrderedDict[str, treediff.Snapshot] = OrderedDict()
        self._pinned: dict[str, treediff.Snapshot] = {}
        self._count = 0

    def _roots(self) -> list[tuple[str, str]]:
        """(real directory, prefix of its paths as shown) per tracked root, none inside another."""
        work = self._root.real
        roots = [(work, "")]
        for real in sorted(set(self._extra)):
            inside = [r for r, _ in roots if real == r or real.startswith(r.rstrip("/") + "/")]
            if not inside:
                roots.append((real, real.rstrip("/") + "/"))
        return roots

    def snapshot(self) -> treediff.Snapshot:
        """One snapshot of every tracked root, keyed by the paths clients see."""
        merged = treediff.Snapshot()
        for real, prefix in self._roots():
            left = MAX_ENTRIES - len(merged.entries)
            if left <= 0:
                merged.truncated = True
                break
            snap = treediff.snapshot(real, max_entries=left)
            merged.truncated |= snap.truncated
            for rel, entry in snap.entries.items():
                if not prefix and (rel == PRIVATE_DIR or rel.startswith(PRIVATE_DIR + "/")):
                    continue
                merged.entries[prefix + rel] = entry
        return merged

    def since(self, before: treediff.Snapshot) -> dict[str, Any]:
        """What changed between `before` and now, in the `files` shape."""
        now = self.snapshot()
        return files_of(treediff.diff(before, now), truncated=before.truncated or now.truncated)

    # -- fs.changes ---------------------------------------------------------------------------

    def track(self, paths: list[str]) -> None:
        """Track these directories besides the working directory and the fs roots (absolute,
        inside the sandbox's file system); the base is taken again."""
        extra = [b.real for b in self._root.bases if b.real not in ("/", self._root.real)]
        for path in paths:
            if not path.startswith("/"):
                raise ProtocolError("bad_request", f"a tracked path is absolute, not {path!r:.200}")
            extra.append(self._root.resolve(path).real)
        with self._lock:
            self._extra = tuple(extra)
            self._base = None

    def query(self, *, since: str | None, keep: str | None, advance: list[str] | None,
              base: bool) -> dict[str, Any]:
        """`fs.changes`: what changed since `since` (a token or pinned name; None: the base), and a
        token for now. `keep` pins now's snapshot under that name instead of a new token;
        `advance` (with `since`, a pinned name) moves exactly these paths of it forward, not
        what lies under them (a mount's partial sync; `advance=[]` asks without making a
        token); `base` makes now the base."""
        now = self.snapshot()
        with self._lock:
            if since is None:
                if self._base is None:
                    self._base = now
                old = self._base
            else:
                found = self._pinned[since] if since in self._pinned else self._tokens.get(since)
                if found is None:
                    raise ProtocolError("not_found", f"change token {since!r:.80} is not kept (the sandbox keeps "
                                                     f"its last {KEPT_TOKENS} tokens): ask without `since` for "
                                                     "the changes since the sandbox was handed out")
                old = found
            listed = files_of(treediff.diff(old, now), truncated=old.truncated or now.truncated)
            answer: dict[str, Any] = {"files": listed}
            if advance is not None:
                if since is None or since not in self._pinned:
                    raise ProtocolError("bad_request", "`advance` moves a pinned name (`since`) forward")
                moved = treediff.Snapshot(dict(old.entries), truncated=now.truncated)
                for path in advance:  # exactly these: a folder's entries are listed (and synced) on their own
                    moved.entries.pop(path, None)
                    if path in now.entries:
                        moved.entries[path] = now.entries[path]
                self._pinned[since] = moved
                answer["token"] = since
            elif keep is not None:
                if keep not in self._pinned and len(self._pinned) >= MAX_PINNED:
                    raise ProtocolError("busy", f"{MAX_PINNED} names are pinned")
                self._pinned[keep] = now
                answer["token"] = keep
            else:
                self._count += 1
                token = f"c{self._count}"
                self._tokens[token] = now
                while len(self._tokens) > KEPT_TOKENS:
                    self._tokens.popitem(last=False)
                answer["token"] = token
            if base:
                self._base = now
        return answer

