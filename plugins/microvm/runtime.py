"""The microVM runtime: each sandbox a QEMU `microvm` with its own Linux kernel.

Starts, fastest first: a clone from the warm pool (already restored, agent answering); a clone
restored now from the template snapshot (guest RAM mapped copy-on-write); a full restore; a cold
boot. Each step falls back to the next when it fails, and a sandbox that the snapshot does not fit
(other memory size, a network device) boots cold. KVM where it really works, TCG otherwise
(accel.py): the same code path, only `-accel` and `-cpu` differ.

Every sandbox gets `guest.setup` before it is handed out: the host's clock, fresh entropy (a clone
would otherwise share the template's random state), and its limits (cgroup memory and pids, /work's
size).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.egress.network import SandboxNetwork
from gateway.runtime.base import Backend, ByteChannel, CachedImage, NotConfigured, Progress, Runtime, SandboxSpec
from gateway.runtime.pool import WarmPool
from guest_agent import languages as language_table
from guest_agent.wire import ProtocolError
from plugins.common import disk_bytes, file_lock, freed_bytes, gateway_work_root, remove_orphans
from plugins.microvm import accel
from plugins.microvm.images import build
from plugins.microvm.images.cache import BootImage, find_image, image_folders, microvm_cache, stale_images
from plugins.microvm.images.host import HostError, find_qemu
from plugins.microvm.images.rootfs import unused_disks
from plugins.microvm.images.templates import BuildConfig, load_config
from plugins.microvm.snapshot import BOOT_TIMEOUT_S, find_snapshot, make_snapshot, offered_capabilities
from plugins.microvm.vm import Boot, Machine, Vm

log = logging.getLogger(__name__)

#: A restore answers in ~0.1-0.2 s; past this something is wrong and the next way is tried.
RESTORE_TIMEOUT_S = 15.0
#: How long the guest may take to end an agent it was told to restart (a SIGKILL to its cgroup;
#: slow only in an emulated guest on a busy host).
AGENT_EXIT_TIMEOUT_S = 30.0
#: How often the host checks a VM's CPU time against the sandbox's budget.
CPU_CHECK_INTERVAL_S = 1.0
#: How long a VM with read-write volumes has to write its dirty pages to them before it is killed
#: (`Vm.flush_disks`; ~10-50 ms for a few MB, see bench/microvm.py --volumes).
FLUSH_TIMEOUT_S = 10.0


def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz (TCG guests need it to skip TSC calibration)."""
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return round(float(line.split(":")[1]) * 1000)
    raise RuntimeError("no 'cpu MHz' in /proc/cpuinfo; set [runtimes.microvm] tsc_khz")


class MicrovmBackend(Backend):
    """One sandbox: its VM, and the limits its `guest.setup` applies."""

    def __init__(self, runtime: MicrovmRuntime, vm: Vm, spec: SandboxSpec) -> None:
        self.runtime = runtime
        self.vm = vm
        self.spec = spec
        self._restarting = False
        self._cpu_task: asyncio.Task[None] | None = None
        self._budget_reason: str | None = None
        vm.on_port_change = self._port_changed

    async def setup(self) -> None:
        """Make the VM this sandbox's: clock, entropy, limits. Called once, before hand-out."""
        await self.vm.call(
            "guest.setup",
            RESTORE_TIMEOUT_S,
            time_ns=time.time_ns(),
            entropy=secrets.token_bytes(64),
            pids=self.runtime.pids_max,
            disk_bytes=self.spec.disk_mb << 20,
        )
        self._cpu_task = asyncio.create_task(self._enforce_cpu_budget(), name="microvm-cpu-budget")

    def _port_changed(self, is_open: bool) -> None:
        # The guest closed the agent's port by itself: the agent died (say, OOM-killed). Close our
        # end so the gateway's agent client sees the death now, and restarts it.
        if not is_open and not self._restarting:
            self.vm.abort_agent_channel()

    async def _enforce_cpu_budget(self) -> None:
        while True:
            await asyncio.sleep(CPU_CHECK_INTERVAL_S)
            used = self.vm.cpu_seconds()
            if used is None:
                return
            if used > self.spec.cpu_seconds:
                self._budget_reason = f"the sandbox used its CPU budget ({self.spec.cpu_seconds:g}s)"
                log.info("sandbox %s: %s", self.spec.sandbox_id, self._budget_reason)
                await self.flush_volumes()
                await self.vm.kill()
                return

    def channel(self) -> ByteChannel:
        return self.vm.channel()

    async def wait_exited(self) -> str:
        reason = await asyncio.shield(self.vm.exited)
        return self._budget_reason or reason

    async def restart_agent(self) -> None:
        """The guest's init kills the agent and every sandbox process, the port gets a fresh
        connection, init starts a new agent, and it answers here. Files in /work stay."""
        self._restarting = True
        try:
            await self.vm.replace_agent(AGENT_EXIT_TIMEOUT_S)
            await self.vm.wait_agent(RESTORE_TIMEOUT_S + BOOT_TIMEOUT_S / 4)
        finally:
            self._restarting = False

    async def host_metrics(self) -> dict[str, Any]:
        return {
            **self.vm.memory(),
            "cpu_s": self.vm.cpu_seconds(),
            "accel": self.vm.machine.accel.name,
            "boot": self.vm.boot.kind,
        }

    async def flush_volumes(self) -> None:
        """Before the VM is killed: what its guest wrote to read-write volumes goes to their
        images. The guest mounts them without `sync` (every write would wait on the disk), so
        written and closed files may still be in its page cache; this writes them out. A guest
        that does not answer in FLUSH_TIMEOUT_S keeps what it had not written."""
        if self.vm.exited.done() or all(v.readonly for v in self.spec.volumes):
            return
        try:
            await self.vm.flush_disks(FLUSH_TIMEOUT_S)
        except (TimeoutError, ProtocolError, OSError) as exc:
            log.warning("sandbox %s: its volumes were not flushed before the VM was killed: %s",
                        self.spec.sandbox_id, exc or "no answer")

    async def destroy(self) -> None:
        if self._cpu_task is not None:
            self._cpu_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cpu_task
        await self.flush_volumes()
        await self.runtime.discard(self.vm)


class MicrovmRuntime(Runtime):
    """Settings (`[runtimes.microvm]`): template (default "default"), templates_file (a user's own
    templates, on top of the shipped templates.toml), pool_size (2), pool_refill_per_s (4), accel
    ("auto" | "kvm" | "tcg"), vcpus (the template's), pids_max (1024), qemu (the binary; default
    qemu-system-x86_64 on PATH), tsc_khz (default from /proc/cpuinfo)."""

    id = "microvm"
    description = "QEMU microvm with its own Linux kernel: processes, PTY, shell, Python; KVM or TCG"
    capabilities = frozenset({"network", "ports"})
    #: Each volume an ext4 image of the gateway's "local" store, attached as a virtio-blk disk.
    volume_store = "local"

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.template = str(config.get("template", "default"))
        given = config.get("templates_file")
        if given is not None and (not isinstance(given, str) or not given):
            raise ValueError("[runtimes.microvm] templates_file must be a file's path")
        self.templates_file = Path(given).expanduser().absolute() if given else None
        self.templates()  # a bad templates file is the operator's to fix before anything starts
        self.accel_setting = str(config.get("accel", "auto"))
        if self.accel_setting not in ("auto", "kvm", "tcg"):
            raise ValueError(f"[runtimes.microvm] accel must be auto, kvm or tcg, not {self.accel_setting!r}")
        self.pids_max = int(config.get("pids_max", 1024))
        self.vcpus = config.get("vcpus")
        self.qemu_setting = str(config["qemu"]) if config.get("qemu") else None
        #: The QEMU binary, found by `_check_host` (a build installs it after making the runtime).
        self.qemu = ""
        self.tsc_khz = int(config.get("tsc_khz", 0))
        self.accel = accel.Accel("tcg", "not probed yet")
        self.work_root = gateway_work_root(self.id)
        self.pool: WarmPool[Vm] = WarmPool(
            self.id,
            int(config.get("pool_size", 2)),
            float(config.get("pool_refill_per_s", 4.0)),
            make=self._make_pooled,
            alive=lambda vm: not vm.exited.done(),
            discard=self.discard,
        )
        self.pool_machine: Machine | None = None

    # -- images ------------------------------------------------------------------------------------

    def templates(self) -> BuildConfig:
        """The shipped templates.toml with `templates_file`'s templates on top.

        Raises:
            ValueError: a templates file is missing or malformed (TemplateError).
        """
        return load_config(user_file=self.templates_file)

    @classmethod
    def build_images(cls, config: Mapping[str, Any], template: str | None, progress: Progress) -> list[str]:
        runtime = cls(config)
        built = build.build_images(template, progress, user_file=runtime.templates_file)
        runtime._check_host()
        lines = []
        for image in built:
            machine = runtime.machine(image, image.memory_mb, network=False)
            start = time.monotonic()
            snapshot = asyncio.run(make_snapshot(machine, runtime.work_root / f"template-{image.template}"))
            shutil.rmtree(runtime.work_root, ignore_errors=True)
            lines.append(f"{image.template}: kernel {image.kernel}, initrd {image.initrd}"
                         + (f", root {image.rootfs}" if image.rootfs else ""))
            lines.append(f"{image.template}: snapshot {snapshot.dir} ({runtime.accel.name}, "
                         f"{time.monotonic() - start:.1f}s)")
        return lines

    @classmethod
    def cached_images(cls, config: Mapping[str, Any]) -> list[CachedImage]:
        """Each image folder: its files (kernel, initrd, root disk, shared by hard link with the
        kernel and root-disk caches) and its snapshots, current when today's templates (the
        shipped ones and `templates_file`'s), init and agent boot from it; then the root disks
        no image uses (a disk an image uses counts in the image)."""
        out = []
        for name, folder, current in image_folders(cls(config).templates()):
            parts = list(folder.iterdir())
            snapshots = [p for p in parts if p.name.startswith("snapshot-")]
            built = ""
            with contextlib.suppress(OSError, ValueError):
                built = str(json.loads((folder / "manifest.json").read_text()).get("built", ""))
            out.append(CachedImage(name, folder, current, {
                "image": disk_bytes(p for p in parts if p not in snapshots), "snapshot": disk_bytes(snapshots),
            }, built))
        return out + cls._unused_disks()

    @staticmethod
    def _unused_disks() -> list[CachedImage]:
        return [CachedImage("root disk", p, False, {"image": disk_bytes([p])})
                for p in unused_disks(microvm_cache() / "rootfs")]

    @classmethod
    def prune_images(cls, config: Mapping[str, Any]) -> tuple[list[CachedImage], int]:
        """The images `stale_images` names (no current template boots from them), then the root
        disks no image links to any more, under build.lock (a build is not half-pruned)."""
        templates = cls(config).templates()
        base = microvm_cache()
        if not base.is_dir():
            return [], 0
        with file_lock(base / "build.lock"):
            stale = set(stale_images(templates))
            gone = [entry for entry in cls.cached_images(config) if entry.path in stale]
            freed = freed_bytes(entry.path for entry in gone)
            for entry in gone:
                shutil.rmtree(entry.path, ignore_errors=True)
                with contextlib.suppress(OSError):
                    entry.path.parent.rmdir()  # a template's last image: its folder goes too
            disks = cls._unused_disks()  # now that the images linking to them are gone
            freed += freed_bytes(entry.path for entry in disks)
            for entry in disks:
                shutil.rmtree(entry.path, ignore_errors=True)
        return gone + disks, freed

    def _check_host(self) -> None:
        self.qemu = find_qemu(self.qemu_setting)
        self.accel = accel.choose(self.accel_setting)
        if not self.tsc_khz:
            self.tsc_khz = host_tsc_khz()

    def machine(self, image: BootImage, memory_mb: int, *, network: bool) -> Machine:
        return Machine(
            qemu=self.qemu,
            image=image,
            accel=self.accel,
            memory_mb=memory_mb,
            vcpus=int(self.vcpus or image.vcpus),
            network=network,
            tsc_khz=self.tsc_khz,
        )

    def check_create(self, template: str | None, network: bool) -> None:
        self._image(template or self.template)

    def languages(self) -> dict[str, list[str]]:
        """By template name (a create without one gets `[runtimes.microvm] template`): what its
        agent offered when the image's snapshot was made. Templates not built and snapshotted
        here are left out."""
        out = {}
        templates = self.templates()
        for name in templates.templates:
            image = find_image(name, templates)
            caps = None if image is None else offered_capabilities(image)
            if caps is not None:
                out[name] = sorted(c.removeprefix("exec.") for c in caps
                                   if c.startswith("exec.") and c.removeprefix("exec.") in language_table.BY_ID)
        return out

    def _image(self, template: str) -> BootImage:
        templates = self.templates()
        if template not in templates.templates:
            raise ProtocolError("bad_request", f"unknown microvm template {template!r}; have "
                                               f"{sorted(templates.templates)}")
        image = find_image(template, templates)
        if image is None:
            raise ProtocolError("unavailable", f"microvm template {template!r} is not built here: run "
                                               f"`sandgate images build microvm --template {template}`")
        return image

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._check_host)
            image = self._image(self.template)
        except (HostError, ProtocolError) as exc:
            if self.config:  # the operator asked for microVMs: that they cannot start is an error
                raise
            # A default start on a host never set up for microVMs: off, and not an error.
            raise NotConfigured(f"{exc} (`sandgate images build microvm` sets this host up)") from None
        log.info("microvm: accelerator %s (%s)", self.accel.name, self.accel.reason)
        await asyncio.to_thread(remove_orphans, self.work_root)
        self.work_root.mkdir(parents=True, mode=0o700)
        self.pool_machine = self.machine(image, image.memory_mb, network=False)
        if find_snapshot(self.pool_machine) is None:
            log.warning("microvm: making the %r template's snapshot (one cold boot; `sandgate images build "
                        "microvm` does this ahead of time)", self.template)
            await make_snapshot(self.pool_machine, self.work_root / "template")
        self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        await asyncio.to_thread(shutil.rmtree, self.work_root, True)

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(options) - {"vcpus"}
        if unknown:
            raise ProtocolError("bad_request", f"unknown options for microvm: {sorted(unknown)}")
        vcpus = options.get("vcpus")
        if vcpus is not None and (
            not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= (os.cpu_count() or 1)
        ):
            raise ProtocolError("bad_request", f"vcpus must be an integer from 1 to {os.cpu_count() or 1}")
        return dict(options)

    async def create(self, spec: SandboxSpec) -> Backend:
        image = self._image(spec.template or self.template)
        machine = self.machine(image, spec.memory_mb, network=spec.network)
        if "vcpus" in spec.options:
            machine = dataclasses.replace(machine, vcpus=spec.options["vcpus"])
        if spec.volumes:
            machine = dataclasses.replace(machine, volumes=spec.volumes)
            machine.kernel_cmdline()  # too long a command line: bad_request now, not a failed boot
        vm = self.pool.take() if machine == self.pool_machine else None
        if vm is None:
            vm = await self.start_vm(machine, spec.egress)
        backend = MicrovmBackend(self, vm, spec)
        try:
            await backend.setup()
        except BaseException:
            await asyncio.shield(backend.destroy())
            raise
        return backend

    async def _make_pooled(self) -> Vm:
        assert self.pool_machine is not None
        vm = await self.start_vm(self.pool_machine)
        try:
            # A rehearsal of the hand-out's setup: a restored VM runs every code path for the first
            # time, and under TCG that first run is translated (~50 ms); at hand-out it is warm.
            await vm.call("guest.setup", RESTORE_TIMEOUT_S, time_ns=time.time_ns())
        except BaseException:
            await asyncio.shield(self.discard(vm))
            raise
        return vm

    async def start_vm(self, machine: Machine, network: SandboxNetwork | None = None) -> Vm:
        """A VM whose agent answers: cloned, restored or booted, whichever works first.
        `network`: whose policy its connections are judged by (a machine with a network)."""
        # A snapshot's VM had no volume disks, and a restored VM cannot gain virtio-mmio devices:
        # a VM with volumes boots cold.
        snapshot = None if machine.volumes else find_snapshot(machine)
        ways: list[tuple[Boot, float]] = []
        if snapshot is not None:
            ways += [(snapshot.clone_boot(), RESTORE_TIMEOUT_S), (snapshot.restore_boot(), RESTORE_TIMEOUT_S)]
        ways.append((Boot(), BOOT_TIMEOUT_S))
        failures = []
        for boot, timeout in ways:
            workdir = self.work_root / secrets.token_hex(8)
            vm: Vm | None = None
            try:
                vm = await Vm.start(machine, workdir, boot, network)
                await vm.wait_agent(timeout)
                return vm
            except (ProtocolError, OSError) as exc:
                failures.append(f"{boot.kind}: {exc}")
                log.warning("microvm: a %s start failed, trying the next way: %s", boot.kind, exc)
            except BaseException:
                if vm is not None:
                    await asyncio.shield(self.discard(vm))
                raise
            if vm is not None:
                await self.discard(vm)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        raise ProtocolError("unavailable", "no way to start the VM worked: " + "; ".join(failures))

    async def discard(self, vm: Vm) -> None:
        await vm.kill()
        await asyncio.to_thread(shutil.rmtree, vm.workdir, True)
