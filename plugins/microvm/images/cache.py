"""Images in the cache: where they live, their recipe, and reading a built one back. The
runtime imports this on its start path (`find_image`), so it reads files and imports nothing heavy."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from plugins.common import cache_root
from plugins.microvm.images.guest_files import agent_sources, init_script
from plugins.microvm.images.templates import BuildConfig, load_config

#: Bump when the builder makes different images from the same inputs.
BUILDER_VERSION = 2


@dataclass(frozen=True)
class BootImage:
    """What one template boots from. The runtime appends tsc_early_khz and sandgate.* to
    `cmdline`, attaches `rootfs` (when there is one) read-only as the only virtio-blk disk, and
    keeps its snapshots in `dir`, keyed on `key`."""

    template: str
    kernel: Path
    initrd: Path
    rootfs: Path | None
    cmdline: str
    memory_mb: int
    vcpus: int
    key: str
    dir: Path


def microvm_cache() -> Path:
    return cache_root() / "microvm"


def recipe(config: BuildConfig, template: str) -> str:
    """The hash of what goes into `template`'s image that is known without apt."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode() + data)

    add("builder", str(BUILDER_VERSION).encode())
    add("sources+kernel", config.declaration.encode())
    add("template", config.templates[template].declaration.encode())
    add("init", init_script())
    for rel, data in sorted(agent_sources().items()):
        add(rel, data)
    return digest.hexdigest()


def image_dir(template: str, recipe_hash: str) -> Path:
    return microvm_cache() / "images" / template / recipe_hash[:24]


def read_image(folder: Path) -> BootImage | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        files = manifest["files"]
        image = BootImage(
            template=manifest["template"],
            kernel=folder / files["kernel"],
            initrd=folder / files["initrd"],
            rootfs=folder / files["rootfs"] if files.get("rootfs") else None,
            cmdline=manifest["cmdline"],
            memory_mb=int(manifest["memory_mb"]),
            vcpus=int(manifest["vcpus"]),
            key=manifest["key"],
            dir=folder,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(p.is_file() for p in (image.kernel, image.initrd, image.rootfs) if p is not None):
        return None
    return image


def find_image(template: str) -> BootImage | None:
    """The built image of `template` for today's templates.toml, init and agent; None when it
    is not built, out of date, or not a declared template. Reads a few files: no apt, no build."""
    config = load_config()
    if template not in config.templates:
        return None
    return read_image(image_dir(template, recipe(config, template)))


def fresh_dir(path: Path) -> Path:
    """An empty folder at `path`. Builders hold build.lock, so one fixed name serves: what is
    there was left by a builder that died. A fixed path also makes the bytecode reproducible
    (CPython's marshal output depends on what the compiling process did, paths included)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path


def prune_old(parent: Path, keep: Path, count: int = 2) -> None:
    """Drop all but the `count` newest images of a template (`keep` among them): a gateway
    still running the previous one keeps working while it is replaced."""
    images = sorted((p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".") and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[count - 1:]:
        shutil.rmtree(old, ignore_errors=True)
