"""newc cpio archives, the initramfs format: written byte for byte reproducibly, and read back."""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from plugins.microvm.images.tree import EPOCH

S_IFCHR_CONSOLE = (stat.S_IFCHR | 0o600, 5, 1)


class CpioWriter:
    """A newc ("070701") archive as the kernel's initramfs unpacker reads it: owner root, one
    fixed mtime, inode numbers in write order, so the same tree gives the same bytes."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self.write = write
        self.ino = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, EPOCH, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
        self.write(header + b"\0" * (-len(header) % 4))
        self.write(data + b"\0" * (-len(data) % 4))

    def add_tree(self, root: Path) -> None:
        """Everything below `root`, parents before children, sorted."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            for name in sorted(dirnames + filenames):
                path = base / name
                rel = path.relative_to(root).as_posix()
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.add(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
                elif stat.S_ISDIR(st.st_mode):
                    self.add(rel, stat.S_IFDIR | (0o1777 if rel == "tmp" else 0o755))
                elif stat.S_ISREG(st.st_mode):
                    perm = 0o755 if st.st_mode & 0o111 else 0o644
                    self.add(rel, stat.S_IFREG | perm, path.read_bytes())
                else:
                    raise RuntimeError(f"{rel}: not a file, folder or symlink")

    def close(self) -> None:
        self.add("TRAILER!!!", 0)


def read_cpio(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of an uncompressed newc archive, up to its trailer."""
    pos = 0
    while True:
        if data[pos:pos + 6] != b"070701":
            raise ValueError(f"no newc header at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return
        yield name, mode, data[pos:pos + size]
        pos += size + (-size % 4)


def write_initramfs(root: Path, dest: Path, compression: str) -> None:
    """`root` as a newc cpio at `dest`, with /dev/console (the kernel opens it for /init
    before anything can make device nodes)."""
    with open(dest, "wb") as raw, contextlib.ExitStack() as stack:
        write = raw.write
        if compression == "gzip":
            write = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", mtime=EPOCH)).write
        writer = CpioWriter(write)
        writer.add_tree(root)
        mode, major, minor = S_IFCHR_CONSOLE
        writer.add("dev/console", mode, rdev=(major, minor))
        writer.close()
