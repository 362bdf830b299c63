"""A template's setup commands, run at build time inside its root disk's tree, confined.

The builder runs as root on the host, and a setup command is whatever a templates file says: run
plainly (`chroot TREE sh -c ...`) it could escape the chroot, mount the host's disks, load kernel
modules or reach the network. So each command runs:

- in fresh mount, network, PID, IPC, UTS and cgroup namespaces (`unshare`): no network at all (a
  loopback only), no host process to see. No user namespace: setup as root chowns files to the
  image's users, which needs a map of many ids, and only `newuidmap` (the uidmap package, often
  absent) can write one; the capability set below is what confines root instead;
- on the tree as its root (`pivot_root`; the host's tree is detached, not merely hidden as a chroot
  would leave it), with /proc of its own PID namespace and a /dev holding only null, zero, full,
  random and urandom (bound from the host);
- with the capabilities a package-style setup uses (ownership, modes, setuid/setgid files, users)
  and none of the others (mount, chroot, mknod, modules, raw I/O, ptrace, the network's, setpcap),
  and no way to regain them (no_new_privs): the kept ones reach only what the pivoted root holds;
- under a wall-clock limit (the builder's `run` kills the namespace through unshare).

Stage 1 is `unshare ... python -S -m plugins.microvm.images.confine TREE COMMAND`; stage 2 (`main`,
PID 1 of the new PID namespace) builds the root, drops privileges and execs `/bin/sh -ec COMMAND`.
Its own failures are one line on stderr and exit status 125.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from plugins.linux import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_REC, Syscalls

#: Where the host's root is attached while pivoting; removed again (`setup_argv`'s caller).
OLD_ROOT = ".sandgate-old-root"
#: Device nodes a setup command gets, bound from the host's.
DEVICES = ("null", "zero", "full", "random", "urandom")
#: CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID, CAP_KILL, CAP_SETGID,
#: CAP_SETUID, CAP_SETFCAP: what dpkg-style setup (chown, chmod u+s, useradd, setcap) needs.
KEPT_CAPS = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 31})
#: The environment of a setup command.
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
       "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", "TMPDIR": "/tmp"}
#: Stage 2's exit status when it could not confine the command (the command never ran).
CONFINE_FAILED = 125


def setup_argv(tree: Path, command: str) -> list[str]:
    """The host-side command that runs `command` confined in `tree` (as root there). Its Python
    runs without `site` and needs this module on PYTHONPATH."""
    return ["unshare", "--mount", "--propagation", "private",
            "--net", "--pid", "--ipc", "--uts", "--cgroup", "--fork", "--kill-child",
            sys.executable, "-S", "-m", "plugins.microvm.images.confine", str(tree), command]


class ConfineError(Exception):
    """Stage 2 could not build the confinement."""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m plugins.microvm.images.confine TREE COMMAND (in fresh namespaces)", file=sys.stderr)
        sys.exit(2)
    try:
        _confine(args[0])
    except (ConfineError, OSError) as exc:
        print(f"confine: {exc}", file=sys.stderr)
        os._exit(CONFINE_FAILED)
    try:
        os.execve("/bin/sh", ["sh", "-ec", args[1]], ENV)
    except OSError as exc:
        print(f"confine: cannot run /bin/sh in the image: {exc.strerror}", file=sys.stderr)
        os._exit(CONFINE_FAILED)


def _confine(tree: str) -> None:
    calls = Syscalls(ConfineError)
    calls.die_with_parent()
    if os.getpid() != 1:
        raise ConfineError("not PID 1 of a new PID namespace (run through setup_argv)")
    root = os.path.realpath(tree)
    calls.mount(root, root, None, MS_BIND | MS_REC)
    os.makedirs(f"{root}/proc", exist_ok=True)
    calls.mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(f"{root}/dev", exist_ok=True)
    calls.mount("sandgate-dev", f"{root}/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name in DEVICES:
        with open(f"{root}/dev/{name}", "w"):
            pass
        calls.mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    os.makedirs(f"{root}/{OLD_ROOT}", mode=0o700, exist_ok=True)
    calls.pivot_root(root, f"{root}/{OLD_ROOT}")
    os.rmdir(f"/{OLD_ROOT}")
    calls.keep_only_capabilities(KEPT_CAPS)


if __name__ == "__main__":
    main()
