"""The pinned Debian kernel: its .deb checked against the pin, the vmlinux QEMU's microvm boots
(decompressed from the bzImage), its modules and their load order, and moving the pin.

lz4 and zstandard are imported where a kernel is decompressed, not with this module."""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from plugins.common import TerminalProgress, private_dir
from plugins.microvm.images.apt import Apt, sha256_file, unpack
from plugins.microvm.images.cache import fresh_dir, microvm_cache
from plugins.microvm.images.commands import Clock, Progress
from plugins.microvm.images.elf import elf_notes, elf_section
from plugins.microvm.images.templates import TEMPLATES_FILE, BuildConfig, KernelPin, TemplateError, load_config

#: XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit entry point QEMU uses to boot a vmlinux as a PVH guest.
PVH_NOTE = 18
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


def module_name(path: str) -> str:
    return Path(path).name.removesuffix(".ko").replace("-", "_")


def modules_dep_from_modinfo(modules_root: Path) -> str:
    """A modules.dep (depmod's format) for the .ko files under `modules_root`, from the
    `depends=` each module's .modinfo carries (modpost's record of the modules whose symbols it
    uses). Debian's kernel package ships no modules.dep: depmod makes it at install time."""
    paths = {}
    direct: dict[str, list[str]] = {}
    for ko in sorted(modules_root.rglob("*.ko")):
        rel = ko.relative_to(modules_root).as_posix()
        name = module_name(rel)
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
        out[module_name(path.strip())] = (path.strip(), [module_name(d) for d in deps.split()])
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
    builtin = {module_name(line.strip()) for line in builtin_text.splitlines() if line.strip()}
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


def prepare_kernel(config: BuildConfig, apt: Apt, clock: Clock) -> Kernel:
    """The pinned kernel's vmlinux and modules, from the cache or made from its .deb."""
    pin = config.kernel
    folder = kernel_dir(pin)
    base = private_dir(folder.parent)
    meta = folder / "kernel.json"
    if meta.is_file():
        return Kernel(folder, json.loads(meta.read_text())["release"], pin)
    deb = _pinned_kernel_deb(pin, apt, clock)
    tmp = fresh_dir(base / ".build")
    try:
        unpacked = tmp / "deb"
        unpack(deb, unpacked, clock)
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


def _pinned_kernel_deb(pin: KernelPin, apt: Apt, clock: Clock) -> Path:
    """The pinned kernel .deb, checked against the pin's sha256.

    Raises:
        RuntimeError: the archive no longer has it, or what it has does not match the pin.
    """
    for deb in sorted(apt.debs.glob(f"{pin.package}_*.deb")):
        if sha256_file(deb) == pin.sha256:
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
    check_pin(pin, sha256_file(fetched.path))
    return fetched.path


def check_pin(pin: KernelPin, sha256: str) -> None:
    """Raise RuntimeError unless `sha256` is the pinned one."""
    if sha256 != pin.sha256:
        raise RuntimeError(f"refusing {pin.package} {pin.version}: its sha256 is {sha256 or 'unknown'}, "
                           f"templates.toml pins {pin.sha256}")


def repin(path: Path | None = None, progress: Progress | None = None) -> KernelPin:
    """Point [kernel] at the package the metapackage depends on today (version and sha256 from
    the signed index) and rewrite those lines of templates.toml."""
    path = path or TEMPLATES_FILE
    config = load_config(path)
    clock = Clock(progress or TerminalProgress())
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
