"""Building an image: the kernel, the initramfs and the root disk put together under build.lock,
with a manifest of what went in, renamed into the cache when whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from plugins.common import file_lock, private_dir
from plugins.microvm.images.apt import Apt
from plugins.microvm.images.cache import (
    BUILDER_VERSION,
    BootImage,
    find_image,
    fresh_dir,
    image_dir,
    microvm_cache,
    read_image,
    recipe,
    stale_images,
)
from plugins.microvm.images.commands import Clock, Progress
from plugins.microvm.images.cpio import write_initramfs
from plugins.microvm.images.host import HostError, ensure_host_packages
from plugins.microvm.images.initramfs import check_tree, initramfs_tree
from plugins.microvm.images.kernel import prepare_kernel
from plugins.microvm.images.rootfs import rootfs_disk
from plugins.microvm.images.templates import TemplateError, canonical, load_config


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def build_image(template: str, progress: Progress, *, rebuild: bool = False,
                user_file: Path | None = None) -> BootImage:
    """`template`'s image, built unless the cache has it. Safe to call from several processes
    at once: one builds (under build.lock, in a temporary folder renamed into place), the
    others wait and return its image. `rebuild` builds it again even so, from the packages
    Debian has today (the way to take in security updates without changing the recipe).

    Raises:
        TemplateError: unknown template or a bad templates.toml (or `user_file`, a user's own).
        HostError: this host cannot build it (no root for a root disk, Debian unreachable, ...).
        RuntimeError: a check or a build step failed (the message says which).
    """
    config = load_config(user_file=user_file)
    if template not in config.templates:
        raise TemplateError(_unknown(template, config.templates))
    found = None if rebuild else find_image(template, config)
    if found is not None:
        return found
    spec = config.templates[template]
    if spec.rootfs is not None and os.geteuid() != 0:
        raise HostError(f"template {template!r} has a root disk, which debootstrap can only make as root: run "
                        "the build as root (with SANDGATE_CACHE_DIR set to the cache the gateway uses)")
    base = private_dir(microvm_cache())
    clock = Clock(progress)
    with file_lock(base / "build.lock"):
        recipe_hash = recipe(config, template)
        folder = image_dir(template, recipe_hash)
        found = None if rebuild else read_image(folder)
        if found is not None:
            return found
        apt = Apt(private_dir(base / "apt"), config.debian)
        kernel = prepare_kernel(config, apt, clock)
        apt.update(clock, force=rebuild)
        parent = private_dir(folder.parent)
        tmp = fresh_dir(parent / ".build")
        try:
            manifest: dict[str, Any] = {
                "template": template, "recipe": recipe_hash, "builder": BUILDER_VERSION,
                "kernel": {"package": kernel.pin.package, "version": kernel.pin.version,
                           "sha256": kernel.pin.sha256, "release": kernel.release},
            }
            root = initramfs_tree(spec, kernel, apt, tmp, clock, manifest)
            check_tree(root, spec)
            clock("writing the initramfs")
            write_initramfs(root, tmp / "initrd.img", spec.compression)
            shutil.rmtree(root)
            _link_or_copy(kernel.vmlinux, tmp / "vmlinux")
            files = {"kernel": "vmlinux", "initrd": "initrd.img", "rootfs": None}
            if spec.rootfs is not None:
                disk, manifest["rootfs_packages"] = rootfs_disk(config, spec, spec.rootfs, clock, rebuild=rebuild)
                _link_or_copy(disk, tmp / "rootfs.ext4")
                files["rootfs"] = "rootfs.ext4"
            inputs = {k: manifest.get(k) for k in ("recipe", "kernel", "debs", "rootfs_packages")}
            manifest.update({
                "key": hashlib.sha256(canonical(inputs).encode()).hexdigest(),
                "files": files, "cmdline": spec.cmdline, "memory_mb": spec.memory_mb, "vcpus": spec.vcpus,
                "initrd_bytes": (tmp / "initrd.img").stat().st_size,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            for path in tmp.iterdir():
                os.chmod(path, 0o644)
            os.chmod(tmp, 0o755)
            if folder.exists():  # rebuilding: the old one (and its snapshots) goes
                old = folder.with_name(f".old-{folder.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(folder, old)
                shutil.rmtree(old)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in stale_images(config, template, keep_previous=1):
            shutil.rmtree(old, ignore_errors=True)
    image = read_image(folder)
    if image is None:
        raise RuntimeError(f"{folder}: the image just built cannot be read back")
    return image


def _unknown(template: str, templates: Iterable[str]) -> str:
    return f"unknown microvm template {template!r}; the templates files declare {', '.join(sorted(templates))}"


def build_images(template: str | None, progress: Progress, *, rebuild: bool = False,
                 user_file: Path | None = None) -> list[BootImage]:
    """What `sandgate images build microvm [--template NAME]` does before its snapshots: the
    host packages, then the image of `template` (every declared template when None; those of
    `user_file`, a user's own templates file, included)."""
    config = load_config(user_file=user_file)
    names = list(config.templates) if template is None else [template]
    if template is not None and template not in config.templates:
        raise TemplateError(_unknown(template, config.templates))
    ensure_host_packages(progress, names, config)
    return [build_image(name, progress, rebuild=rebuild, user_file=user_file) for name in names]
