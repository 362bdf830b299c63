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


def find_image(template: str, config: BuildConfig | None = None) -> BootImage | None:
    """The built image of `template` for today's templates (`config`, default templates.toml
    alone), init and agent; None when it is not built, out of date, or not a declared template.
    Reads a few files: no apt, no build."""
    config = config or load_config()
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


def image_folders(config: BuildConfig) -> list[tuple[str, Path, bool]]:
    """Every image folder in the cache: (template, folder, whether today's `config` (its
    templates, the init and the agent) boots from it), by template then newest first."""
    root = microvm_cache() / "images"
    current = {image_dir(name, recipe(config, name)) for name in config.templates}
    found = []
    for parent in sorted(root.iterdir()) if root.is_dir() else ():
        if not parent.is_dir() or parent.name.startswith("."):
            continue
        folders = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        found += [(parent.name, folder, folder in current) for folder in folders]
    return found


def stale_images(config: BuildConfig, template: str | None = None, keep_previous: int = 0) -> list[Path]:
    """The image folders no template of `config` boots from (of `template` only, when given),
    but for the `keep_previous` newest of each template: a build keeps one, so a gateway still
    running the previous image keeps working while it is replaced; `sandgate images prune` none.
    The one place that decides which images go."""
    kept: dict[str, int] = {}
    stale = []
    for name, folder, current in image_folders(config):
        if current or (template is not None and name != template):
            continue
        kept[name] = kept.get(name, 0) + 1
        if kept[name] > keep_previous:
            stale.append(folder)
    return stale
