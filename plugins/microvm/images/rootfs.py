"""The read-only root disk of a template that declares one: Debian made by debootstrap as an ext4
image, cached apart from the images that use it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from plugins.common import private_dir
from plugins.microvm.images.cache import BUILDER_VERSION, fresh_dir, microvm_cache
from plugins.microvm.images.commands import Clock, run
from plugins.microvm.images.confine import setup_argv
from plugins.microvm.images.templates import ARCH, BuildConfig, ImageFile, RootfsSpec, TemplateSpec, canonical
from plugins.microvm.images.tree import EPOCH, NET_FILES, matches, resolve, write_files

#: How long one setup command may run.
SETUP_TIMEOUT_S = 900.0


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
        packages.update(customize(target, spec, rootfs, packages, clock))
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


def unused_disks(parent: Path) -> list[Path]:
    """The root disks no image links to, newest first. A disk an image uses holds a second link
    (build.py links it into the image). The one place that decides which disks may go."""
    unused = []
    for folder in parent.iterdir() if parent.is_dir() else ():
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            if (folder / "rootfs.ext4").stat().st_nlink > 1:
                continue
        except FileNotFoundError:
            pass
        unused.append(folder)
    unused.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return unused


def prune_unused(parent: Path, keep: Path, count: int = 2) -> None:
    """Drop old root disks that no image links to. Every template's disks share `parent`: pruning
    by age alone would let one template's new disk drop another's, whose next image (after any
    edit of the agent) would then debootstrap again for many minutes. Of the unused disks, the
    `count` newest stay."""
    for old in [p for p in unused_disks(parent) if p != keep][count:]:
        shutil.rmtree(old, ignore_errors=True)


def customize(target: Path, spec: TemplateSpec, rootfs: RootfsSpec, debs: dict[str, str],
              clock: Clock) -> dict[str, str]:
    """What a template adds to its Debian tree, in this order: its files, its pip and npm
    packages (fetched on this host from the registries it reaches, never in a sandbox), then its
    setup commands (confined: images/confine.py). Returns the pip and npm packages installed, as
    "pip:<name>" / "npm:<name>" -> version (they join the image's key)."""
    for item in rootfs.files:
        write_image_file(target, item)
    installed = {}
    if rootfs.pip:
        installed.update(pip_install(target, spec.python, debs.get("libc6", ""), rootfs.pip, clock))
    if rootfs.npm:
        installed.update(npm_install(target, rootfs.npm, clock))
    for number, command in enumerate(rootfs.setup, 1):
        short = command if len(command) <= 60 else command[:57] + "..."
        run(setup_argv(target, command), clock, f"setup command {number} of {len(rootfs.setup)} ({short})",
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": _source_root()}, timeout=SETUP_TIMEOUT_S)
    return installed


def _source_root() -> str:
    return str(Path(__file__).resolve().parents[3])


def _inside(target: Path, rel: str, *, make: bool = False) -> Path:
    """`rel` in the tree with symlinks followed inside it (an absolute link means the tree's
    root, never the host's), its missing folders made when `make`."""
    done = ""
    for part in [p for p in rel.split("/") if p]:
        step = f"{done}/{part}" if done else part
        real = resolve(target, step)
        if real is None:
            if not make:
                raise RuntimeError(f"the root disk has no /{step}")
            (target / done / part).mkdir(mode=0o755)
            real = step if not done else f"{done}/{part}"
        done = real
    return target / done


def write_image_file(target: Path, item: ImageFile) -> None:
    """A template's file, written through the tree's own symlinks only (a link in the Debian tree
    pointing at /etc must not make the builder write the host's /etc)."""
    folder, _, name = item.path.rpartition("/")
    parent = _inside(target, folder, make=True)
    if not parent.is_dir():
        raise RuntimeError(f"/{folder} in the root disk is not a folder (for the template's file /{item.path})")
    dest = parent / name
    if dest.is_dir() and not dest.is_symlink():
        raise RuntimeError(f"/{item.path} is a folder in the root disk")
    if os.path.lexists(dest):
        dest.unlink()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(item.content)
    os.chmod(dest, item.mode)


def pip_install(target: Path, python: str, libc: str, specs: tuple[str, ...], clock: Clock) -> dict[str, str]:
    """Wheels only (`--only-binary`: an sdist's build would run its code as root here), for the
    image's Python and glibc rather than the host's, into /usr/local/lib/<python>/dist-packages;
    console scripts go to /usr/local/bin with the image's Python in their #! line."""
    version = python.removeprefix("python")
    glibc = re.match(r"2\.(\d+)", libc)
    if glibc is None:
        raise RuntimeError(f"cannot tell the root disk's glibc version (libc6 {libc!r}) to choose wheels for")
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(int(glibc.group(1)), 16, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    site = _inside(target, f"usr/local/lib/{python}/dist-packages", make=True)
    run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input",
         "--no-compile", "--target", site, "--only-binary=:all:", "--python-version", version,
         "--implementation", "cp", "--abi", f"cp{version.replace('.', '')}",
         *(arg for platform in platforms for arg in ("--platform", platform)), "--", *specs],
        clock, f"pip install {' '.join(specs)}")
    scripts = site / "bin"
    if scripts.is_dir():
        bindir = _inside(target, "usr/local/bin", make=True)
        for script in sorted(scripts.iterdir()):
            data = script.read_bytes()
            if data.startswith(b"#!"):
                data = f"#!/usr/bin/{python}".encode() + data[data.index(b"\n"):] if b"\n" in data else data
            (bindir / script.name).unlink(missing_ok=True)
            (bindir / script.name).write_bytes(data)
            os.chmod(bindir / script.name, 0o755)
        shutil.rmtree(scripts)
    installed = {}
    for info in site.glob("*.dist-info"):
        name, _, version_ = info.name.removesuffix(".dist-info").partition("-")
        installed[f"pip:{name.lower()}"] = version_
    return installed


def npm_install(target: Path, specs: tuple[str, ...], clock: Clock) -> dict[str, str]:
    """Packages without their install scripts (`--ignore-scripts`: they would run as root here)
    into /usr/local/lib/node_modules, each linked into /usr/share/nodejs, where Debian's node
    looks for global modules."""
    prefix = _inside(target, "usr/local", make=True)
    run(["npm", "install", "--global", "--prefix", prefix, "--ignore-scripts", "--no-audit", "--no-fund",
         "--no-update-notifier", "--omit=dev", "--", *specs], clock, f"npm install {' '.join(specs)}",
        env={**os.environ, "npm_config_cache": str(microvm_cache() / "npm")})
    modules = prefix / "lib/node_modules"
    shared = _inside(target, "usr/share/nodejs", make=True)
    installed = {}
    for manifest in [*modules.glob("*/package.json"), *modules.glob("@*/*/package.json")]:
        data = json.loads(manifest.read_text())
        name = manifest.parent.relative_to(modules).as_posix()
        if name == "npm":
            continue
        installed[f"npm:{name}"] = str(data.get("version", ""))
        link = shared / name
        if os.path.lexists(link) and not link.is_symlink():
            raise RuntimeError(f"npm package {name} collides with Debian's /usr/share/nodejs/{name}")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(f"/usr/local/lib/node_modules/{name}")
    return installed
