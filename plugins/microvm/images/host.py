"""What the host needs: the packages the runtime and the build use (QEMU, debootstrap, ...),
installed with the host's apt-get when we are root, and the QEMU binary."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from plugins.microvm.images.commands import Clock, Progress, run
from plugins.microvm.images.templates import BuildConfig, load_config

SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class HostError(RuntimeError):
    """This host cannot build images: a missing program or package, no root where root is
    needed, no way to reach Debian's archive. (Other RuntimeErrors are failed builds.)"""


def which(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


QEMU = "qemu-system-x86_64"
#: Host package -> the programs it provides that sandgate runs.
HOST_TOOLS: dict[str, tuple[str, ...]] = {
    "qemu-system-x86": (QEMU,),
    "debootstrap": ("debootstrap",),
    "e2fsprogs": ("mkfs.ext4",),
    "npm": ("npm",),
}


def host_packages_needed(templates: Iterable[str] | None = None, config: BuildConfig | None = None) -> list[str]:
    """The host packages the microVM runtime and the build of `templates` need (all when None)
    that are missing here."""
    config = config or load_config()
    names = list(config.templates) if templates is None else list(templates)
    wanted = ["qemu-system-x86"]
    disks = [rootfs for n in names if n in config.templates and (rootfs := config.templates[n].rootfs) is not None]
    if disks:
        wanted += ["debootstrap", "e2fsprogs"]
    if any(disk.npm for disk in disks):
        wanted.append("npm")
    missing = [pkg for pkg in wanted if not all(which(tool) for tool in HOST_TOOLS[pkg])]
    if not Path(config.debian.keyring).is_file():
        missing.append("debian-archive-keyring")
    return missing


def ensure_host_packages(progress: Progress, templates: Iterable[str] | None = None,
                         config: BuildConfig | None = None) -> None:
    """Install what `host_packages_needed` lists with apt-get (after one `apt-get update`) when
    we are root; otherwise raise HostError with the command to run.

    Raises:
        HostError: packages are missing and cannot be installed from here.
    """
    if not which("apt-get") or not which("dpkg-deb"):
        raise HostError("building microVM images needs apt-get and dpkg-deb (a Debian or Ubuntu host)")
    missing = host_packages_needed(templates, config)
    if not missing:
        return
    command = f"apt-get update && apt-get install -y --no-install-recommends {' '.join(missing)}"
    if os.geteuid() != 0:
        raise HostError(f"missing host packages {', '.join(missing)}; run as root: {command}")
    clock = Clock(progress)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "-q", "update"], clock, "apt-get update (host)", env=env)
        run(["apt-get", "-q", "install", "-y", "--no-install-recommends", *missing], clock,
            f"installing {' '.join(missing)}", env=env)
    except RuntimeError as exc:
        raise HostError(str(exc)) from exc
    still = host_packages_needed(templates, config)
    if still:
        raise HostError(f"apt-get installed {', '.join(missing)} but {', '.join(still)} still lack their programs")


def find_qemu(configured: str | None = None) -> str:
    """The QEMU binary: `configured` (`[runtimes.microvm] qemu`) or qemu-system-x86_64 on PATH.
    Looked up each time it is asked for, never when the runtime is made: `sandgate images build
    microvm` makes the runtime, then installs QEMU (`ensure_host_packages`), then needs it.

    Raises:
        HostError: no such executable.
    """
    found = which(configured or QEMU)
    if found is None:
        what = f"the configured qemu {configured!r} is no executable" if configured else f"{QEMU} is not installed"
        raise HostError(f"{what} (`sandgate images build microvm` installs qemu-system-x86)")
    return found
