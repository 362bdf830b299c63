"""Which accelerator QEMU should use here: KVM where it really runs an ordinary guest, TCG
(software emulation) otherwise. Decided by probing, never by /dev/kvm merely existing.

The probe (`python -m plugins.microvm.accel`, run in a child with a deadline because a broken KVM
can hang in KVM_RUN) creates a VM through the KVM ioctls, runs four bytes of real-mode code
(`mov al, 0x42; out 0x10, al; hlt`) and checks that the port write and the halt come back. A
nested paravirtual KVM (PVM, `/sys/module/kvm_pvm`) runs only guests patched for it, so a stock
kernel under it crawls and dies: the probe refuses it before trying.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import subprocess
import sys
from dataclasses import dataclass

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_RUN = 0xAE80
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5

GUEST_CODE = bytes([0xB0, 0x42, 0xE6, 0x10, 0xF4])  # mov al,0x42; out 0x10,al; hlt
CODE_ADDR = 0x1000
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Accel:
    """QEMU's accelerator and CPU model, and why they were chosen (for logs and /v1/runtimes)."""

    name: str  # "kvm" | "tcg"
    reason: str

    @property
    def option(self) -> str:
        """QEMU's -accel value. TCG's translation cache defaults to 1 GiB, touched as it fills:
        a small guest runs in 64 MiB of it, and the rest would be private memory of every VM."""
        return "tcg,tb-size=64" if self.name == "tcg" else "kvm"

    @property
    def cpu(self) -> str:
        # KVM passes the host's CPU through. TCG's "max" emulates every feature it can, less
        # ERMS/FSRM: with them the guest's memcpy uses `rep movsb`, which TCG runs byte by byte
        # (boot to agent: ~3 s instead of ~3.4 s).
        return "host" if self.name == "kvm" else "max,-erms,-fsrm"


def choose(setting: str = "auto") -> Accel:
    """The accelerator for `setting` ("auto", "kvm" or "tcg", from `[runtimes.microvm] accel`)."""
    if setting == "tcg":
        return Accel("tcg", "configured")
    problem = kvm_problem()
    if problem is None:
        return Accel("kvm", "probed: KVM runs a guest")
    if setting == "kvm":
        raise RuntimeError(f"accel = 'kvm' is configured, but KVM cannot be used here: {problem}")
    return Accel("tcg", f"no usable KVM ({problem})")


def kvm_problem() -> str | None:
    """None if KVM runs an ordinary guest here, else why not."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return "the KVM here is PVM (kvm_pvm), which runs only PVM-patched guest kernels"
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "plugins.microvm.accel"],
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"a test guest did not halt within {PROBE_TIMEOUT_S:.0f}s"
    if proc.returncode != 0:
        return proc.stderr.decode(errors="replace").strip()[-300:] or f"probe exited {proc.returncode}"
    return None


def run_test_guest() -> None:
    """Run the real-mode test guest; raise with the reason when KVM does not do what it should."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    version = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
    if version != 12:
        raise RuntimeError(f"KVM API version {version}, not 12")
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    memory = mmap.mmap(-1, 0x10000)
    memory[CODE_ADDR : CODE_ADDR + len(GUEST_CODE)] = GUEST_CODE
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    region = struct.pack("IIQQQ", 0, 0, 0, len(memory), address)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(fcntl.ioctl(vcpu, KVM_GET_SREGS, bytes(0x138)))
    struct.pack_into("Q", sregs, 0, 0)  # cs.base
    struct.pack_into("H", sregs, 12, 0)  # cs.selector
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(0x90)
    struct.pack_into("QQ", regs, 16 * 8, CODE_ADDR, 0x2)  # rip, rflags
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
    seen = []
    for _ in range(4):
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        (reason,) = struct.unpack_from("I", run, 8)
        if reason == KVM_EXIT_IO:
            _direction, _size, port, _count, offset = struct.unpack_from("BBHIQ", run, 32)
            seen.append((port, run[offset]))
        elif reason == KVM_EXIT_HLT:
            if seen != [(0x10, 0x42)]:
                raise RuntimeError(f"the test guest halted after port writes {seen}, not [(16, 66)]")
            return
        else:
            raise RuntimeError(f"the test guest exited with KVM exit reason {reason}")
    raise RuntimeError("the test guest did not halt")


if __name__ == "__main__":
    try:
        run_test_guest()
    except (OSError, RuntimeError) as exc:
        print(f"KVM test guest failed: {exc}", file=sys.stderr)
        sys.exit(1)
