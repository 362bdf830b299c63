"""A microVM's network: QEMU user networking with `restrict=on`, so the guest reaches nothing but
one address, the egress proxy's (`PROXY_ADDRESS`), forwarded to the gateway.

Restricted, QEMU's slirp drops every packet the guest sends except TCP to a `guestfwd` address:
no host loopback through 10.0.2.2, no DNS (UDP), no ICMP. The one `guestfwd` runs a command per
connection (QEMU 7.2 has no Unix-socket guestfwd that takes more than one connection):
`guestfwd.py`, which passes the connection's socket to this VM's `EgressListener` over a Unix
datagram socket in the VM's folder and exits. From then on the connection is the gateway's,
served by `gateway.egress.proxy` (names resolved by the gateway, public addresses only) in the
gateway's event loop: nothing runs beside the gateway and QEMU, and everything ends with either.

A process per connection is what a hostile guest can make the host pay for: opening connections
from 8 threads, one guest kept both cores busy with helpers (~40 ms of CPU each) and nothing else
got done. So the helpers of one VM run one at a time (`flock` on the VM's lock file; the others
wait, asleep, up to HANDOFF_WAIT_S) and at the lowest CPU priority (`nice -n 19`): a flood costs
its VM at most about one idle-priority core, and a VM's own connections only queue.

The guest's init sets `http_proxy`, `https_proxy` and `no_proxy` (kernel argument `sandgate.proxy`)
for the guest agent and every process it starts, so curl, pip and npm go through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

from gateway.egress import proxy

log = logging.getLogger(__name__)

#: Where the guest finds the egress proxy: in slirp's 10.0.2.0/24, an address slirp does not use.
PROXY_ADDRESS = "10.0.2.100"
PROXY_PORT = 3128
#: A guest may hold this many proxied connections at once; more are closed as they arrive.
MAX_CONNECTIONS = 256
#: A Unix socket's path must fit `sun_path`.
MAX_SOCKET_PATH = 107
HELPER = Path(__file__).with_name("guestfwd.py")
#: How long a connection's helper waits for the ones before it (then the connection is closed):
#: long enough for a burst on a busy host, short enough that a flood's sleepers do not pile up.
HANDOFF_WAIT_S = 30


def netdev(socket_path: Path) -> str:
    """The `-netdev` option of a VM with a network whose egress listener is at `socket_path`.

    Raises:
        OSError: no `nice` or `flock` on PATH (coreutils and util-linux, on every Debian).
    """
    tools = [shutil.which(name) for name in ("nice", "flock")]
    if None in tools:
        raise OSError("the microVM network needs `nice` and `flock` (coreutils, util-linux) on PATH")
    nice, flock = tools
    lock = socket_path.with_name("egress.lock")
    command = shlex.join([str(nice), "-n", "19", str(flock), "-w", str(HANDOFF_WAIT_S), str(lock),
                          sys.executable, "-I", "-S", str(HELPER), str(socket_path)])
    # QEMU's option syntax: a comma inside a value is written twice.
    rule = f"tcp:{PROXY_ADDRESS}:{PROXY_PORT}-cmd:{command}".replace(",", ",,")
    # ipv6=off: slirp's IPv6 side (router adverts, its fec0::2 host alias) is not needed by the
    # one forward, and leaving it off leaves nothing to trust about how `restrict` treats it.
    return f"user,id=net0,restrict=on,ipv6=off,guestfwd={rule}"


def kernel_argument() -> str:
    """Tells the guest's init where the proxy is (it sets the proxy environment from it)."""
    return f"sandgate.proxy={PROXY_ADDRESS}:{PROXY_PORT}"


class EgressListener:
    """Takes the connections `guestfwd.py` hands over for one VM and serves each with the proxy.
    `close` ends them all and leaves the socket's file unbound, as a gateway that was killed would
    (the VM's folder goes with the VM): a helper started later fails to send and exits."""

    def __init__(self, path: Path, label: str) -> None:
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise OSError(f"the egress socket path {path} is too long for a Unix socket; "
                          "set SANDGATE_STATE_DIR to a shorter folder")
        self.path = path
        self.label = label
        self.connections: set[asyncio.Task[None]] = set()
        #: How many connections were refused for being over MAX_CONNECTIONS.
        self.overflowed = 0
        self._sock: socket.socket | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.path))
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._take)
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def _take(self) -> None:
        assert self._sock is not None
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(self._sock, 16, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("egress %s: cannot take a connection: %s", self.label, exc)
                return
            for fd in fds:
                if len(self.connections) >= MAX_CONNECTIONS:
                    os.close(fd)
                    self.overflowed += 1
                    continue
                task = asyncio.create_task(self._serve(fd), name=f"egress-{self.label}")
                self.connections.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.connections.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("egress %s: a connection failed", self.label, exc_info=task.exception())

    async def _serve(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=proxy.MAX_HEAD_BYTES)
        except BaseException:
            sock.close()
            raise
        await proxy.handle(reader, writer, self.label)

    async def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(ValueError, RuntimeError):  # the loop or the fd already gone
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
