"""Boot images of the microVM runtime, built from Debian packages and cached.

    python -m plugins.microvm.images [--template NAME]   build (the first half of
                                                          `sandgate images build microvm`)
    python -m plugins.microvm.images --rebuild [...]     build again from today's packages
    python -m plugins.microvm.images --repin             move the kernel pin in templates.toml

An image is a Debian cloud kernel (the uncompressed vmlinux, which QEMU's microvm boots through
its PVH entry), an initramfs (a newc cpio: busybox, the virtio modules, guest/init, the guest
agent, and for templates without a disk Debian's python3) and, for templates that declare one, a
read-only ext4 root disk made with debootstrap. Templates are data: templates.toml.

Packages that go into an image are downloaded with apt-get and unpacked with dpkg-deb, never
installed on the host; apt runs on the builder's own state for templates.toml's [debian]
sources, so the image is the same whichever distribution the host runs. The kernel .deb must
match its pinned sha256; every other package's version and sha256 go into the image's manifest.

Under `cache_root()/microvm` (0700):

    apt/                      apt's state for the [debian] sources
    debs/                     downloaded .debs (a pinned kernel stays buildable after Debian
                              drops it)
    kernel/<version>-<sha>/   vmlinux and modules of one kernel pin
    rootfs/<recipe>/          a root disk (Debian's files only) and its package list
    images/<template>/<recipe>/  one image: vmlinux, initrd.img, rootfs.ext4, manifest.json,
                              and the runtime's snapshot folders
    build.lock                held by whoever builds

An image's folder is named by its *recipe*: a hash of what is known without apt (the template's
tables, the kernel pin, the init script, the agent's sources, BUILDER_VERSION), so `find_image`
costs a few file reads. Its *key* adds what the build took from Debian (package versions and
hashes): the runtime keys its snapshots on it.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plugins.common import TerminalProgress, cache_root, file_lock, package_dir, private_dir, py_files

if TYPE_CHECKING:
    from elftools.elf.elffile import ELFFile

Progress = Callable[[float, str], None]

TEMPLATES_FILE = Path(__file__).with_name("templates.toml")
INIT_FILE = Path(__file__).parent / "guest" / "init"
#: Bump when the builder makes different images from the same inputs.
BUILDER_VERSION = 2
#: Every file in an image gets this mtime, so equal inputs give equal bytes.
EPOCH = 0
#: How old the builder's apt index may be before a build refreshes it.
APT_MAX_AGE_S = 24 * 3600
ARCH = "amd64"
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib64")
#: Top-level folders that bookworm merges into /usr; the images do the same.
MERGED = ("bin", "sbin", "lib", "lib64")
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class TemplateError(ValueError):
    """templates.toml is missing, malformed, or names something that does not exist."""


class HostError(RuntimeError):
    """This host cannot build images: a missing program or package, no root where root is
    needed, no way to reach Debian's archive. (Other RuntimeErrors are failed builds.)"""


# -- templates.toml ------------------------------------------------------------------------------


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


def _canonical(data: Any) -> str:
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
            declaration=_canonical(table.data["rootfs"]),
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
        declaration=_canonical(table.data),
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
    return BuildConfig(debian, kernel, templates, _canonical({"debian": data["debian"], "kernel": data["kernel"]}))


def load_templates(path: Path | None = None) -> dict[str, TemplateSpec]:
    """The declared templates by name (templates.toml). Raises TemplateError."""
    return load_config(path).templates


# -- images in the cache ---------------------------------------------------------------------------


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


def _agent_sources() -> dict[str, bytes]:
    """The guest agent's files, guest path below /opt/sandgate -> content."""
    agent = package_dir("guest_agent")
    if agent is None:
        raise RuntimeError("the guest_agent package is not importable; run from the sandgate checkout or install")
    return {f"guest_agent/{rel.as_posix()}": (agent / rel).read_bytes() for rel in py_files(agent)}


def recipe(config: BuildConfig, template: str) -> str:
    """The hash of what goes into `template`'s image that is known without apt."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode() + data)

    add("builder", str(BUILDER_VERSION).encode())
    add("sources+kernel", config.declaration.encode())
    add("template", config.templates[template].declaration.encode())
    add("init", INIT_FILE.read_bytes())
    for rel, data in sorted(_agent_sources().items()):
        add(rel, data)
    return digest.hexdigest()


def _image_dir(template: str, recipe_hash: str) -> Path:
    return microvm_cache() / "images" / template / recipe_hash[:24]


def _from_manifest(folder: Path) -> BootImage | None:
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
    return _from_manifest(_image_dir(template, recipe(config, template)))


# -- running things -------------------------------------------------------------------------------


class _Clock:
    """Calls `progress(seconds since the build began, phase)`."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.start = time.monotonic()

    def __call__(self, phase: str) -> None:
        self.progress(time.monotonic() - self.start, phase)


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


def _run(cmd: Sequence[str | Path], clock: _Clock, phase: str, *, cwd: Path | None = None,
         env: Mapping[str, str] | None = None) -> str:
    """Run `cmd`, ticking `clock` while it runs; its output (stdout and stderr), or RuntimeError
    naming the command and the end of its output."""
    argv = [str(c) for c in cmd]
    clock(phase)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd, env=None if env is None else dict(env))
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    clock(phase)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        text = out.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"{phase}: `{shlex.join(argv)}` failed (exit {code}):\n{text.strip()[-3000:]}")
    return text


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- host packages --------------------------------------------------------------------------------

QEMU = "qemu-system-x86_64"
#: Host package -> the programs it provides that sandgate runs.
HOST_TOOLS: dict[str, tuple[str, ...]] = {
    "qemu-system-x86": (QEMU,),
    "debootstrap": ("debootstrap",),
    "e2fsprogs": ("mkfs.ext4",),
}


def host_packages_needed(templates: Iterable[str] | None = None, config: BuildConfig | None = None) -> list[str]:
    """The host packages the microVM runtime and the build of `templates` need (all when None)
    that are missing here."""
    config = config or load_config()
    names = list(config.templates) if templates is None else list(templates)
    wanted = ["qemu-system-x86"]
    if any(config.templates[n].rootfs is not None for n in names if n in config.templates):
        wanted += ["debootstrap", "e2fsprogs"]
    missing = [pkg for pkg in wanted if not all(_which(tool) for tool in HOST_TOOLS[pkg])]
    if not Path(config.debian.keyring).is_file():
        missing.append("debian-archive-keyring")
    return missing


def ensure_host_packages(progress: Progress, templates: Iterable[str] | None = None) -> None:
    """Install what `host_packages_needed` lists with apt-get (after one `apt-get update`) when
    we are root; otherwise raise HostError with the command to run.

    Raises:
        HostError: packages are missing and cannot be installed from here.
    """
    if not _which("apt-get") or not _which("dpkg-deb"):
        raise HostError("building microVM images needs apt-get and dpkg-deb (a Debian or Ubuntu host)")
    missing = host_packages_needed(templates)
    if not missing:
        return
    command = f"apt-get update && apt-get install -y --no-install-recommends {' '.join(missing)}"
    if os.geteuid() != 0:
        raise HostError(f"missing host packages {', '.join(missing)}; run as root: {command}")
    clock = _Clock(progress)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(["apt-get", "-q", "update"], clock, "apt-get update (host)", env=env)
        _run(["apt-get", "-q", "install", "-y", "--no-install-recommends", *missing], clock,
             f"installing {' '.join(missing)}", env=env)
    except RuntimeError as exc:
        raise HostError(str(exc)) from exc
    still = host_packages_needed(templates)
    if still:
        raise HostError(f"apt-get installed {', '.join(missing)} but {', '.join(still)} still lack their programs")


def find_qemu(configured: str | None = None) -> str:
    """The QEMU binary: `configured` (`[runtimes.microvm] qemu`) or qemu-system-x86_64 on PATH.
    Looked up each time it is asked for, never when the runtime is made: `sandgate images build
    microvm` makes the runtime, then installs QEMU (`ensure_host_packages`), then needs it.

    Raises:
        HostError: no such executable.
    """
    found = _which(configured or QEMU)
    if found is None:
        what = f"the configured qemu {configured!r} is no executable" if configured else f"{QEMU} is not installed"
        raise HostError(f"{what} (`sandgate images build microvm` installs qemu-system-x86)")
    return found


# -- apt on the builder's own state ---------------------------------------------------------------


@dataclass(frozen=True)
class Deb:
    package: str
    version: str
    sha256: str
    path: Path


class Apt:
    """apt-get and apt-cache on a private state folder holding only the [debian] sources, so
    nothing depends on (or changes) the host's apt sources. The host's apt.conf (proxies) applies."""

    def __init__(self, base: Path, sources: DebianSources) -> None:
        self.base = base
        self.sources = sources
        self.debs = private_dir(base.parent / "debs")

    def options(self) -> list[str]:
        b = self.base
        opts = {
            "Dir::Etc::SourceList": b / "sources.list",
            "Dir::Etc::SourceParts": b / "empty",
            "Dir::Etc::Preferences": b / "empty" / "preferences",
            "Dir::Etc::PreferencesParts": b / "empty",
            "Dir::State": b / "state",
            "Dir::State::status": b / "status",
            "Dir::Cache": b / "cache",
            # (container images often turn these caches off; ours saves ~1 s per apt-cache run)
            "Dir::Cache::pkgcache": "pkgcache.bin",
            "Dir::Cache::srcpkgcache": "srcpkgcache.bin",
            "APT::Architecture": ARCH,
            "APT::Architectures": ARCH,
            "Acquire::Languages": "none",
        }
        if os.geteuid() == 0:
            # apt drops to _apt for downloads, who cannot write into a 0700 cache
            opts["APT::Sandbox::User"] = "root"
        return [arg for key, value in opts.items() for arg in ("-o", f"{key}={value}")]

    def update(self, clock: _Clock, *, force: bool = False) -> None:
        """Refresh the index when it is missing, older than APT_MAX_AGE_S, for other sources, or `force`."""
        b = self.base
        sources = self.sources.sources_list()
        stamp = b / "updated"
        current = (b / "sources.list").is_file() and (b / "sources.list").read_text() == sources
        if current and not force and stamp.is_file() and time.time() - stamp.stat().st_mtime < APT_MAX_AGE_S:
            return
        if not Path(self.sources.keyring).is_file():
            raise HostError(f"{self.sources.keyring} is missing: apt-get install debian-archive-keyring")
        for sub in ("empty", "state/lists/partial", "cache/archives/partial"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        (b / "status").touch()
        (b / "sources.list").write_text(sources)
        try:
            _run(["apt-get", "-q", *self.options(), "update"], clock, f"apt-get update ({self.sources.suite})")
        except RuntimeError as exc:
            raise HostError(f"cannot reach Debian's archive: {exc}") from exc
        stamp.touch()

    def show(self, *specs: str) -> list[dict[str, str]]:
        """The index fields of each of `specs` (package or package=version), candidate version.

        Raises:
            LookupError: the index lacks one of them."""
        proc = subprocess.run(["apt-cache", *self.options(), "show", "--no-all-versions", *specs],
                              capture_output=True, text=True, check=False)
        stanzas: list[dict[str, str]] = []
        for stanza in proc.stdout.split("\n\n"):
            fields: dict[str, str] = {}
            last = ""
            for line in stanza.splitlines():
                if line[:1] in (" ", "\t") and last:
                    fields[last] += "\n" + line.strip()
                elif ":" in line:
                    last, _, value = line.partition(":")
                    fields[last] = value.strip()
            if fields.get("Package"):
                stanzas.append(fields)
        by_name = {f["Package"]: f for f in stanzas}
        names = [spec.partition("=")[0] for spec in specs]
        if proc.returncode != 0 or not all(n in by_name for n in names):
            lines = [line for line in proc.stderr.splitlines() if line.startswith("E:")] or [proc.stderr.strip()]
            missing = [n for n in names if n not in by_name]
            raise LookupError(f"{' '.join(missing) or 'packages'} not in the {self.sources.suite} index: "
                              f"{' '.join(lines)[-800:]}")
        return [by_name[n] for n in names]

    def fetch(self, specs: Sequence[str], clock: _Clock) -> list[Deb]:
        """The .debs of `specs` (package or package=version) from debs/, downloading what is
        missing; each checked against the index's sha256."""
        found: list[Deb] = []
        try:
            wanted = list(zip(specs, self.show(*specs), strict=True))
        except LookupError as exc:
            raise RuntimeError(f"{exc} (templates.toml names a package Debian does not have)") from None
        missing = [(s, f) for s, f in wanted if not self._cached(f)]
        if missing:
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=self.debs))
            try:
                names = [f"{f['Package']}={f['Version']}" for _, f in missing]
                try:
                    _run(["apt-get", "-q", *self.options(), "download", *names], clock,
                         f"downloading {len(names)} packages", cwd=tmp)
                except RuntimeError as exc:
                    raise HostError(f"cannot download from Debian's archive: {exc}") from exc
                for _, fields in missing:
                    name = Path(fields["Filename"]).name
                    # apt-get names files with the epoch (1%3a...), the archive without it
                    got = list(tmp.glob(f"{fields['Package']}_*.deb"))
                    if len(got) != 1:
                        raise RuntimeError(f"apt-get download did not write {name}")
                    if _sha256(got[0]) != fields["SHA256"]:
                        raise RuntimeError(f"{name} does not match the index's sha256")
                    os.replace(got[0], self.debs / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        for _, fields in wanted:
            path = self.debs / Path(fields["Filename"]).name
            found.append(Deb(fields["Package"], fields["Version"], fields["SHA256"], path))
        return found

    def _cached(self, fields: Mapping[str, str]) -> bool:
        path = self.debs / Path(fields["Filename"]).name
        return path.is_file() and _sha256(path) == fields["SHA256"]


def _unpack(deb: Path, dest: Path, clock: _Clock) -> None:
    _run(["dpkg-deb", "-x", deb, dest], clock, f"unpacking {deb.name}")


# -- ELF -----------------------------------------------------------------------------------------
# pyelftools, lz4 and zstandard are imported where a build uses them: the runtime imports this
# module (BootImage, find_image) on its start path, and pyelftools alone takes ~65 ms to import.

#: XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit entry point QEMU uses to boot a vmlinux as a PVH guest.
PVH_NOTE = 18


@contextlib.contextmanager
def _elf(data: bytes) -> Iterator[ELFFile]:
    """`data` parsed by pyelftools (lazily: its errors inside the block become ValueError too).

    Raises:
        ValueError: not an ELF file, or a corrupt one.
    """
    from elftools.common.exceptions import ELFError
    from elftools.construct import ConstructError
    from elftools.elf.elffile import ELFFile

    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    try:
        yield ELFFile(io.BytesIO(data))
    # pyelftools raises ELFError, but lets a few of its construct parsers' errors through, and
    # OverflowError where a corrupt offset is past what a file can seek to
    except (ELFError, ConstructError, OverflowError) as exc:
        raise ValueError(f"corrupt ELF file: {exc}") from exc


def elf_deps(data: bytes) -> tuple[str | None, list[str]]:
    """An ELF file's program interpreter (PT_INTERP) and DT_NEEDED sonames."""
    from elftools.elf.dynamic import DynamicSegment
    from elftools.elf.segments import InterpSegment

    interp = None
    needed: list[str] = []
    with _elf(data) as elf:
        for segment in elf.iter_segments():
            if isinstance(segment, InterpSegment):
                interp = segment.get_interp_name()
            elif isinstance(segment, DynamicSegment):
                strtab, offset = segment.get_table_offset("DT_STRTAB")
                if strtab is None:
                    continue
                if offset is None:
                    raise ValueError("DT_STRTAB is outside every PT_LOAD segment")
                # pyelftools sets `needed` on DT_NEEDED tags (the soname from the string table)
                needed = [tag.needed for tag in segment.iter_tags("DT_NEEDED")]  # type: ignore[attr-defined]
    return interp, needed


def elf_notes(data: bytes) -> Iterator[tuple[str, int, bytes]]:
    """(name, type, desc) of each note in the PT_NOTE segments."""
    from elftools.elf.enums import ENUM_CORE_NOTE_N_TYPE, ENUM_NOTE_N_TYPE
    from elftools.elf.segments import NoteSegment

    with _elf(data) as elf:
        # pyelftools names the note types it knows (NT_GNU_BUILD_ID, ...) whatever the note's owner
        types = ENUM_CORE_NOTE_N_TYPE if elf["e_type"] == "ET_CORE" else ENUM_NOTE_N_TYPE
        for segment in elf.iter_segments("PT_NOTE"):
            assert isinstance(segment, NoteSegment)
            for note in segment.iter_notes():
                ntype = note["n_type"]
                yield note["n_name"] or "", ntype if isinstance(ntype, int) else types[ntype], note["n_descdata"]


def elf_section(data: bytes, name: str) -> bytes | None:
    """The contents of the section called `name`, or None."""
    with _elf(data) as elf:
        section = elf.get_section_by_name(name)
        return None if section is None else section.data()


# -- the kernel ------------------------------------------------------------------------------------

LZ4_LEGACY_MAGIC = 0x184C2102
#: The most one block of lz4's legacy frame decompresses to (lz4's LEGACY_BLOCKSIZE).
LZ4_LEGACY_BLOCK = 8 << 20


def _lz4_legacy(payload: bytes) -> bytes:
    """Decode lz4's legacy frame format (what the kernel's `lz4 -l` writes): blocks of
    compressed size + data, each independent, then the kernel's 4-byte uncompressed size.

    Raises:
        ValueError: a truncated or corrupt payload.
    """
    import lz4.block

    view = memoryview(payload)
    pos, out = 4, []
    while len(payload) - pos > 4:
        size = struct.unpack_from("<I", payload, pos)[0]
        pos += 4
        if size == LZ4_LEGACY_MAGIC:  # concatenated frames
            continue
        if pos + size > len(payload):
            raise ValueError("truncated LZ4 payload")
        try:
            # with uncompressed_size, lz4 takes the block as bare (no size prefix) and the size
            # as a bound: it returns what the block holds, and fails on a block that holds more
            out.append(lz4.block.decompress(view[pos:pos + size], uncompressed_size=LZ4_LEGACY_BLOCK))
        except lz4.block.LZ4BlockError as exc:
            raise ValueError(f"corrupt LZ4 block at byte {pos - 4} of the payload: {exc}") from None
        pos += size
    return b"".join(out)


def _zstd(payload: bytes) -> bytes:
    """Decode the zstd frame that `payload` starts with (the kernel appends its 4-byte
    uncompressed size after it).

    Raises:
        ValueError: a truncated or corrupt payload.
    """
    import zstandard

    reader = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = reader.decompress(payload)
    except zstandard.ZstdError as exc:
        raise ValueError(f"corrupt zstd payload: {exc}") from None
    if not reader.eof:
        raise ValueError("truncated zstd payload")
    return out


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed vmlinux (ELF) inside a bzImage, located through the boot protocol's
    payload_offset/payload_length fields, and checked for the PVH entry note.

    Raises:
        ValueError: not a bzImage, an unknown compression, or no PVH entry.
    """
    if len(bzimage) < 0x260 or bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS boot header)")
    if struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        raise ValueError("bzImage boot protocol older than 2.08 (no payload fields)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    if payload[:4] == struct.pack("<I", LZ4_LEGACY_MAGIC):
        vmlinux = _lz4_legacy(payload)
    elif payload[:6] == b"\xfd7zXZ\x00":
        vmlinux = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    elif payload[:2] == b"\x1f\x8b":
        vmlinux = zlib.decompressobj(wbits=31).decompress(payload)
    elif payload[:4] == b"\x28\xb5\x2f\xfd":
        vmlinux = _zstd(payload)
    elif payload[:3] == b"\x5d\x00\x00":
        vmlinux = lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
    else:
        raise ValueError(f"unknown kernel payload compression (magic {payload[:6].hex()})")
    if not any(name == "Xen" and ntype == PVH_NOTE for name, ntype, _ in elf_notes(vmlinux)):
        raise ValueError("the kernel has no PVH entry (CONFIG_PVH): QEMU's microvm cannot boot it directly")
    return vmlinux


def _module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def modules_dep_from_modinfo(modules_root: Path) -> str:
    """A modules.dep (depmod's format) for the .ko files under `modules_root`, from the
    `depends=` each module's .modinfo carries (modpost's record of the modules whose symbols it
    uses). Debian's kernel package ships no modules.dep: depmod makes it at install time."""
    paths = {}
    direct: dict[str, list[str]] = {}
    for ko in sorted(modules_root.rglob("*.ko")):
        rel = ko.relative_to(modules_root).as_posix()
        name = _module_name(rel)
        paths[name] = rel
        info = elf_section(ko.read_bytes(), ".modinfo") or b""
        deps: list[str] = []
        for field in info.split(b"\0"):
            if field.startswith(b"depends="):
                deps = [d.replace("-", "_") for d in field[8:].decode().split(",") if d]
        direct[name] = deps
    lines = []
    for name, rel in paths.items():
        order = resolve_modules_from(direct, set(), [name])
        lines.append(f"{rel}: " + " ".join(paths[d] for d in reversed(order[:-1]) if d in paths))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """modules.dep as module name -> (path, dependency names)."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        path, _, deps = line.partition(":")
        out[_module_name(path.strip())] = (path.strip(), [_module_name(d) for d in deps.split()])
    return out


def resolve_modules_from(direct: Mapping[str, Sequence[str]], builtin: set[str], wanted: Iterable[str]) -> list[str]:
    """Module names in load order (each after everything it depends on), built-in ones left out.

    Raises:
        ValueError: a module is neither known nor built in, or the dependencies form a cycle.
    """
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if state.get(name) == 2:
            return
        if name in builtin:
            state[name] = 2
            return
        if name not in direct:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise ValueError(f"kernel module {name}{via} is neither in modules.dep nor built in")
        if state.get(name) == 1:
            raise ValueError(f"kernel module dependency cycle: {' -> '.join((*chain, name))}")
        state[name] = 1
        for dep in direct[name]:
            visit(dep, (*chain, name))
        state[name] = 2
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def resolve_modules(modules_dep: str, builtin_text: str, wanted: Iterable[str]) -> list[str]:
    """Paths (relative to /lib/modules/<release>) of `wanted` and their dependencies, in load
    order, from modules.dep and modules.builtin texts."""
    deps = parse_modules_dep(modules_dep)
    builtin = {_module_name(line.strip()) for line in builtin_text.splitlines() if line.strip()}
    names = resolve_modules_from({n: d for n, (_, d) in deps.items()}, builtin, wanted)
    return [deps[n][0] for n in names]


@dataclass(frozen=True)
class Kernel:
    dir: Path
    release: str
    pin: KernelPin

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def modules(self) -> Path:
        return self.dir / "modules"


def kernel_dir(pin: KernelPin) -> Path:
    """Where the pinned kernel's vmlinux, config and modules (with modules.dep) are cached."""
    return microvm_cache() / "kernel" / f"{pin.version}-{pin.sha256[:12]}"


def _kernel(config: BuildConfig, apt: Apt, clock: _Clock) -> Kernel:
    """The pinned kernel's vmlinux and modules, from the cache or made from its .deb."""
    pin = config.kernel
    folder = kernel_dir(pin)
    base = private_dir(folder.parent)
    meta = folder / "kernel.json"
    if meta.is_file():
        return Kernel(folder, json.loads(meta.read_text())["release"], pin)
    deb = _pinned_kernel_deb(pin, apt, clock)
    tmp = _fresh_dir(base / ".build")
    try:
        unpacked = tmp / "deb"
        _unpack(deb, unpacked, clock)
        clock("extracting vmlinux")
        images = sorted((unpacked / "boot").glob("vmlinuz-*"))
        if len(images) != 1:
            raise RuntimeError(f"{deb.name} holds {len(images)} boot/vmlinuz-* files, expected 1")
        release = images[0].name.removeprefix("vmlinuz-")
        (tmp / "vmlinux").write_bytes(extract_vmlinux(images[0].read_bytes()))
        shutil.copy(unpacked / "boot" / f"config-{release}", tmp / "config")
        src = next((p for p in (unpacked / "lib/modules" / release, unpacked / "usr/lib/modules" / release)
                    if p.is_dir()), None)
        if src is None:
            raise RuntimeError(f"{deb.name} has no lib/modules/{release}")
        os.rename(src, tmp / "modules")
        shutil.rmtree(unpacked)
        if not (tmp / "modules/modules.dep").is_file():
            clock("reading module dependencies")
            (tmp / "modules/modules.dep").write_text(modules_dep_from_modinfo(tmp / "modules"))
        (tmp / "kernel.json").write_text(json.dumps({"release": release, "package": pin.package,
                                                     "version": pin.version, "sha256": pin.sha256}))
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Kernel(folder, release, pin)


def _pinned_kernel_deb(pin: KernelPin, apt: Apt, clock: _Clock) -> Path:
    """The pinned kernel .deb, checked against the pin's sha256.

    Raises:
        RuntimeError: the archive no longer has it, or what it has does not match the pin.
    """
    for deb in sorted(apt.debs.glob(f"{pin.package}_*.deb")):
        if _sha256(deb) == pin.sha256:
            return deb
    apt.update(clock)
    try:
        (fields,) = apt.show(f"{pin.package}={pin.version}")
    except LookupError:
        apt.update(clock, force=True)
        try:
            (fields,) = apt.show(f"{pin.package}={pin.version}")
        except LookupError:
            raise RuntimeError(
                f"the pinned kernel {pin.package} {pin.version} is no longer in Debian's archive; move the pin "
                f"with `python -m plugins.microvm.images --repin` (templates.toml [kernel] says how)") from None
    check_pin(pin, fields.get("SHA256", ""))
    (fetched,) = apt.fetch([f"{pin.package}={pin.version}"], clock)
    check_pin(pin, _sha256(fetched.path))
    return fetched.path


def check_pin(pin: KernelPin, sha256: str) -> None:
    """Raise RuntimeError unless `sha256` is the pinned one."""
    if sha256 != pin.sha256:
        raise RuntimeError(f"refusing {pin.package} {pin.version}: its sha256 is {sha256 or 'unknown'}, "
                           f"templates.toml pins {pin.sha256}")


# -- the initramfs and root trees -----------------------------------------------------------------


def _merged(rel: str) -> str:
    """`rel` as it lands in an image whose /bin, /sbin, /lib and /lib64 live in /usr."""
    top = rel.partition("/")[0]
    return f"usr/{rel}" if top in MERGED else rel


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in patterns)


def _resolve(root: Path, rel: str) -> str | None:
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


def _make_root_skeleton(root: Path) -> None:
    for top in MERGED:
        (root / "usr" / top).mkdir(parents=True, exist_ok=True)
        (root / top).symlink_to(f"usr/{top}")


def _select(unpacked: Path, root: Path, include: Sequence[str], exclude: Sequence[str]) -> None:
    """Copy the files and symlinks of `unpacked` that `include` and not `exclude` select into
    `root`, /usr-merged."""
    for dirpath, dirnames, filenames in os.walk(unpacked):
        dirnames.sort()
        for name in [*sorted(filenames), *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            src = Path(dirpath, name)
            rel = _merged(src.relative_to(unpacked).as_posix())
            if not _matches(rel, include) or _matches(rel, exclude):
                continue
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(dest):
                dest.unlink()
            if src.is_symlink():
                dest.symlink_to(os.readlink(src))
            else:
                shutil.copy2(src, dest)


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _prune_libraries(root: Path, optional: Sequence[str], dlopen: Sequence[str]) -> list[str]:
    """Keep the shared libraries (in LIB_DIRS) that the image's programs and extensions need,
    transitively, plus `dlopen`; drop the rest. An `optional` ELF whose libraries are missing is
    dropped (returned); any other raises RuntimeError."""
    libs: dict[str, str] = {}  # soname -> rel
    for lib_dir in LIB_DIRS:
        folder = root / lib_dir
        if folder.is_dir() and not folder.is_symlink():
            for entry in sorted(folder.iterdir()):
                if entry.is_file() or entry.is_symlink():
                    libs.setdefault(entry.name, f"{lib_dir}/{entry.name}")
    lib_entries = set(libs.values())
    closures: dict[str, tuple[frozenset[str], frozenset[str]]] = {}

    def needs(rel: str, data: bytes | None = None) -> tuple[frozenset[str], frozenset[str]]:
        """(entries to keep, missing sonames) for the ELF file at `rel`."""
        if rel in closures:
            return closures[rel]
        closures[rel] = (frozenset(), frozenset())  # cycles between libraries end here
        keep: set[str] = set()
        missing: set[str] = set()
        interp, needed = elf_deps(data if data is not None else (root / rel).read_bytes())
        targets = [_merged(interp.lstrip("/"))] if interp else []
        for soname in needed:
            if soname in libs:
                targets.append(libs[soname])
            else:
                missing.add(soname)
        for target in targets:
            real = _resolve(root, target)
            if real is None:
                missing.add(target)
                continue
            keep.update({target, real})
            sub_keep, sub_missing = needs(real)
            keep |= sub_keep
            missing |= sub_missing
        closures[rel] = (frozenset(keep), frozenset(missing))
        return closures[rel]

    keep: set[str] = set()
    dropped: list[str] = []
    for soname in dlopen:
        if soname not in libs or (real := _resolve(root, libs[soname])) is None:
            raise RuntimeError(f"{soname} (dlopen list) is in none of the template's packages")
        sub_keep, sub_missing = needs(real)
        if sub_missing:
            raise RuntimeError(f"{soname} needs {', '.join(sorted(sub_missing))}, in none of the template's packages")
        keep |= {libs[soname], real, *sub_keep}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if rel in lib_entries or path.is_symlink() or not _is_elf(path):
                continue
            data = path.read_bytes()
            sub_keep, sub_missing = needs(rel, data)
            if not sub_missing:
                keep |= sub_keep
            elif _matches(rel, optional):
                path.unlink()
                dropped.append(f"{rel} (needs {', '.join(sorted(sub_missing))})")
            else:
                raise RuntimeError(f"{rel} needs {', '.join(sorted(sub_missing))}, in none of the template's "
                                   "packages: add the package that has it (apt-file search) to templates.toml")
    for rel in lib_entries - keep:
        (root / rel).unlink()
    return dropped


def _busybox_links(root: Path) -> None:
    """A link for every busybox applet that the image has no program for."""
    busybox = root / "usr/bin/busybox"
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        rel = _merged(applet.strip("/"))
        if Path(rel).name in ("busybox", "linuxrc"):
            continue
        link = root / rel
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/usr/bin/busybox")


ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
}
NET_FILES = {
    "etc/hostname": "sandbox\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": "",  # the init writes QEMU's resolver when the sandbox has a network
}


def _write_files(root: Path, files: Mapping[str, str | bytes], mode: int = 0o644) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            path.unlink()
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        os.chmod(path, mode)


def _install_guest(root: Path) -> None:
    """The init script and the agent under /opt/sandgate. (For a template with a root disk the
    init copies them onto the disk's overlay at boot: the disk itself is Debian's alone, so
    editing the agent never means running debootstrap again.)"""
    _write_files(root, {"opt/sandgate/init": INIT_FILE.read_bytes()}, 0o755)
    _write_files(root, {f"opt/sandgate/{rel}": data for rel, data in _agent_sources().items()})


def _install_modules(root: Path, kernel: Kernel, spec: TemplateSpec) -> list[str]:
    """The template's modules with their dependencies under /lib/modules/<release>, and the
    init's load lists etc/sandgate/modules (always) and modules.net (sandgate.net=1)."""
    dep_text = (kernel.modules / "modules.dep").read_text()
    builtin = (kernel.modules / "modules.builtin").read_text()
    try:
        core = resolve_modules(dep_text, builtin, spec.modules)
        net = [m for m in resolve_modules(dep_text, builtin, spec.net_modules) if m not in core]
    except ValueError as exc:
        raise TemplateError(f"templates.{spec.name}: {exc}") from None
    dest = root / "usr/lib/modules" / kernel.release
    for rel in [*core, *net]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel.modules / rel, dest / rel)
    chosen = set(core + net)
    # busybox modprobe reads this, should anything in the guest ask for a module by name
    lines = [line for line in dep_text.splitlines() if line.partition(":")[0] in chosen]
    for name in ("modules.dep", "modules.builtin"):
        text = "\n".join(lines) + "\n" if name == "modules.dep" else builtin
        (dest / name).write_text(text)
    where = f"/lib/modules/{kernel.release}"
    _write_files(root, {
        "etc/sandgate/modules": "".join(f"{where}/{m}\n" for m in core),
        "etc/sandgate/modules.net": "".join(f"{where}/{m}\n" for m in net),
    })
    return [_module_name(m) for m in core + net]


# Run by the image's own python: bytecode its interpreter will accept without compiling, with
# tracebacks naming the guest's paths. Unchecked-hash pycs are never compared with their
# sources, which is right for files nobody edits in the guest (and costs no stat at import).
_PRECOMPILE = """
import compileall, py_compile, sys
mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
bad = [h for h, g in zip(sys.argv[1::2], sys.argv[2::2])
       if not compileall.compile_dir(h, ddir=g, quiet=1, force=True, workers=1, invalidation_mode=mode)]
sys.exit(f"could not compile everything in {bad}" if bad else 0)
"""


def _precompile(root: Path, folders: Sequence[str], clock: _Clock, *, python: str, python_root: Path | None = None,
                sourceless: Sequence[str] = ()) -> None:
    """Compile every .py below `folders` (paths in `root`) with `python` from `python_root`
    (default: `root` itself), run on the host through that tree's own dynamic loader and
    libraries. Sources matching `sourceless` are then replaced by their bytecode (module.pyc
    beside where module.py was)."""
    runtime = python_root or root
    loader = _resolve(runtime, "usr/lib64/ld-linux-x86-64.so.2")
    exe = _resolve(runtime, f"usr/bin/{python}")
    if loader is None or exe is None:
        raise RuntimeError(f"{runtime} has no usr/bin/{python} or no dynamic loader")
    args: list[str | Path] = []
    for folder in folders:
        if (root / folder).is_dir():
            args += [root / folder, f"/{folder}"]
    # A fixed hash seed: frozenset constants are marshalled in hash order.
    env = {"PATH": os.defpath, "LC_ALL": "C.UTF-8", "PYTHONHOME": str(runtime / "usr"), "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1"}
    _run([runtime / loader, "--library-path", f"{runtime}/usr/lib/x86_64-linux-gnu", runtime / exe,
          "-s", "-S", "-c", _PRECOMPILE, *args], clock, "precompiling Python modules", env=env)
    if not sourceless:
        return
    tag = "cpython-" + python.removeprefix("python").replace(".", "")
    for folder in folders:
        for source in sorted((root / folder).rglob("*.py")):
            if not _matches(source.relative_to(root).as_posix(), sourceless):
                continue
            pyc = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
            if not pyc.is_file():
                raise RuntimeError(f"{source.relative_to(root)} has no {tag} bytecode")
            os.replace(pyc, source.with_suffix(".pyc"))
            source.unlink()
        for cache in sorted((root / folder).rglob("__pycache__"), reverse=True):
            with contextlib.suppress(OSError):  # still holds bytecode of kept sources
                cache.rmdir()


# -- cpio ------------------------------------------------------------------------------------------

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


def check_tree(root: Path, spec: TemplateSpec) -> None:
    """Raise RuntimeError unless `root` holds what guest/init and the agent need."""
    needed = ["opt/sandgate/init", "usr/bin/busybox", "etc/sandgate/image.conf", "etc/sandgate/modules",
              "etc/passwd", "opt/sandgate/guest_agent/__main__.py", *(f"{d}/" for d in IMAGE_DIRS)]
    if spec.rootfs is None:
        needed += ["usr/bin/python3", "usr/lib/python3/dist-packages/msgpack/", "usr/lib64/ld-linux-x86-64.so.2"]
    else:
        needed.append("newroot/")
    missing = []
    for rel in needed:
        real = _resolve(root, rel.rstrip("/"))
        if real is None or (root / real).is_dir() != rel.endswith("/"):
            missing.append(rel)
    if not (root / "init").is_symlink() or os.readlink(root / "init") != "opt/sandgate/init":
        missing.append("init -> opt/sandgate/init")
    for name in ("modules", "modules.net"):
        listed = root / "etc/sandgate" / name
        for module in listed.read_text().split() if listed.is_file() else []:
            if not (root / _merged(module.lstrip("/"))).is_file():
                missing.append(module)
    if missing:
        raise RuntimeError(f"the {spec.name} initramfs lacks {', '.join(missing)}")


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


# -- building --------------------------------------------------------------------------------------

IMAGE_DIRS = ("dev", "proc", "sys", "tmp", "run", "work", "root", "mnt", "var/tmp", "etc/sandgate")


def _initramfs_tree(spec: TemplateSpec, kernel: Kernel, apt: Apt, tmp: Path, clock: _Clock,
                    manifest: dict[str, Any]) -> Path:
    debs = apt.fetch([*spec.packages, *spec.compile_with], clock)
    manifest["debs"] = [{"package": d.package, "version": d.version, "sha256": d.sha256} for d in debs]
    unpacked, tools = tmp / "debs", tmp / "compile-debs"
    for deb in debs:
        _unpack(deb.path, tools if deb.package in spec.compile_with else unpacked, clock)
    root = tmp / "initramfs"
    _make_root_skeleton(root)
    clock("assembling the initramfs")
    _select(unpacked, root, spec.include, spec.exclude)
    if not (root / "usr/bin/busybox").is_file():
        raise TemplateError(f"templates.{spec.name}.include must select usr/bin/busybox")
    manifest["dropped"] = _prune_libraries(root, spec.optional, spec.dlopen)
    _busybox_links(root)
    for sub in IMAGE_DIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    _write_files(root, {**ETC_FILES, **NET_FILES})
    _install_guest(root)
    manifest["modules"] = _install_modules(root, kernel, spec)
    conf = f"SANDGATE_TEMPLATE={spec.name}\n"
    if spec.rootfs is None:
        if not (root / "usr/bin" / spec.python).is_file():
            raise TemplateError(f"templates.{spec.name}.python: usr/bin/{spec.python} is not in the image")
        for link in ("python3", "python"):
            if not os.path.lexists(root / "usr/bin" / link):
                (root / "usr/bin" / link).symlink_to(spec.python)
        _precompile(root, [f"usr/lib/{spec.python}", "usr/lib/python3/dist-packages", "opt/sandgate"], clock,
                    python=spec.python, sourceless=spec.sourceless)
    else:
        (root / "newroot").mkdir()
        conf += "SANDGATE_ROOT_DISK=/dev/vda\n"
        compiler = tmp / "compiler"
        _make_root_skeleton(compiler)
        _select(tools, compiler, [f"usr/bin/{spec.python}", f"usr/lib/{spec.python}/*", "usr/lib/x86_64-linux-gnu/*",
                                  "usr/lib64/*"], ())
        _precompile(root, ["opt/sandgate"], clock, python=spec.python, python_root=compiler)
        shutil.rmtree(compiler)
    _write_files(root, {"etc/sandgate/image.conf": conf})
    (root / "init").symlink_to("opt/sandgate/init")
    for folder in (unpacked, tools):
        shutil.rmtree(folder, ignore_errors=True)
    return root


def _dpkg_status(path: Path) -> dict[str, str]:
    """Installed packages -> versions, from a dpkg status file."""
    out = {}
    for stanza in path.read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(out.items()))


def _rootfs_base(config: BuildConfig, spec: TemplateSpec, rootfs: RootfsSpec, clock: _Clock, *,
                 rebuild: bool) -> tuple[Path, dict[str, str]]:
    """The template's read-only disk: a Debian root (debootstrap, then the suite's updates) as
    an ext4 image, and its installed packages. It holds nothing of sandgate's, so it is cached
    by its own recipe ([debian], the rootfs table) and survives edits to the agent or the init.
    Called with build.lock held."""
    digest = hashlib.sha256(_canonical([BUILDER_VERSION, asdict(config.debian), rootfs.declaration]).encode())
    parent = private_dir(microvm_cache() / "rootfs")
    folder = parent / digest.hexdigest()[:24]
    if not rebuild and (folder / "packages.json").is_file():
        return folder / "rootfs.ext4", json.loads((folder / "packages.json").read_text())
    debian = config.debian
    tmp = _fresh_dir(parent / ".build")
    target = tmp / "root"
    cache = private_dir(microvm_cache() / "debootstrap")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           "HOME": "/root"}
    try:
        _run(["debootstrap", "--variant=minbase", f"--arch={ARCH}", "--components=main",
              f"--include={','.join(rootfs.packages)}", f"--keyring={debian.keyring}", f"--cache-dir={cache}",
              debian.suite, target, debian.mirror], clock, "debootstrap (minutes)", env=env)
        # debootstrap takes the suite alone; the security and point-release updates come from apt
        _write_files(target, {"etc/apt/sources.list": debian.sources_list()})
        for args in (["update"], ["-y", "--no-install-recommends", "dist-upgrade"], ["clean"]):
            _run(["chroot", target, "apt-get", "-q", *args], clock, f"root disk: apt-get {args[-1]}", env=env)
        packages = _dpkg_status(target / "var/lib/dpkg/status")
        clock("assembling the root disk")
        for dirpath, dirnames, filenames in os.walk(target, topdown=True):
            for name in [*dirnames, *filenames]:
                path = Path(dirpath, name)
                if _matches(path.relative_to(target).as_posix(), rootfs.exclude):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
            dirnames[:] = [d for d in dirnames if (Path(dirpath) / d).is_dir()]
        _write_files(target, NET_FILES)
        (target / "work").mkdir(exist_ok=True)
        for needed in (f"usr/bin/{spec.python}", "usr/bin/busybox", "opt"):
            if _resolve(target, needed) is None:
                raise RuntimeError(f"the {spec.name} root disk has no {needed}")
        files, size = 0, 0
        for dirpath, dirnames, filenames in os.walk(target):
            for name in dirnames + filenames:
                files += 1
                size += os.lstat(os.path.join(dirpath, name)).st_size
        size_mb = int(size * 1.15) // (1 << 20) + files * 4096 // (1 << 20) + rootfs.slack_mb + 16
        # No journal: nothing ever writes to the disk (each VM writes to its own tmpfs overlay).
        _run(["mkfs.ext4", "-q", "-F", "-L", "sandgate-root", "-m", "0", "-O", "^has_journal",
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
    _prune_old(parent, folder)
    return folder / "rootfs.ext4", packages


def _fresh_dir(path: Path) -> Path:
    """An empty folder at `path`. Builders hold build.lock, so one fixed name serves: what is
    there was left by a builder that died. A fixed path also makes the bytecode reproducible
    (CPython's marshal output depends on what the compiling process did, paths included)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    return path


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _prune_old(parent: Path, keep: Path, count: int = 2) -> None:
    """Drop all but the `count` newest images of a template (`keep` among them): a gateway
    still running the previous one keeps working while it is replaced."""
    images = sorted((p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".") and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[count - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def build_image(template: str, progress: Progress, *, rebuild: bool = False) -> BootImage:
    """`template`'s image, built unless the cache has it. Safe to call from several processes
    at once: one builds (under build.lock, in a temporary folder renamed into place), the
    others wait and return its image. `rebuild` builds it again even so, from the packages
    Debian has today (the way to take in security updates without changing the recipe).

    Raises:
        TemplateError: unknown template or a bad templates.toml.
        HostError: this host cannot build it (no root for a root disk, Debian unreachable, ...).
        RuntimeError: a check or a build step failed (the message says which).
    """
    config = load_config()
    if template not in config.templates:
        raise TemplateError(f"unknown microvm template {template!r}; templates.toml declares "
                            f"{', '.join(sorted(config.templates))}")
    found = None if rebuild else find_image(template)
    if found is not None:
        return found
    spec = config.templates[template]
    if spec.rootfs is not None and os.geteuid() != 0:
        raise HostError(f"template {template!r} has a root disk, which debootstrap can only make as root: run "
                        "the build as root (with SANDGATE_CACHE_DIR set to the cache the gateway uses)")
    base = private_dir(microvm_cache())
    clock = _Clock(progress)
    with file_lock(base / "build.lock"):
        recipe_hash = recipe(config, template)
        folder = _image_dir(template, recipe_hash)
        found = None if rebuild else _from_manifest(folder)
        if found is not None:
            return found
        apt = Apt(private_dir(base / "apt"), config.debian)
        kernel = _kernel(config, apt, clock)
        apt.update(clock, force=rebuild)
        parent = private_dir(folder.parent)
        tmp = _fresh_dir(parent / ".build")
        try:
            manifest: dict[str, Any] = {
                "template": template, "recipe": recipe_hash, "builder": BUILDER_VERSION,
                "kernel": {"package": kernel.pin.package, "version": kernel.pin.version,
                           "sha256": kernel.pin.sha256, "release": kernel.release},
            }
            root = _initramfs_tree(spec, kernel, apt, tmp, clock, manifest)
            check_tree(root, spec)
            clock("writing the initramfs")
            write_initramfs(root, tmp / "initrd.img", spec.compression)
            shutil.rmtree(root)
            _link_or_copy(kernel.vmlinux, tmp / "vmlinux")
            files = {"kernel": "vmlinux", "initrd": "initrd.img", "rootfs": None}
            if spec.rootfs is not None:
                disk, manifest["rootfs_packages"] = _rootfs_base(config, spec, spec.rootfs, clock, rebuild=rebuild)
                _link_or_copy(disk, tmp / "rootfs.ext4")
                files["rootfs"] = "rootfs.ext4"
            inputs = {k: manifest.get(k) for k in ("recipe", "kernel", "debs", "rootfs_packages")}
            manifest.update({
                "key": hashlib.sha256(_canonical(inputs).encode()).hexdigest(),
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
        _prune_old(parent, folder)
    image = _from_manifest(folder)
    if image is None:
        raise RuntimeError(f"{folder}: the image just built cannot be read back")
    return image


def build_images(template: str | None, progress: Progress, *, rebuild: bool = False) -> list[BootImage]:
    """What `sandgate images build microvm [--template NAME]` does before its snapshots: the
    host packages, then the image of `template` (every declared template when None)."""
    names = list(load_templates()) if template is None else [template]
    if template is not None and template not in load_templates():
        raise TemplateError(f"unknown microvm template {template!r}; templates.toml declares "
                            f"{', '.join(sorted(load_templates()))}")
    ensure_host_packages(progress, names)
    return [build_image(name, progress, rebuild=rebuild) for name in names]


# -- moving the kernel pin -------------------------------------------------------------------------


def repin(path: Path | None = None, progress: Progress | None = None) -> KernelPin:
    """Point [kernel] at the package the metapackage depends on today (version and sha256 from
    the signed index) and rewrite those lines of templates.toml."""
    path = path or TEMPLATES_FILE
    config = load_config(path)
    clock = _Clock(progress or TerminalProgress())
    apt = Apt(private_dir(private_dir(microvm_cache()) / "apt"), config.debian)
    apt.update(clock, force=True)
    try:
        depends = apt.show(config.kernel.metapackage)[0].get("Depends", "")
        match = re.search(r"(linux-image-[a-z0-9.+-]+)", depends)
        if match is None:
            raise RuntimeError(f"{config.kernel.metapackage} depends on no linux-image package ({depends!r})")
        (fields,) = apt.show(match.group(1))
    except LookupError as exc:
        raise RuntimeError(str(exc)) from None
    pin = KernelPin(fields["Package"], fields["Version"], fields["SHA256"], config.kernel.metapackage)
    text = path.read_text()
    head, sep, rest = text.partition("\n[kernel]\n")
    if not sep:
        raise TemplateError(f"{path}: no [kernel] table to rewrite")
    table, nxt, tail = rest.partition("\n[")
    for key in ("package", "version", "sha256"):
        table, n = re.subn(rf'(?m)^{key} = ".*"$', f'{key} = "{getattr(pin, key)}"', table)
        if n != 1:
            raise TemplateError(f"{path}: [kernel] must have one `{key} = \"...\"` line to rewrite")
    new = head + sep + table + nxt + tail
    staged = path.with_name(f".{path.name}.new")
    staged.write_text(new)
    try:
        load_config(staged)  # never leave a file that does not load
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return pin


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.microvm.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", help="build this template only (default: all)")
    parser.add_argument("--rebuild", action="store_true",
                        help="build again from today's packages even when the cache has the image")
    parser.add_argument("--repin", action="store_true", help="move the kernel pin to Debian's current package")
    args = parser.parse_args(argv)
    progress = TerminalProgress()
    try:
        if args.repin:
            old = load_config().kernel
            pin = repin(progress=progress)
            progress(0.0, "done")
            if pin == old:
                print(f"kernel pin unchanged: {pin.package} {pin.version}")
            else:
                print(f"kernel pin moved: {old.package} {old.version} -> {pin.package} {pin.version} "
                      f"(sha256 {pin.sha256}); rebuild and run the microvm tests before committing")
            return 0
        start = time.monotonic()
        built = build_images(args.template, progress, rebuild=args.rebuild)
        progress(time.monotonic() - start, "done")
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"\n{parser.prog}: {exc}", file=sys.stderr)
        return 1
    for image in built:
        size = image.initrd.stat().st_size / (1 << 20)
        print(f"{image.template}: key {image.key[:16]}, {image.dir} (initrd {size:.1f} MB"
              + (f", rootfs {image.rootfs.stat().st_size / (1 << 20):.0f} MB)" if image.rootfs else ")"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
