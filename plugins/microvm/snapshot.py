"""Snapshots of a booted VM, made once per machine kind and kept beside its boot image.

A template VM boots with its RAM in a file (`share=on`), its agent answers, and it is stopped and
migrated to `clone.state` with x-ignore-shared: device state only, the RAM stays in `ram`. A clone
maps `ram` copy-on-write (`share=off`) and loads this stream: ~0.1 s to a live agent, and clones
share every page they have not written.

`full.state` (device state and RAM, for a plain restore when the RAM file cannot be mapped) is
migrated from a first clone, stopped before it runs: QEMU migrates a VM only once, and the
template may not run on after its snapshot, since its RAM file is the clones' memory.

Both fit only a VM with the same `Machine` (QEMU, image, accelerator, memory, vCPUs, devices):
the folder name is a hash of it.

The template's agent also says hello before it is stopped: what it offers (its capabilities: the
languages whose programs the image holds among them) is a fact of the image, written beside it
(`offered.json`) for `GET /v1/runtimes` to list without booting anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from guest_agent.wire import PROTOCOL_VERSION
from plugins.common import acquire_file_lock
from plugins.microvm.images.cache import BootImage
from plugins.microvm.vm import DEVICE_LAYOUT, Boot, Machine, Vm

#: A cold boot under TCG answers in ~2-3 s on an idle host; leave room for a loaded one.
BOOT_TIMEOUT_S = 120.0
SNAPSHOT_FILES = ("ram", "clone.state", "full.state")
#: Beside an image: its agent's hello capabilities, from its first snapshot.
OFFERED_FILE = "offered.json"


@dataclass(frozen=True)
class Snapshot:
    dir: Path

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    def clone_boot(self) -> Boot:
        return Boot(ram_file=self.ram, share=False, incoming=self.dir / "clone.state", ignore_shared=True)

    def restore_boot(self) -> Boot:
        return Boot(incoming=self.dir / "full.state")


_qemu_versions: dict[str, str] = {}


def qemu_version(qemu: str) -> str:
    """`qemu --version`'s first line (remembered: it is part of every snapshot's key)."""
    if qemu not in _qemu_versions:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout
        _qemu_versions[qemu] = out.splitlines()[0].strip()
    return _qemu_versions[qemu]


def machine_key(machine: Machine) -> str:
    facts = {
        "qemu": qemu_version(machine.qemu),
        "image": machine.image.key,
        "accel": machine.accel.name,
        "cpu": machine.accel.cpu,
        "memory_mb": machine.memory_mb,
        "vcpus": machine.vcpus,
        "network": machine.network,
        "cmdline": machine.kernel_cmdline(),
        "devices": DEVICE_LAYOUT,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def snapshot_dir(machine: Machine) -> Path:
    return machine.image.dir / f"snapshot-{machine_key(machine)}"


def find_snapshot(machine: Machine) -> Snapshot | None:
    folder = snapshot_dir(machine)
    if all((folder / name).is_file() for name in SNAPSHOT_FILES):
        return Snapshot(folder)
    return None


async def make_snapshot(machine: Machine, workdir: Path) -> Snapshot:
    """Boot a template VM, snapshot it, and return the snapshot (the existing one if another
    process made it first). `workdir` holds the template VM's sockets while it runs."""
    found = find_snapshot(machine)
    if found is not None:
        return found
    dest = snapshot_dir(machine)
    lock_path = dest.parent / f".{dest.name}.lock"
    lock = await asyncio.to_thread(acquire_file_lock, lock_path)
    try:
        found = find_snapshot(machine)
        if found is not None:
            return found
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            await _snapshot_into(machine, tmp, workdir)
            for name in SNAPSHOT_FILES:
                os.chmod(tmp / name, 0o400)  # clones map `ram`: nobody may change it under them
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Snapshot(dest)
    finally:
        lock.close()


def _lock(path: Path) -> object:
    import fcntl

    f = open(path, "a+b")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def offered_capabilities(image: BootImage) -> list[str] | None:
    """What the image's agent offered when its first snapshot was made (None: never snapshotted)."""
    try:
        caps = json.loads((image.dir / OFFERED_FILE).read_text())["capabilities"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [c for c in caps if isinstance(c, str)] if isinstance(caps, list) else None


def _record_offered(image: BootImage, capabilities: list[str]) -> None:
    tmp = image.dir / f".{OFFERED_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"capabilities": capabilities}) + "\n")
    os.chmod(tmp, 0o644)
    os.rename(tmp, image.dir / OFFERED_FILE)


async def _snapshot_into(machine: Machine, folder: Path, workdir: Path) -> None:
    template = await Vm.start(machine, workdir / "template", Boot(ram_file=folder / "ram", share=True))
    try:
        await template.wait_agent(BOOT_TIMEOUT_S)
        hello = await template.call("hello", BOOT_TIMEOUT_S, version=PROTOCOL_VERSION)
        if isinstance(hello.get("capabilities"), list):
            await asyncio.to_thread(_record_offered, machine.image, hello["capabilities"])
        await template.qmp("stop")
        await _migrate(template, folder / "clone.state", ignore_shared=True)
    finally:
        await template.kill()
    # -S: the clone loads the template's state and stays stopped, so what is migrated is exactly it.
    clone = await Vm.start(machine, workdir / "clone", dataclasses.replace(Snapshot(folder).clone_boot(), paused=True))
    try:
        await _migrate(clone, folder / "full.state", ignore_shared=False)
    finally:
        await clone.kill()


async def _migrate(vm: Vm, dest: Path, *, ignore_shared: bool) -> None:
    """Write the stopped VM's migration stream to `dest` (through an fd QEMU gets over QMP)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        vm.send_fd(fd)
        await vm.qmp("getfd", fdname="migration")
    finally:
        os.close(fd)
    await vm.prepare_migration(ignore_shared=ignore_shared)
    await vm.qmp("migrate", uri="fd:migration")
    await vm.wait_migration(BOOT_TIMEOUT_S)
