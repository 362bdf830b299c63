"""The read-only root disk of a template that declares one: Debian made by debootstrap as an ext4
image, cached apart from the images that use it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from plugins.common import private_dir
from plugins.microvm.images.cache import BUILDER_VERSION, fresh_dir, microvm_cache
from plugins.microvm.images.commands import Clock, run
from plugins.microvm.images.templates import ARCH, BuildConfig, RootfsSpec, TemplateSpec, canonical
from plugins.microvm.images.tree import EPOCH, NET_FILES, matches, resolve, write_files


def _dpkg_status(path: Path) -> dict[str, str]:
    """Installed packages -> versions, from a dpkg status file."""
    out = {}
    for stanza in path.read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(out.items()))


def rootfs_disk(config: BuildConfig, spec: TemplateSpec, rootfs: RootfsSpec, clock: Clock, *,
                rebuild: bool) -> tuple[Path, dict[str, str]]:
    """The template's read-only disk: a Debian root (debootstrap, then the suite's updates) as
    an ext4 image, and its installed packages. It holds nothing of sandgate's, so it is cached
    by its own recipe ([debian], the rootfs table) and survives edits to the agent or the init.
    Called with build.lock held."""
    digest = hashlib.sha256(canonical([BUILDER_VERSION, asdict(config.debian), rootfs.declaration]).encode())
    parent = private_dir(microvm_cache() / "rootfs")
    folder = parent / digest.hexdigest()[:24]
    if not rebuild and (folder / "packages.json").is_file():
        return folder / "rootfs.ext4", json.loads((folder / "packages.json").read_text())
    debian = config.debian
    tmp = fresh_dir(parent / ".build")
    target = tmp / "root"
    cache = private_dir(microvm_cache() / "debootstrap")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           "HOME": "/root"}
    try:
        run(["debootstrap", "--variant=minbase", f"--arch={ARCH}", "--components=main",
             f"--include={','.join(rootfs.packages)}", f"--keyring={debian.keyring}", f"--cache-dir={cache}",
             debian.suite, target, debian.mirror], clock, "debootstrap (minutes)", env=env)
        # debootstrap takes the suite alone; the security and point-release updates come from apt
        write_files(target, {"etc/apt/sources.list": debian.sources_list()})
        # (with /proc: the JDK's maintainer scripts run java, which refuses to start without it)
        run(["mount", "-t", "proc", "proc", target / "proc"], clock, "root disk: mount /proc")
        try:
            for args in (["update"], ["-y", "--no-install-recommends", "dist-upgrade"], ["clean"]):
                run(["chroot", target, "apt-get", "-q", *args], clock, f"root disk: apt-get {args[-1]}", env=env)
        finally:
            run(["umount", "--lazy", target / "proc"], clock, "root disk: unmount /proc")
        packages = _dpkg_status(target / "var/lib/dpkg/status")
        clock("assembling the root disk")
        for dirpath, dirnames, filenames in os.walk(target, topdown=True):
            for name in [*dirnames, *filenames]:
                path = Path(dirpath, name)
                if matches(path.relative_to(target).as_posix(), rootfs.exclude):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).is_dir()]
        write_files(target, NET_FILES)
        (target / "work").mkdir(exist_ok=True)
        for needed in (f"usr/bin/{spec.python}", "usr/bin/busybox", "opt"):
            if resolve(target, needed) is None:
                raise RuntimeError(f"the {spec.name} root disk has no {needed}")
        files, size = 0, 0
        for dirpath, dirnames, filenames in os.walk(target):
            for name in dirnames + filenames:
                files += 1
                size += os.lstat(os.path.join(dirpath, name)).st_size
        size_mb = int(size * 1.15) // (1 << 20) + files * 4096 // (1 << 20) + rootfs.slack_mb + 16
        # No journal: nothing ever writes to the disk (each VM writes to its own tmpfs overlay).
        run(["mkfs.ext4", "-q", "-F", "-L", "sandgate-root", "-m", "0", "-O", "^has_journal",
             "-N", str(files + 4096), "-E", "root_owner=0:0", "-d", target, tmp / "rootfs.ext4", f"{size_mb}M"],
            clock, "mkfs.ext4 -d", env={**env, "E2FSPROGS_FAKE_TIME": str(EPOCH or 1)})
        shutil.rmtree(target)
        (tmp / "packages.json").write_text(json.dumps(packages, indent=1) + "\n")
        os.chmod(tmp / "rootfs.ext4", 0o644)
        if folder.exists():  # rebuilding: images made from the old one hold their own links to it
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_unused(parent, folder)
    return folder / "rootfs.ext4", packages


def prune_unused(parent: Path, keep: Path, count: int = 2) -> None:
    """Drop old root disks that no image links to. Every template's disks share `parent`: pruning
    by age alone would let one template's new disk drop another's, whose next image (after any
    edit of the agent) would then debootstrap again for many minutes. A disk an image uses holds a
    second link (build.py links it into the image); of the rest, the `count` newest stay."""
    unused = []
    for folder in parent.iterdir():
        disk = folder / "rootfs.ext4"
        if folder == keep or not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            if disk.stat().st_nlink > 1:
                continue
        except FileNotFoundError:
            pass
        unused.append(folder)
    unused.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in unused[count:]:
        shutil.rmtree(old, ignore_errors=True)
