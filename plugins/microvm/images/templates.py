"""templates.toml, parsed and checked: the Debian sources, the kernel pin and each template's
tables, with a user's own templates file on top (`[runtimes.microvm] templates_file`).

A user's file holds `[templates.<name>]` tables only. One named like a shipped template replaces
it; `base = "<name>"` starts a template from another's tables (a shipped one, or one earlier in
the chain): its own keys replace the base's, except the root disk's lists (`packages`, `exclude`,
`pip`, `npm`, `setup`), which add to the base's, and its `files`, which add to (or replace by
path) the base's. A base naming the template itself means the one it replaces.
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATES_FILE = Path(__file__).parent.parent / "templates.toml"
ARCH = "amd64"


class TemplateError(ValueError):
    """templates.toml is missing, malformed, or names something that does not exist."""


@dataclass(frozen=True)
class DebianSources:
    suite: str
    mirror: str
    security_mirror: str
    keyring: str

    def sources_list(self) -> str:
        opts = f"[arch={ARCH} signed-by={self.keyring}]"
        return (
            f"deb {opts} {self.mirror} {self.suite} main\n"
            f"deb {opts} {self.mirror} {self.suite}-updates main\n"
            f"deb {opts} {self.security_mirror} {self.suite}-security main\n"
        )


@dataclass(frozen=True)
class KernelPin:
    package: str
    version: str
    sha256: str
    metapackage: str


@dataclass(frozen=True)
class ImageFile:
    """A file a template puts on its root disk: `path` relative to the disk's root."""

    path: str
    content: bytes
    mode: int


@dataclass(frozen=True)
class RootfsSpec:
    packages: tuple[str, ...]
    exclude: tuple[str, ...]
    slack_mb: int
    #: Wheels (requirement strings) pip installs on the host into the disk's
    #: /usr/local/lib/<python>/dist-packages at build time.
    pip: tuple[str, ...]
    #: Packages npm installs on the host (no install scripts) into the disk's /usr/local.
    npm: tuple[str, ...]
    files: tuple[ImageFile, ...]
    #: Shell commands run at build time inside the disk's tree, confined (images/confine.py).
    setup: tuple[str, ...]
    #: The table as declared, canonical JSON: with [debian] and BUILDER_VERSION, the disk's recipe.
    declaration: str


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    memory_mb: int
    vcpus: int
    cmdline: str
    modules: tuple[str, ...]
    net_modules: tuple[str, ...]
    compression: str
    #: The agent's interpreter (in usr/bin of the initramfs, or of the root disk).
    python: str
    #: Packages unpacked only to run `python` at build time, when the initramfs has none: the
    #: agent's bytecode is made by the same Python version that runs it.
    compile_with: tuple[str, ...]
    packages: tuple[str, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    optional: tuple[str, ...]
    dlopen: tuple[str, ...]
    sourceless: tuple[str, ...]
    rootfs: RootfsSpec | None
    #: The template's table as declared, canonical JSON (part of the recipe).
    declaration: str


@dataclass(frozen=True)
class BuildConfig:
    debian: DebianSources
    kernel: KernelPin
    templates: dict[str, TemplateSpec]
    #: [debian] and [kernel] as declared, canonical JSON.
    declaration: str


class _Table:
    """Typed reads of one TOML table, with errors that name the file and the key."""

    def __init__(self, where: str, data: Any, source: Path) -> None:
        if not isinstance(data, dict):
            raise TemplateError(f"{source}: [{where}] must be a table")
        self.where, self.data, self.source = where, data, source
        self.used: set[str] = set()

    def _fail(self, key: str, what: str) -> TemplateError:
        return TemplateError(f"{self.source}: {self.where}.{key} must be {what}")

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is None:
                raise TemplateError(f"{self.source}: {self.where}.{key} is missing")
            return default
        return self.data[key]

    def text(self, key: str, default: str | None = None, pattern: str | None = None) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or (pattern is not None and not re.fullmatch(pattern, value)):
            raise self._fail(key, "a string" + (f" matching {pattern}" if pattern else ""))
        return value

    def integer(self, key: str, low: int, high: int, default: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._fail(key, f"an integer from {low} to {high}")
        return value

    def texts(self, key: str, default: Sequence[str] | None = None) -> tuple[str, ...]:
        value = self.get(key, None if default is None else list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._fail(key, "a list of strings")
        return tuple(value)

    def done(self) -> None:
        unknown = set(self.data) - self.used
        if unknown:
            raise TemplateError(f"{self.source}: unknown keys in [{self.where}]: {', '.join(sorted(unknown))}")


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


#: The root disk's keys whose lists add to a base template's instead of replacing them.
ADDITIVE = ("packages", "exclude", "pip", "npm", "setup")
#: A requirement pip looks up in an index (name, extras, version specifiers): never an option,
#: a path or a URL, which would read the build host's files or bypass the registry.
_PIP_VERSION = r"[<>=!~]=?[A-Za-z0-9.*+!_-]+"
PIP_SPEC = rf"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?({_PIP_VERSION}(,{_PIP_VERSION})*)?"
#: A registry package for npm (name, @scope/name, @version or @tag or range), never a path,
#: URL, git or file: spec.
NPM_SPEC = r"(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*(@[A-Za-z0-9.^~<>=*+|_ -]+)?"


def _files(where: str, data: Any, source: Path) -> tuple[tuple[ImageFile, ...], dict[str, Any]]:
    """The `files` table: image path -> text, or {text | source, mode}; with its declaration
    (contents as sha256, so a host file's edit changes the image's key)."""
    if not isinstance(data, dict):
        raise TemplateError(f"{source}: [{where}] must be a table of image path = text or {{ source = ... }}")
    out, declared = [], {}
    for path, value in sorted(data.items()):
        rel = posixpath.normpath(path).lstrip("/")
        if not path.startswith("/") or path.endswith("/") or ".." in path.split("/") or rel in ("", "."):
            raise TemplateError(f"{source}: {where}: {path!r} must be an absolute file path without ..")
        entry = _Table(f"{where}.\"{path}\"", {"text": value} if isinstance(value, str) else value, source)
        mode = entry.integer("mode", 0, 0o7777, 0o644)
        entry.used.update({"text", "source"})
        if ("text" in entry.data) == ("source" in entry.data):
            raise TemplateError(f"{source}: {entry.where} must have one of text or source")
        if "text" in entry.data:
            content = entry.text("text").encode()
        else:
            host = Path(entry.text("source")).expanduser()
            host = host if host.is_absolute() else source.parent / host
            try:
                content = host.read_bytes()
            except OSError as exc:
                raise TemplateError(f"{source}: {entry.where}.source: cannot read {host}: {exc.strerror}") from None
        entry.done()
        out.append(ImageFile(rel, content, mode))
        declared[rel] = {"sha256": hashlib.sha256(content).hexdigest(), "mode": mode}
    return tuple(out), declared


def _template(name: str, table: _Table) -> TemplateSpec:
    source = table.source
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
        raise TemplateError(f"{source}: template name {name!r} must be lower-case letters, digits, - or _")
    cmdline = table.text("cmdline", "")
    if any(arg.startswith(("sandgate.", "tsc_early_khz=")) for arg in cmdline.split()):
        raise TemplateError(f"{source}: templates.{name}.cmdline must not set sandgate.* or tsc_early_khz "
                            "(the runtime adds them per boot)")
    rootfs: RootfsSpec | None = None
    table.used.add("rootfs")
    declared = dict(table.data)
    if "rootfs" in table.data:
        where = f"templates.{name}.rootfs"
        sub = _Table(where, table.data["rootfs"], source)
        sub.used.add("files")
        files, declared_files = _files(f"{where}.files", sub.data.get("files", {}), source)
        # (a template without files keeps the declaration, and so the image, it had before files existed)
        declared["rootfs"] = {**sub.data, "files": declared_files} if "files" in sub.data else sub.data
        rootfs = RootfsSpec(
            packages=sub.texts("packages"),
            exclude=sub.texts("exclude", ()),
            slack_mb=sub.integer("slack_mb", 0, 1 << 16, 16),
            pip=sub.texts("pip", ()),
            npm=sub.texts("npm", ()),
            files=files,
            setup=sub.texts("setup", ()),
            declaration=canonical(declared["rootfs"]),
        )
        sub.done()
        for kind, pattern in (("pip", PIP_SPEC), ("npm", NPM_SPEC)):
            bad = [spec for spec in getattr(rootfs, kind) if not re.fullmatch(pattern, spec)]
            if bad:
                raise TemplateError(f"{source}: {where}.{kind}: {', '.join(map(repr, bad))} must name registry "
                                    f"packages (name, extras, versions), not options, paths or URLs")
        if rootfs.npm and "nodejs" not in rootfs.packages:
            raise TemplateError(f"{source}: {where}.npm needs nodejs in {where}.packages")
    spec = TemplateSpec(
        name=name,
        memory_mb=table.integer("memory_mb", 64, 1 << 20),
        vcpus=table.integer("vcpus", 1, 64, 1),
        cmdline=cmdline,
        modules=table.texts("modules"),
        net_modules=table.texts("net_modules", ()),
        compression=table.text("compression", "none", pattern="none|gzip"),
        python=table.text("python", pattern=r"python3\.\d+"),
        compile_with=table.texts("compile_with", ()),
        packages=table.texts("packages"),
        include=table.texts("include"),
        exclude=table.texts("exclude", ()),
        optional=table.texts("optional", ()),
        dlopen=table.texts("dlopen", ()),
        sourceless=table.texts("sourceless", ()),
        rootfs=rootfs,
        declaration=canonical(declared),
    )
    if "busybox-static" not in spec.packages:
        raise TemplateError(f"{source}: templates.{name}.packages must hold busybox-static (the init's shell)")
    if rootfs is not None and not spec.compile_with:
        raise TemplateError(f"{source}: templates.{name}.compile_with must name the packages of {spec.python} "
                            "(the initramfs of a template with a root disk has no Python to compile the agent)")
    if rootfs is not None and "busybox-static" not in rootfs.packages:
        raise TemplateError(f"{source}: templates.{name}.rootfs.packages must hold busybox-static (the init's "
                            "shell on the disk)")
    table.done()
    return spec


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise TemplateError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise TemplateError(f"{path}: cannot read: {exc.strerror}") from None


#: One file's templates: name -> (the file, its table as written).
Layer = dict[str, tuple[Path, Any]]


def _merge(base: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    merged = {**copy.deepcopy(base), **{k: v for k, v in table.items() if k not in ("base", "rootfs")}}
    if "rootfs" in table:
        own = table["rootfs"]
        disk = merged.get("rootfs")
        if not isinstance(own, dict) or not isinstance(disk, dict):
            merged["rootfs"] = own  # no disk to add to (or a malformed table, which _template names)
        else:
            for key, value in own.items():
                if key in ADDITIVE and isinstance(value, list) and isinstance(disk.get(key), list):
                    disk[key] = [*disk[key], *(v for v in value if v not in disk[key])]
                elif key == "files" and isinstance(value, dict) and isinstance(disk.get(key), dict):
                    disk[key] = {**disk[key], **value}
                else:
                    disk[key] = value
    return merged


def _expand(name: str, layers: Sequence[Layer], top: int, chain: tuple[str, ...] = ()) -> tuple[Path, Any]:
    """`name`'s table as found from layer `top` down, its `base` chain merged in."""
    for level in range(top, -1, -1):
        if name in layers[level]:
            break
    else:
        raise TemplateError(f"templates.{chain[-1]}.base: no template {name!r} to start from" if chain
                            else f"no template {name!r}")
    source, table = layers[level][name]
    if not isinstance(table, dict) or "base" not in table:
        return source, table
    base = table["base"]
    if not isinstance(base, str):
        raise TemplateError(f"{source}: templates.{name}.base must be a string (a template's name)")
    if f"{level}:{name}" in chain:
        raise TemplateError(f"{source}: templates.{name}.base: the chain {' -> '.join(chain)} comes back to {name}")
    # `base` naming the template itself is the one it replaces, in a file below
    below = level - 1 if base == name else level
    if below < 0:
        raise TemplateError(f"{source}: templates.{name}.base: no template {base!r} below this file")
    base_source, parent = _expand(base, layers, below, (*chain, f"{level}:{name}"))
    if not isinstance(parent, dict):
        raise TemplateError(f"{base_source}: [templates.{base}] must be a table")
    return source, _merge(parent, table)


def _layer(path: Path, tables: Any) -> Layer:
    if not isinstance(tables, dict) or not tables:
        raise TemplateError(f"{path}: no [templates.<name>] tables")
    return {name: (path, table) for name, table in tables.items()}


def load_config(path: Path | None = None, user_file: Path | None = None) -> BuildConfig:
    """templates.toml parsed and checked, with the templates of `user_file` (a user's own
    templates file, `[runtimes.microvm] templates_file`) on top.

    Raises:
        TemplateError: a file is missing, is not TOML, or a table is malformed.
    """
    path = path or TEMPLATES_FILE
    data = _read_toml(path)
    unknown = set(data) - {"debian", "kernel", "templates"}
    if unknown:
        raise TemplateError(f"{path}: unknown tables: {', '.join(sorted(unknown))}")
    deb = _Table("debian", data.get("debian"), path)
    debian = DebianSources(
        suite=deb.text("suite", pattern=r"[a-z]+"),
        mirror=deb.text("mirror", pattern=r"https?://\S+"),
        security_mirror=deb.text("security_mirror", pattern=r"https?://\S+"),
        keyring=deb.text("keyring", pattern=r"/\S+"),
    )
    deb.done()
    ker = _Table("kernel", data.get("kernel"), path)
    kernel = KernelPin(
        package=ker.text("package", pattern=r"linux-image-[a-z0-9.+-]+"),
        version=ker.text("version", pattern=r"[A-Za-z0-9.+~:-]+"),
        sha256=ker.text("sha256", pattern=r"[0-9a-f]{64}"),
        metapackage=ker.text("metapackage", "linux-image-cloud-amd64", pattern=r"[a-z0-9.+-]+"),
    )
    ker.done()
    layers = [_layer(path, data.get("templates"))]
    if user_file is not None:
        user = _read_toml(user_file)
        if set(user) != {"templates"}:
            raise TemplateError(f"{user_file}: a user's templates file holds [templates.<name>] tables only "
                                f"({path} declares the Debian sources and the kernel)")
        layers.append(_layer(user_file, user["templates"]))
    names = dict.fromkeys(name for layer in layers for name in layer)
    templates = {}
    for name in names:
        source, table = _expand(name, layers, len(layers) - 1)
        templates[name] = _template(name, _Table(f"templates.{name}", table, source))
    return BuildConfig(debian, kernel, templates, canonical({"debian": data["debian"], "kernel": data["kernel"]}))


def load_templates(path: Path | None = None, user_file: Path | None = None) -> dict[str, TemplateSpec]:
    """The declared templates by name (templates.toml, then `user_file`'s). Raises TemplateError."""
    return load_config(path, user_file).templates
