"""The initramfs tree of a template: busybox and the template's package files (libraries pruned to
what its programs need), the kernel modules it loads, guest/init and the agent, precompiled."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plugins.microvm.images.apt import Apt, unpack
from plugins.microvm.images.commands import Clock, run
from plugins.microvm.images.elf import elf_deps
from plugins.microvm.images.guest_files import agent_sources, init_script
from plugins.microvm.images.kernel import Kernel, module_name, resolve_modules
from plugins.microvm.images.templates import TemplateError, TemplateSpec
from plugins.microvm.images.tree import (
    NET_FILES,
    make_root_skeleton,
    matches,
    merged,
    resolve,
    select_files,
    write_files,
)

LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib64")


IMAGE_DIRS = ("dev", "proc", "sys", "tmp", "run", "work", "root", "mnt", "var/tmp", "etc/sandgate")


ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
}


def initramfs_tree(spec: TemplateSpec, kernel: Kernel, apt: Apt, tmp: Path, clock: Clock,
                   manifest: dict[str, Any]) -> Path:
    debs = apt.fetch([*spec.packages, *spec.compile_with], clock)
    manifest["debs"] = [{"package": d.package, "version": d.version, "sha256": d.sha256} for d in debs]
    unpacked, tools = tmp / "debs", tmp / "compile-debs"
    for deb in debs:
        unpack(deb.path, tools if deb.package in spec.compile_with else unpacked, clock)
    root = tmp / "initramfs"
    make_root_skeleton(root)
    clock("assembling the initramfs")
    select_files(unpacked, root, spec.include, spec.exclude)
    if not (root / "usr/bin/busybox").is_file():
        raise TemplateError(f"templates.{spec.name}.include must select usr/bin/busybox")
    manifest["dropped"] = _prune_libraries(root, spec.optional, spec.dlopen)
    _busybox_links(root)
    for sub in IMAGE_DIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_files(root, {**ETC_FILES, **NET_FILES})
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
        make_root_skeleton(compiler)
        select_files(tools, compiler, [f"usr/bin/{spec.python}", f"usr/lib/{spec.python}/*",
                                       "usr/lib/x86_64-linux-gnu/*", "usr/lib64/*"], ())
        _precompile(root, ["opt/sandgate"], clock, python=spec.python, python_root=compiler)
        shutil.rmtree(compiler)
    write_files(root, {"etc/sandgate/image.conf": conf})
    (root / "init").symlink_to("opt/sandgate/init")
    for folder in (unpacked, tools):
        shutil.rmtree(folder, ignore_errors=True)
    return root


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
        targets = [merged(interp.lstrip("/"))] if interp else []
        for soname in needed:
            if soname in libs:
                targets.append(libs[soname])
            else:
                missing.add(soname)
        for target in targets:
            real = resolve(root, target)
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
        if soname not in libs or (real := resolve(root, libs[soname])) is None:
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
            elif matches(rel, optional):
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
        rel = merged(applet.strip("/"))
        if Path(rel).name in ("busybox", "linuxrc"):
            continue
        link = root / rel
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/usr/bin/busybox")


def _install_guest(root: Path) -> None:
    """The init script and the agent under /opt/sandgate. (For a template with a root disk the
    init copies them onto the disk's overlay at boot: the disk itself is Debian's alone, so
    editing the agent never means running debootstrap again.)"""
    write_files(root, {"opt/sandgate/init": init_script()}, 0o755)
    write_files(root, {f"opt/sandgate/{rel}": data for rel, data in agent_sources().items()})


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
    write_files(root, {
        "etc/sandgate/modules": "".join(f"{where}/{m}\n" for m in core),
        "etc/sandgate/modules.net": "".join(f"{where}/{m}\n" for m in net),
    })
    return [module_name(m) for m in core + net]


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


def _precompile(root: Path, folders: Sequence[str], clock: Clock, *, python: str, python_root: Path | None = None,
                sourceless: Sequence[str] = ()) -> None:
    """Compile every .py below `folders` (paths in `root`) with `python` from `python_root`
    (default: `root` itself), run on the host through that tree's own dynamic loader and
    libraries. Sources matching `sourceless` are then replaced by their bytecode (module.pyc
    beside where module.py was)."""
    runtime = python_root or root
    loader = resolve(runtime, "usr/lib64/ld-linux-x86-64.so.2")
    exe = resolve(runtime, f"usr/bin/{python}")
    if loader is None or exe is None:
        raise RuntimeError(f"{runtime} has no usr/bin/{python} or no dynamic loader")
    args: list[str | Path] = []
    for folder in folders:
        if (root / folder).is_dir():
            args += [root / folder, f"/{folder}"]
    # A fixed hash seed: frozenset constants are marshalled in hash order.
    env = {"PATH": os.defpath, "LC_ALL": "C.UTF-8", "PYTHONHOME": str(runtime / "usr"), "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1"}
    run([runtime / loader, "--library-path", f"{runtime}/usr/lib/x86_64-linux-gnu", runtime / exe,
         "-s", "-S", "-c", _PRECOMPILE, *args], clock, "precompiling Python modules", env=env)
    if not sourceless:
        return
    tag = "cpython-" + python.removeprefix("python").replace(".", "")
    for folder in folders:
        for source in sorted((root / folder).rglob("*.py")):
            if not matches(source.relative_to(root).as_posix(), sourceless):
                continue
            pyc = source.parent / "__pycache__" / f"{source.stem}.{tag}.pyc"
            if not pyc.is_file():
                raise RuntimeError(f"{source.relative_to(root)} has no {tag} bytecode")
            os.replace(pyc, source.with_suffix(".pyc"))
            source.unlink()
        for cache in sorted((root / folder).rglob("__pycache__"), reverse=True):
            with contextlib.suppress(OSError):  # still holds bytecode of kept sources
                cache.rmdir()


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
        real = resolve(root, rel.rstrip("/"))
        if real is None or (root / real).is_dir() != rel.endswith("/"):
            missing.append(rel)
    if not (root / "init").is_symlink() or os.readlink(root / "init") != "opt/sandgate/init":
        missing.append("init -> opt/sandgate/init")
    for name in ("modules", "modules.net"):
        listed = root / "etc/sandgate" / name
        for module in listed.read_text().split() if listed.is_file() else []:
            if not (root / merged(module.lstrip("/"))).is_file():
                missing.append(module)
    if missing:
        raise RuntimeError(f"the {spec.name} initramfs lacks {', '.join(missing)}")
