"""templates.toml, parsed and checked: the Debian sources, the kernel pin and each template's tables."""

from __future__ import annotations

import json
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
class RootfsSpec:
    packages: tuple[str, ...]
    exclude: tuple[str, ...]
    slack_mb: int
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
    if "rootfs" in table.data:
        sub = _Table(f"templates.{name}.rootfs", table.data["rootfs"], source)
        rootfs = RootfsSpec(
            packages=sub.texts("packages"),
            exclude=sub.texts("exclude", ()),
            slack_mb=sub.integer("slack_mb", 0, 1 << 16, 16),
            declaration=canonical(table.data["rootfs"]),
        )
        sub.done()
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
        declaration=canonical(table.data),
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


def load_config(path: Path | None = None) -> BuildConfig:
    """templates.toml parsed and checked.

    Raises:
        TemplateError: the file is missing, is not TOML, or a table is malformed.
    """
    path = path or TEMPLATES_FILE
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TemplateError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{path}: not valid TOML: {exc}") from None
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
    tables = data.get("templates")
    if not isinstance(tables, dict) or not tables:
        raise TemplateError(f"{path}: no [templates.<name>] tables")
    templates = {name: _template(name, _Table(f"templates.{name}", t, path)) for name, t in tables.items()}
    return BuildConfig(debian, kernel, templates, canonical({"debian": data["debian"], "kernel": data["kernel"]}))


def load_templates(path: Path | None = None) -> dict[str, TemplateSpec]:
    """The declared templates by name (templates.toml). Raises TemplateError."""
    return load_config(path).templates
