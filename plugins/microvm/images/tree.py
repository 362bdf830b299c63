"""An image's root tree on the build host: /usr-merged paths, symlinks followed inside the tree,
files selected from unpacked packages by pattern, and the files every image writes."""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

#: Every file in an image gets this mtime, so equal inputs give equal bytes.
EPOCH = 0
#: Top-level folders that bookworm merges into /usr; the images do the same.
MERGED = ("bin", "sbin", "lib", "lib64")


NET_FILES = {
    "etc/hostname": "sandbox\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": "",  # the init writes QEMU's resolver when the sandbox has a network
}


def merged(rel: str) -> str:
    """`rel` as it lands in an image whose /bin, /sbin, /lib and /lib64 live in /usr."""
    top = rel.partition("/")[0]
    return f"usr/{rel}" if top in MERGED else rel


def matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def resolve(root: Path, rel: str) -> str | None:
    """`rel` with every symlink followed inside `root` (absolute targets are relative to it);
    None when it leads nowhere."""
    parts = [p for p in rel.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        path = root.joinpath(*done, part)
        if path.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not path.exists() and not os.path.lexists(path):
            return None
        done.append(part)
    return "/".join(done)


def make_root_skeleton(root: Path) -> None:
    for top in MERGED:
        (root / "usr" / top).mkdir(parents=True, exist_ok=True)
        (root / top).symlink_to(f"usr/{top}")


def select_files(unpacked: Path, root: Path, include: Sequence[str], exclude: Sequence[str]) -> None:
    """Copy the files and symlinks of `unpacked` that `include` and not `exclude` select into
    `root`, /usr-merged."""
    for dirpath, dirnames, filenames in os.walk(unpacked):
        dirnames.sort()
        for name in [*sorted(filenames), *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            src = Path(dirpath, name)
            rel = merged(src.relative_to(unpacked).as_posix())
            if not matches(rel, include) or matches(rel, exclude):
                continue
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(dest):
                dest.unlink()
            if src.is_symlink():
                dest.symlink_to(os.readlink(src))
            else:
                shutil.copy2(src, dest)


def write_files(root: Path, files: Mapping[str, str | bytes], mode: int = 0o644) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            path.unlink()
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        os.chmod(path, mode)
