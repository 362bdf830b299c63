"""The microVM image builder: templates.toml, the kernel pin, module dependencies, the
initramfs, the cache; and one boot of the built image with plain QEMU up to the agent's hello."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from plugins.common import file_lock
from plugins.microvm.images import (
    build,
    cache,
    commands,
    cpio,
    elf,
    guest_files,
    host,
    kernel,
    rootfs,
    templates,
    tree,
)
from plugins.microvm.images.cache import BootImage
from plugins.microvm.images.templates import TemplateError

pytestmark = pytest.mark.microvm

TEMPLATES = templates.TEMPLATES_FILE.read_text()


# -- templates.toml ------------------------------------------------------------------------------


def test_templates_parse() -> None:
    config = templates.load_config()
    default, full = config.templates["default"], config.templates["full"]
    assert (default.memory_mb, default.vcpus, default.rootfs) == (256, 1, None)
    assert default.python == "python3.11" and "busybox-static" in default.packages
    assert {"virtio_mmio", "virtio_console"} <= set(default.modules)
    assert full.memory_mb == 256 and full.rootfs is not None and full.python == "python3.11"
    assert "python3.11-minimal" in full.compile_with and "python3.11-minimal" not in full.packages
    assert {"python3", "nodejs", "bash", "gcc", "libc6-dev"} <= set(full.rootfs.packages)
    assert {"virtio_blk", "overlay"} <= set(full.modules)
    polyglot = config.templates["polyglot"]
    assert polyglot.memory_mb == 512 and polyglot.rootfs is not None  # why 512: templates.toml
    assert {"golang-go", "openjdk-17-jdk-headless", "ruby", "php-cli", "rustc", "g++"} <= set(polyglot.rootfs.packages)
    assert config.kernel.package.startswith("linux-image-") and len(config.kernel.sha256) == 64
    assert templates.load_templates() == config.templates


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("[templates.default]", "[templates.default", "not valid TOML"),
        ("memory_mb = 256", 'memory_mb = "lots"', "templates.default.memory_mb must be an integer"),
        ("memory_mb = 256", "memory_mb = 256\ncolour = 1", r"unknown keys in \[templates.default\]: colour"),
        ('cmdline = "mitigations=off', 'cmdline = "sandgate.net=1 mitigations=off', "must not set sandgate"),
        ('sha256 = "e', 'sha256 = "x', "kernel.sha256 must be a string matching"),
        ("\nversion = ", "\n# version = ", "kernel.version is missing"),
        ('compression = "none"', 'compression = "bzip2"', "compression must be a string matching none|gzip"),
        ('"busybox-static",\n    "python3.11', '"python3.11', "packages must hold busybox-static"),
        ("compile_with = [", "compile_with = []\nunused = [", "compile_with must name the packages"),
        ("slack_mb = 16", "slack_mb = 16\nsize = 1", r"keys in \[templates.full.rootfs\]: size"),
    ],
)
def test_bad_templates_file_says_what_is_wrong(tmp_path: Path, old: str, new: str, error: str) -> None:
    assert old in TEMPLATES
    bad = tmp_path / "templates.toml"
    bad.write_text(TEMPLATES.replace(old, new, 1))
    with pytest.raises(TemplateError, match=error) as caught:
        templates.load_config(bad)
    assert str(bad) in str(caught.value)


def test_missing_templates_file(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="no such file"):
        templates.load_config(tmp_path / "nope.toml")


def test_unknown_template_is_refused() -> None:
    assert cache.find_image("no-such-template") is None
    with pytest.raises(TemplateError, match="unknown microvm template 'no-such-template'"):
        build.build_image("no-such-template", lambda elapsed, phase: None)


def test_missing_host_packages_say_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "which", lambda name: None if name in ("qemu-system-x86_64", "debootstrap")
                        else f"/usr/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert host.host_packages_needed(["default"]) == ["qemu-system-x86"]
    assert host.host_packages_needed() == ["qemu-system-x86", "debootstrap"]
    with pytest.raises(host.HostError, match=r"missing host packages qemu-system-x86; run as root: apt-get "
                                             r"update && apt-get install -y --no-install-recommends "
                                             r"qemu-system-x86$"):
        host.ensure_host_packages(lambda elapsed, phase: None, ["default"])


def test_a_build_uses_the_qemu_it_installed(microvm_image: BootImage, tmp_path: Path) -> None:
    """Issue #19: on a host without QEMU, `sandgate images build microvm` installs it and then
    makes the snapshot with it, first time (the runtime used to look for QEMU before the install).
    The host here has QEMU, so the build runs with a PATH that hides it and an apt-get that
    "installs" it by linking it onto that PATH; the image and snapshot are the cached ones."""
    if os.geteuid() != 0:
        pytest.skip("the build installs host packages only as root")
    qemu, dpkg_deb = shutil.which("qemu-system-x86_64"), shutil.which("dpkg-deb")
    assert qemu is not None and dpkg_deb is not None  # the fixture's build installed them
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-deb").symlink_to(dpkg_deb)
    calls = tmp_path / "apt-get.calls"
    apt_get = bin_dir / "apt-get"
    apt_get.write_text(f"""#!/bin/sh
PATH=/usr/bin:/bin
echo "$*" >>{calls}
case " $* " in *" install "*) ln -s {qemu} {bin_dir}/qemu-system-x86_64 ;; esac
""")
    apt_get.chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir)}
    # where the build looks: no QEMU there until apt-get "installs" it
    assert shutil.which("qemu-system-x86_64", path=os.pathsep.join([str(bin_dir), *host.SBIN])) is None
    cli = [sys.executable, "-m", "gateway.cli", "images", "build", "microvm", "--template", "default"]
    result = subprocess.run(cli, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr.replace("\r", "\n")[-3000:]
    assert calls.read_text().splitlines() == ["-q update", "-q install -y --no-install-recommends qemu-system-x86"]
    assert f"default: snapshot {microvm_image.dir}/snapshot-" in result.stdout, result.stdout


# -- kernel modules ---------------------------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/a.ko: kernel/lib/b.ko kernel/lib/c.ko
kernel/lib/b.ko: kernel/lib/c.ko
kernel/lib/c.ko:
kernel/net/d-x.ko:
kernel/loop/p.ko: kernel/loop/q.ko
kernel/loop/q.ko: kernel/loop/p.ko
"""


def test_modules_resolve_in_load_order() -> None:
    order = kernel.resolve_modules(MODULES_DEP, "kernel/fs/e.ko\n", ["a", "e", "d_x", "b"])
    # dependencies first, each once; built-in e left out; d-x found by its module name d_x
    assert order == ["kernel/lib/c.ko", "kernel/lib/b.ko", "kernel/drivers/a.ko", "kernel/net/d-x.ko"]


def test_module_errors() -> None:
    with pytest.raises(ValueError, match=r"kernel module zz is neither in modules\.dep nor built in"):
        kernel.resolve_modules(MODULES_DEP, "", ["zz"])
    with pytest.raises(ValueError, match="cycle: p -> q -> p"):
        kernel.resolve_modules(MODULES_DEP, "", ["p"])


def test_real_modules_dep(microvm_boot_image: BootImage) -> None:
    """Debian's package has no modules.dep: the builder made one from each module's modinfo."""
    modules = kernel.kernel_dir(templates.load_config().kernel) / "modules"
    dep = (modules / "modules.dep").read_text()
    builtin = (modules / "modules.builtin").read_text()
    order = [Path(p).name for p in kernel.resolve_modules(dep, builtin, ["virtio_net", "virtio_mmio"])]
    assert order.index("failover.ko") < order.index("net_failover.ko") < order.index("virtio_net.ko")
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_mmio.ko")
    # ext4 is built into Debian's cloud kernel: nothing to load for it
    assert kernel.resolve_modules(dep, builtin, ["ext4"]) == []


# -- the kernel -------------------------------------------------------------------------------------


def _pin() -> templates.KernelPin:
    return templates.load_config().kernel


def test_pin_check_refuses_another_sha256() -> None:
    pin = _pin()
    kernel.check_pin(pin, pin.sha256)
    with pytest.raises(RuntimeError, match=f"refusing {pin.package} {pin.version}: its sha256 is 0+, "
                                           f"templates.toml pins {pin.sha256}"):
        kernel.check_pin(pin, "0" * 64)


class _IndexWithOtherHash:
    """An apt index that offers the pinned version with another sha256; downloading fails the test."""

    def __init__(self, debs: Path, pin: templates.KernelPin) -> None:
        self.debs, self.pin = debs, pin

    def update(self, clock: Any, *, force: bool = False) -> None:
        pass

    def show(self, *specs: str) -> list[dict[str, str]]:
        return [{"Package": self.pin.package, "Version": self.pin.version, "SHA256": "1" * 64,
                 "Filename": f"pool/{self.pin.package}.deb"}]

    def fetch(self, specs: Any, clock: Any) -> Any:
        raise AssertionError("downloaded a kernel whose index sha256 is not the pinned one")


def test_kernel_with_another_sha256_is_refused_before_download(tmp_path: Path) -> None:
    pin = _pin()
    # a cached .deb of that name with other content is not taken either
    (tmp_path / f"{pin.package}_{pin.version}_amd64.deb").write_bytes(b"not the pinned kernel")
    clock = commands.Clock(lambda elapsed, phase: None)
    with pytest.raises(RuntimeError, match="refusing"):
        kernel._pinned_kernel_deb(pin, _IndexWithOtherHash(tmp_path, pin), clock)  # type: ignore[arg-type]


def _lz4_frame(*blocks: bytes) -> bytes:
    return struct.pack("<I", kernel.LZ4_LEGACY_MAGIC) + b"".join(struct.pack("<I", len(b)) + b for b in blocks)


def test_lz4_legacy_payload() -> None:
    # "ab", then a 10-byte match 2 back (it overlaps what it writes), then "hello!" as the last
    # literals (LZ4 ends a block with at least 5 literals)
    first = bytes([0x26]) + b"ab" + struct.pack("<H", 2) + bytes([0x60]) + b"hello!"
    second = bytes([0x50]) + b"12345"  # literals only, in a second (concatenated) frame
    payload = _lz4_frame(first) + _lz4_frame(second) + struct.pack("<I", 23)  # the kernel's size
    assert kernel._lz4_legacy(payload) == b"ababababababhello!12345"


def test_lz4_legacy_blocks_hold_up_to_8_mib() -> None:
    import lz4.block

    full = lz4.block.compress(bytes(kernel.LZ4_LEGACY_BLOCK), store_size=False)
    assert kernel._lz4_legacy(_lz4_frame(full) + struct.pack("<I", kernel.LZ4_LEGACY_BLOCK)) == bytes(8 << 20)
    over = lz4.block.compress(bytes(kernel.LZ4_LEGACY_BLOCK + 1), store_size=False)
    with pytest.raises(ValueError, match="corrupt LZ4 block at byte 4"):
        kernel._lz4_legacy(_lz4_frame(over) + bytes(4))


def test_lz4_legacy_refuses_a_corrupt_payload() -> None:
    # a match 9 bytes back, with 2 bytes written
    bad = bytes([0x26]) + b"ab" + struct.pack("<H", 9) + bytes([0x60]) + b"hello!"
    with pytest.raises(ValueError, match=r"corrupt LZ4 block at byte 4 of the payload: .*corrupt input"):
        kernel._lz4_legacy(_lz4_frame(bad) + bytes(4))
    with pytest.raises(ValueError, match="truncated LZ4 payload"):
        kernel._lz4_legacy(_lz4_frame(bytes([0x50]) + b"12345")[:-2])  # the block cut short


#: `printf 'sandgate %.0s' {1..20} | zstd -c`: streamed, so the frame has no content size (as in
#: a kernel's payload)
ZSTD_FRAME = b"(\xb5/\xfd\x04X\x85\x00\x00Hsandgate \x01\x00(R\xe5\x08!\xa7\x99>"


def test_zstd_payload() -> None:
    # the kernel appends the uncompressed size after the frame
    assert kernel._zstd(ZSTD_FRAME + struct.pack("<I", 180)) == b"sandgate " * 20
    with pytest.raises(ValueError, match="truncated zstd payload"):
        kernel._zstd(ZSTD_FRAME[:-6])
    with pytest.raises(ValueError, match=r"corrupt zstd payload: .*checksum"):
        kernel._zstd(ZSTD_FRAME[:-3] + bytes(3))  # the frame's checksum


def test_elf_readers_on_real_files() -> None:
    import lz4.block._block

    python = Path(sys.executable).resolve().read_bytes()
    interp, needed = elf.elf_deps(python)
    assert interp is not None and Path(interp).is_file()
    assert "libc.so.6" in needed
    dynstr = elf.elf_section(python, ".dynstr")
    assert dynstr is not None and all(f"\0{soname}\0".encode() in dynstr for soname in needed)
    assert elf.elf_section(python, ".no-such-section") is None
    # the GNU build id: its type is the number, not pyelftools' name for it
    assert any(name == "GNU" and kind == 3 and len(desc) == 20 for name, kind, desc in elf.elf_notes(python))
    extension = Path(lz4.block._block.__file__).read_bytes()  # a shared object: no interpreter
    interp, needed = elf.elf_deps(extension)
    assert interp is None and "libc.so.6" in needed


def test_elf_readers_refuse_what_is_no_elf() -> None:
    python = Path(sys.executable).resolve().read_bytes()
    with pytest.raises(ValueError, match="not an ELF file"):
        elf.elf_deps(b"#!/bin/sh\n")
    with pytest.raises(ValueError, match="corrupt ELF file"):
        elf.elf_deps(python[:64])  # the header alone: its program headers are past the end
    with pytest.raises(ValueError, match="corrupt ELF file"):
        list(elf.elf_notes(python[:64]))
    with pytest.raises(ValueError, match="corrupt ELF file"):
        elf.elf_section(python[:64], ".dynstr")


def test_extract_vmlinux_refuses_what_is_no_bzimage() -> None:
    with pytest.raises(ValueError, match="not a bzImage"):
        kernel.extract_vmlinux(bytes(4096))


def test_kernel_is_an_elf_with_a_pvh_entry(microvm_boot_image: BootImage) -> None:
    data = microvm_boot_image.kernel.read_bytes()
    assert data[:4] == b"\x7fELF"
    assert any(name == "Xen" and kind == kernel.PVH_NOTE for name, kind, _ in elf.elf_notes(data))


# -- the initramfs ----------------------------------------------------------------------------------


def _initramfs(image: BootImage) -> dict[str, tuple[int, bytes]]:
    return {name: (mode, data) for name, mode, data in cpio.read_cpio(image.initrd.read_bytes())}


def test_cpio_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin/tool", 0o700)
    (root / "notes").write_bytes(b"x" * 5)
    (root / "link").symlink_to("bin/tool")
    out = tmp_path / "out.cpio"
    cpio.write_initramfs(root, out, "none")
    entries = {name: (mode, data) for name, mode, data in cpio.read_cpio(out.read_bytes())}
    assert entries == {
        "bin": (stat.S_IFDIR | 0o755, b""),
        "bin/tool": (stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
        "link": (stat.S_IFLNK | 0o777, b"bin/tool"),
        "notes": (stat.S_IFREG | 0o644, b"xxxxx"),
        "dev/console": (stat.S_IFCHR | 0o600, b""),
    }
    again = tmp_path / "again.cpio"
    cpio.write_initramfs(root, again, "none")
    assert again.read_bytes() == out.read_bytes()


def test_initramfs_holds_what_init_needs(microvm_boot_image: BootImage) -> None:
    files = _initramfs(microvm_boot_image)
    assert files["init"] == (stat.S_IFLNK | 0o777, b"opt/sandgate/init")
    assert files["opt/sandgate/init"] == (stat.S_IFREG | 0o755, guest_files.INIT_FILE.read_bytes())
    assert stat.S_ISCHR(files["dev/console"][0])
    for folder in ("dev", "proc", "sys", "tmp", "work", "etc/sandgate"):
        assert stat.S_ISDIR(files[folder][0]), folder
    for top in ("bin", "sbin", "lib", "lib64"):
        assert files[top] == (stat.S_IFLNK | 0o777, f"usr/{top}".encode())
    # busybox and the applets the init runs
    assert stat.S_ISREG(files["usr/bin/busybox"][0])
    for applet in ("usr/bin/sh", "usr/bin/mount", "usr/sbin/insmod", "usr/sbin/ip", "usr/sbin/switch_root",
                   "usr/bin/hostname", "usr/bin/usleep", "usr/bin/env"):
        assert files[applet] == (stat.S_IFLNK | 0o777, b"/usr/bin/busybox"), applet
    # modules in dependency order, every listed file present
    modules = files["etc/sandgate/modules"][1].decode().split()
    names = [Path(m).name for m in modules]
    assert names.index("virtio_ring.ko") < names.index("virtio.ko") < names.index("virtio_mmio.ko")
    assert "virtio_console.ko" in names
    for module in modules + files["etc/sandgate/modules.net"][1].decode().split():
        assert f"usr{module}" in files, module
    assert "virtio_net.ko" in files["etc/sandgate/modules.net"][1].decode()
    conf = files["etc/sandgate/image.conf"][1].decode()
    assert "SANDGATE_TEMPLATE=default" in conf and "ROOT_DISK" not in conf
    # python, msgpack's C extension, the agent with its bytecode
    assert files["usr/bin/python3"][1] == b"python3.11"
    assert any(n.startswith("usr/lib/python3/dist-packages/msgpack/_cmsgpack.") for n in files)
    assert "opt/sandgate/guest_agent/__main__.py" in files
    assert "opt/sandgate/guest_agent/__pycache__/__main__.cpython-311.pyc" in files


def test_stdlib_is_trimmed_and_precompiled(microvm_boot_image: BootImage) -> None:
    files = _initramfs(microvm_boot_image)
    stdlib = "usr/lib/python3.11/"
    for kept in ("asyncio/__init__.pyc", "json/__init__.pyc", "subprocess.pyc", "pty.pyc", "ctypes/__init__.pyc",
                 "lib-dynload/termios.cpython-311-x86_64-linux-gnu.so", "encodings/utf_8.pyc"):
        assert stdlib + kept in files, kept
    for gone in ("test/", "idlelib/", "tkinter/", "ensurepip/", "lib2to3/", "pydoc_data/", "distutils/"):
        assert not any(n.startswith(stdlib + gone) for n in files), gone
    assert not any(n.startswith(stdlib) and n.endswith(".py") for n in files), "stdlib sources are replaced"
    for name, (_, data) in files.items():
        if name.endswith(".pyc"):
            # PEP 552 flags: hash-based (1), not checked against a source (0 << 1)
            assert struct.unpack_from("<I", data, 4)[0] == 1, name


def test_every_elf_finds_its_libraries(microvm_boot_image: BootImage) -> None:
    files = _initramfs(microvm_boot_image)
    libdir = "usr/lib/x86_64-linux-gnu/"
    elves = [n for n, (mode, data) in files.items() if stat.S_ISREG(mode) and data[:4] == b"\x7fELF"]
    assert "usr/bin/python3.11" in elves
    for name in elves:
        if name.startswith("usr/lib/modules/"):
            continue
        interp, needed = elf.elf_deps(files[name][1])
        if interp is not None:
            assert tree.merged(interp.lstrip("/")) in files, (name, interp)
        for soname in needed:
            assert libdir + soname in files, (name, soname)


def test_manifest_records_what_went_in(microvm_boot_image: BootImage) -> None:
    manifest = json.loads((microvm_boot_image.dir / "manifest.json").read_text())
    pin = _pin()
    assert manifest["kernel"]["sha256"] == pin.sha256 and manifest["key"] == microvm_boot_image.key
    debs = {d["package"]: d for d in manifest["debs"]}
    assert set(debs) == set(templates.load_templates()["default"].packages)
    assert all(len(d["sha256"]) == 64 and d["version"] for d in debs.values())
    assert microvm_boot_image.dir.parent.parent.parent == cache.microvm_cache()
    assert microvm_boot_image.cmdline == templates.load_templates()["default"].cmdline


# -- the cache --------------------------------------------------------------------------------------


def test_second_build_comes_from_the_cache(microvm_boot_image: BootImage, monkeypatch: pytest.MonkeyPatch) -> None:
    def no(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a cached image was built again")

    for name in ("prepare_kernel", "Apt", "initramfs_tree", "write_initramfs", "rootfs_disk"):
        monkeypatch.setattr(build, name, no)
    again = build.build_image("default", lambda elapsed, phase: None)
    assert again == microvm_boot_image
    assert cache.find_image("default") == microvm_boot_image


def test_an_edited_input_makes_the_image_out_of_date(microvm_boot_image: BootImage, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    edited = tmp_path / "init"
    edited.write_bytes(guest_files.INIT_FILE.read_bytes() + b"# edited\n")
    monkeypatch.setattr(guest_files, "INIT_FILE", edited)
    assert cache.find_image("default") is None
    monkeypatch.undo()
    assert cache.find_image("default") == microvm_boot_image


def test_root_disks_in_use_survive_another_templates_build(tmp_path: Path) -> None:
    """Every template's disks share one folder: a new disk (say, polyglot's) must not prune the
    disk an image of another template (full) links to, or that image's next build debootstraps."""
    images = tmp_path / "images"
    images.mkdir()
    disks = tmp_path / "rootfs"
    disks.mkdir()
    for age, name in enumerate(["new", "unused1", "unused2", "full", "unused3"]):
        (disks / name).mkdir()
        (disks / name / "rootfs.ext4").write_bytes(b"disk")
        os.utime(disks / name, (1_000_000 - age * 100, 1_000_000 - age * 100))
    os.link(disks / "full" / "rootfs.ext4", images / "rootfs.ext4")  # as build.py links it into an image
    rootfs.prune_unused(disks, disks / "new")
    assert sorted(p.name for p in disks.iterdir()) == ["full", "new", "unused1", "unused2"]


def test_build_lock_excludes_other_builders(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    held, release = threading.Event(), threading.Event()

    def builder() -> None:
        with file_lock(lock):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=builder)
    thread.start()
    assert held.wait(30)
    with open(lock, "rb") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    release.set()
    thread.join()
    with file_lock(lock):
        pass


class _Index:
    """apt with a newer kernel in its index."""

    def __init__(self, base: Path, sources: Any) -> None:
        self.debs = base

    def update(self, clock: Any, *, force: bool = False) -> None:
        pass

    def show(self, *specs: str) -> list[dict[str, str]]:
        return [{
            "linux-image-cloud-amd64": {"Package": "linux-image-cloud-amd64",
                                        "Depends": "linux-image-6.1.0-99-cloud-amd64 (= 6.1.300-1)"},
            "linux-image-6.1.0-99-cloud-amd64": {"Package": "linux-image-6.1.0-99-cloud-amd64",
                                                 "Version": "6.1.300-1", "SHA256": "ab" * 32},
        }[spec] for spec in specs]


def test_repin_rewrites_the_kernel_lines_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernel, "Apt", _Index)
    path = tmp_path / "templates.toml"
    path.write_text(TEMPLATES)
    pin = kernel.repin(path, lambda elapsed, phase: None)
    assert pin == templates.KernelPin("linux-image-6.1.0-99-cloud-amd64", "6.1.300-1", "ab" * 32,
                                      "linux-image-cloud-amd64")
    assert templates.load_config(path).kernel == pin
    old = _pin()
    assert path.read_text() == (TEMPLATES.replace(f'package = "{old.package}"', f'package = "{pin.package}"')
                                .replace(f'version = "{old.version}"', f'version = "{pin.version}"')
                                .replace(f'sha256 = "{old.sha256}"', f'sha256 = "{pin.sha256}"'))


# -- booting it -------------------------------------------------------------------------------------


def _tsc_khz() -> int:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    pytest.skip("no 'cpu MHz' in /proc/cpuinfo")


def _frame(conn: socket.socket) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            assert chunk, "the guest closed the channel"
            data += chunk
        return data

    (length,) = struct.unpack(">I", exactly(4))
    message: dict[str, Any] = msgpack.unpackb(exactly(length))
    return message


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    body = msgpack.packb(message)
    conn.sendall(struct.pack(">I", len(body)) + body)


@contextlib.contextmanager
def _booted(image: BootImage, tmp_path: Path) -> Iterator[socket.socket]:
    """`image` booted by plain QEMU under software emulation; the agent's channel, after `hello`.
    On the way out: no line from the init on the console (it logs errors only)."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None  # the fixture installed it or skipped
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "agent.sock"))
    listener.listen(1)
    listener.settimeout(60)
    console = tmp_path / "console.log"
    cmdline = f"{image.cmdline} console=ttyS0 quiet panic=-1 tsc_early_khz={_tsc_khz()} sandgate.disk_mb=64"
    argv = [
        qemu, "-M", "microvm,x-option-roms=off,rtc=on", "-accel", "tcg", "-cpu", "max",
        "-m", str(image.memory_mb), "-smp", str(image.vcpus), "-nodefaults", "-no-user-config",
        "-nographic", "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", cmdline, "-serial", f"file:{console}",
        "-device", "virtio-serial-device", "-chardev", f"socket,id=agent,path={tmp_path / 'agent.sock'}",
        "-device", "virtserialport,chardev=agent,name=sandgate.agent",
    ]
    if image.rootfs is not None:
        argv += ["-drive", f"id=root,file={image.rootfs},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=root"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    conn: socket.socket | None = None
    try:
        conn, _ = listener.accept()
        conn.settimeout(60)
        _send(conn, {"id": 1, "op": "hello", "version": 1})
        reply = _frame(conn)
        assert reply["id"] == 1 and reply["result"]["version"] == 1, reply
        assert reply["result"]["platform"] == "linux"
        assert "exec.process" in reply["result"]["capabilities"]
        yield conn
    finally:
        proc.kill()  # before the channel closes, which would make the agent exit (and init say so)
        _, stderr = proc.communicate()
        if conn is not None:
            conn.close()
        listener.close()
    log = console.read_text(errors="replace")
    assert "sandgate-init" not in log, log[-3000:] + stderr.decode(errors="replace")[-1000:]


def _shell(conn: socket.socket, command: str) -> tuple[int, str]:
    _send(conn, {"id": 2, "op": "exec.start", "exec_id": "e1", "command": command, "timeout": 60})
    out = b""
    while True:
        event = _frame(conn)
        assert "error" not in event, event
        if event.get("ev") == "data":
            out += event["data"]
        elif event.get("ev") == "end":
            return event["exit_code"], out.decode(errors="replace")


def test_image_boots_to_the_agents_hello(microvm_boot_image: BootImage, tmp_path: Path) -> None:
    """The init mounts, loads modules, finds the port and starts the agent, which answers."""
    with _booted(microvm_boot_image, tmp_path) as conn:
        code, out = _shell(conn, "df -m /work | tail -1; hostname; cat /proc/self/cgroup")
    assert code == 0, out
    size_mb, name, cgroup = out.split()[1], out.split()[-2], out.split()[-1]
    assert (size_mb, name, cgroup) == ("64", "sandbox", "0::/sandbox"), out


def test_full_image_boots_from_its_disk(tmp_path: Path) -> None:
    """The `full` template (debootstrap, minutes to build) when this machine has built it."""
    image = cache.find_image("full")
    if image is None:
        pytest.skip("the full template is not built here: sandgate images build microvm --template full (as root)")
    with _booted(image, tmp_path) as conn:
        code, out = _shell(conn, "node -e 'console.log(1+1)' && bash -c 'echo $BASH_VERSION' >/dev/null && "
                                 "gcc --version >/dev/null && python3 -c 'import msgpack' && "
                                 "touch /usr/local/bin/x && mount | grep ' / '")
    assert code == 0, out
    assert out.startswith("2\n") and "overlay" in out, out
