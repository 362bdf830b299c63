"""Host mounts with permission globs (`"mounts"` of a create request): the checked spec and the
permission decisions (sans-I/O).

A mount names a host directory (`host`, under one of `[storage] allowed_roots`, real path, never
through a symlink out of them), the path the sandbox sees a copy of it at, and who may do what:
`permissions.default` ({read, list, create, modify, delete}: each a bool), `rules` (a `pattern`
with `**` semantics, matched by wcmatch against the path relative to the mount; `allow`/`deny`
lists of operations; the highest `priority` that matches decides an operation, deny winning a
tie), and `exclude` (patterns never copied in nor synced back; a bare name excludes that name at
any depth). `sync` is `batch` (permitted changes applied to the host when each exec ends) or
`manual` (POST .../mounts/sync); `on_error` is `rollback`, `continue` or `abort`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wcmatch import glob

from gateway.protocol.paths import check_path
from guest_agent.wire import ProtocolError

OPERATIONS = ("read", "list", "create", "modify", "delete")
SYNC_MODES = ("batch", "manual")
ON_ERROR = ("rollback", "continue", "abort")
MAX_MOUNTS = 8
MAX_RULES = 64
_FLAGS = glob.GLOBSTAR | glob.DOTGLOB | glob.NEGATE | glob.BRACE
_MOUNT_FIELDS = {"host", "path", "permissions", "sync", "on_error", "follow_symlinks"}


@dataclass(frozen=True)
class Rule:
    pattern: str
    allow: frozenset[str]
    deny: frozenset[str]
    priority: int


@dataclass(frozen=True)
class Permissions:
    default: frozenset[str]
    rules: tuple[Rule, ...] = ()
    exclude: tuple[str, ...] = ()

    def excluded(self, rel: str) -> bool:
        """`rel` (relative to the mount, "/"-separated) or a folder it is in is excluded."""
        parts = rel.split("/")
        for pattern in self.exclude:
            if "/" not in pattern and any(glob.globmatch(p, pattern, flags=_FLAGS) for p in parts):
                return True
            if any(glob.globmatch("/".join(parts[:i]), pattern, flags=_FLAGS) for i in range(1, len(parts) + 1)):
                return True
        return False

    def allows(self, rel: str, operation: str) -> bool:
        """Whether `operation` on `rel` is permitted: never on an excluded path; else the matching
        rule of highest priority that names the operation (deny wins a tie), else the default."""
        if self.excluded(rel):
            return False
        best: tuple[int, bool] | None = None
        for rule in self.rules:
            if operation not in rule.allow and operation not in rule.deny:
                continue
            if not glob.globmatch(rel, rule.pattern, flags=_FLAGS):
                continue
            verdict = operation not in rule.deny
            if best is None or rule.priority > best[0] or (rule.priority == best[0] and not verdict):
                best = (rule.priority, verdict)
        return operation in self.default if best is None else best[1]


@dataclass(frozen=True)
class MountSpec:
    host: str  # the real path, under an allowed root
    path: str  # where the sandbox sees the copy (absolute)
    permissions: Permissions
    sync: str = "batch"
    on_error: str = "rollback"
    follow_symlinks: bool = False


def _operations(value: Any, where: str) -> frozenset[str]:
    if isinstance(value, Mapping):  # {"read": true, ...}
        items = [k for k, v in value.items() if v is True]
        bad = [k for k, v in value.items() if not isinstance(v, bool)]
        if bad:
            raise ProtocolError("bad_request", f"{where}: each operation maps to true or false")
        names = list(value)
    elif isinstance(value, list):
        items = names = value
    else:
        raise ProtocolError("bad_request", f"{where}: a list of operations ({', '.join(OPERATIONS)})")
    unknown = [n for n in names if n not in OPERATIONS]
    if unknown:
        raise ProtocolError("bad_request", f"{where}: unknown operation {unknown[0]!r:.40}; one of "
                                           f"{', '.join(OPERATIONS)}")
    return frozenset(items)


def _permissions(value: Any, where: str) -> Permissions:
    if value is None:
        return Permissions(default=frozenset(OPERATIONS))
    if not isinstance(value, Mapping) or set(value) - {"default", "rules", "exclude"}:
        raise ProtocolError("bad_request", f"{where}: permissions are {{default, rules, exclude}}")
    default = _operations(value.get("default", list(OPERATIONS)), f"{where}.default")
    rules_in = value.get("rules", [])
    if not isinstance(rules_in, list) or len(rules_in) > MAX_RULES:
        raise ProtocolError("bad_request", f"{where}.rules: a list of at most {MAX_RULES} rules")
    rules = []
    for i, rule in enumerate(rules_in):
        at = f"{where}.rules[{i}]"
        if not isinstance(rule, Mapping) or set(rule) - {"pattern", "allow", "deny", "priority"}:
            raise ProtocolError("bad_request", f"{at}: a rule is {{pattern, allow, deny, priority}}")
        pattern, priority = rule.get("pattern"), rule.get("priority", 0)
        if not isinstance(pattern, str) or not pattern or len(pattern) > 1024:
            raise ProtocolError("bad_request", f"{at}.pattern: a glob (1..1024 characters)")
        if type(priority) is not int or abs(priority) > 1_000_000:
            raise ProtocolError("bad_request", f"{at}.priority: an integer")
        rules.append(Rule(pattern, _operations(rule.get("allow", []), f"{at}.allow"),
                          _operations(rule.get("deny", []), f"{at}.deny"), priority))
    exclude = value.get("exclude", [])
    if not isinstance(exclude, list) or len(exclude) > MAX_RULES or not all(
            isinstance(p, str) and 0 < len(p) <= 1024 for p in exclude):
        raise ProtocolError("bad_request", f"{where}.exclude: a list of at most {MAX_RULES} globs")
    return Permissions(default, tuple(rules), tuple(exclude))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def parse_mounts(value: Any, allowed_roots: Sequence[str], *, work_only: bool = False) -> tuple[MountSpec, ...]:
    """The create body's `mounts`, checked. `work_only` (WASM): a mount's path lies under /work
    (its copy is placed there, inside the sandbox's preopened working directory).

    Raises:
        ProtocolError: `bad_request` for a malformed mount; `forbidden` for a host directory that
            is not under an allowed root (or any mount while none is configured)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_MOUNTS:
        raise ProtocolError("bad_request", f"'mounts' is a list of at most {MAX_MOUNTS} mounts")
    mounts: list[MountSpec] = []
    for i, item in enumerate(value):
        where = f"mounts[{i}]"
        if not isinstance(item, Mapping) or set(item) - _MOUNT_FIELDS or "host" not in item or "path" not in item:
            raise ProtocolError("bad_request", f"{where}: a mount has `host` and `path` (and {sorted(_MOUNT_FIELDS)})")
        host, path = item["host"], item["path"]
        if not isinstance(host, str) or not os.path.isabs(host) or "\0" in host:
            raise ProtocolError("bad_request", f"{where}.host: an absolute host directory")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ProtocolError("bad_request", f"{where}.path: an absolute path in the sandbox")
        path = os.path.normpath(check_path(path, allow_absolute=True))
        if (work_only and not _under(path, "/work")) or path == "/work":
            raise ProtocolError("bad_request", f"{where}.path: on this runtime a mount lies under /work "
                                               f"(a folder of the working directory), not {path!r:.200}")
        real = os.path.realpath(host)
        roots = [os.path.realpath(r) for r in allowed_roots]
        if not any(_under(real, r) for r in roots):
            raise ProtocolError("forbidden", f"{where}.host: {host!r:.200} is not under an allowed root "
                                             "(the operator's [storage] allowed_roots)")
        if not os.path.isdir(real):
            raise ProtocolError("bad_request", f"{where}.host: {host!r:.200} is not a directory")
        sync, on_error = item.get("sync", "batch"), item.get("on_error", "rollback")
        if sync not in SYNC_MODES:
            raise ProtocolError("bad_request", f"{where}.sync: one of {', '.join(SYNC_MODES)}")
        if on_error not in ON_ERROR:
            raise ProtocolError("bad_request", f"{where}.on_error: one of {', '.join(ON_ERROR)}")
        follow = item.get("follow_symlinks", False)
        if follow is not False:
            raise ProtocolError("unsupported", f"{where}.follow_symlinks: symlinks are never followed")
        if any(_under(path, m.path) or _under(m.path, path) for m in mounts):
            raise ProtocolError("bad_request", f"{where}.path: overlaps another mount")
        mounts.append(MountSpec(real, path, _permissions(item.get("permissions"), f"{where}.permissions"),
                                sync, on_error, False))
    return tuple(mounts)


# ---------------------------------------------------------------------------------------------
# What a mount's changes amount to (sans-I/O)
# ---------------------------------------------------------------------------------------------

#: A tracked change's kind -> the operation it needs.
OPERATION_OF = {"created": "create", "modified": "modify", "deleted": "delete"}


def pin_name(mount: MountSpec) -> str:
    """The change tracker's pinned name for a mount's sync point (guest_agent/changes.py)."""
    return f"mount:{mount.path}"


def shown_prefix(mount: MountSpec) -> str:
    """How the tracker names paths in the mount: relative under /work, absolute elsewhere."""
    return mount.path.removeprefix("/work/") + "/" if _under(mount.path, "/work") else mount.path + "/"


@dataclass(frozen=True)
class Change:
    """One pending change of a mount: `path` as the sandbox shows it, `rel` to the mount."""

    path: str
    rel: str
    kind: str  # created, modified, deleted
    permitted: bool

    @property
    def operation(self) -> str:
        return OPERATION_OF[self.kind]

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "change": self.kind, "operation": self.operation}


def pending(mount: MountSpec, files: Mapping[str, Any]) -> list[Change]:
    """The mount's changes in a tracker's `files` answer, each with its verdict; excluded paths
    are left out (never synced, never reported). In the order a sync applies them: deletions
    (deepest first: a folder is emptied before it goes), creations (shallowest first: a folder
    before its files), modifications; a file replaced by a folder is a deletion and a creation."""
    prefix = shown_prefix(mount)
    out: list[Change] = []
    for kind in OPERATION_OF:
        for path in files.get(kind, []):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if not rel or mount.permissions.excluded(rel):
                continue
            out.append(Change(path, rel, kind, mount.permissions.allows(rel, OPERATION_OF[kind])))
    order = {"deleted": 0, "created": 1, "modified": 2}
    out.sort(key=lambda c: (order[c.kind], -c.rel.count("/") if c.kind == "deleted" else c.rel.count("/"), c.rel))
    return out


def copy_mode(permissions: Permissions, rel: str, *, is_dir: bool) -> int:
    """The mode a copied entry gets in the sandbox, so that where the guest runs as non-root
    (pods) a denied change fails at the syscall with EACCES: a file is read-only unless `modify`
    is allowed on it; a folder is read-only (nothing made or removed in it) when neither `create`
    nor `delete` could be allowed anywhere in the mount (finer denials are refused at sync)."""
    if is_dir:
        ops = set(permissions.default) | {op for rule in permissions.rules for op in rule.allow}
        return 0o755 if ops & {"create", "delete"} else 0o555
    return 0o644 if permissions.allows(rel, "modify") else 0o444
