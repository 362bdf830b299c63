"""A microVM's network: QEMU user networking with `restrict=on`, so the guest reaches nothing but
one address, the egress proxy's (`PROXY_ADDRESS`), forwarded to the gateway.

Restricted, QEMU's slirp drops every packet the guest sends except TCP to a `guestfwd` address:
no host loopback through 10.0.2.2, no DNS (UDP), no ICMP. The one `guestfwd` runs a command per
connection (QEMU 7.2 has no Unix-socket guestfwd that takes more than one connection):
`guestfwd.py`, which passes the connection's socket to this VM's `HandoffListener`
(gateway/egress/handoff.py) over a Unix datagram socket in the VM's folder and exits. From then
on the connection is the gateway's, served by `gateway.egress.proxy` (names resolved by the
gateway, public addresses only) in the gateway's event loop: nothing runs beside the gateway and
QEMU, and everything ends with either.

A process per connection is what a hostile guest can make the host pay for: opening connections
from 8 threads, one guest kept both cores busy with helpers (~40 ms of CPU each) and nothing else
got done. So the helpers of one VM run one at a time (`flock` on the VM's lock file; the others
wait, asleep, up to HANDOFF_WAIT_S) and at the lowest CPU priority (`nice -n 19`): a flood costs
its VM at most about one idle-priority core, and a VM's own connections only queue.

The guest's init sets `http_proxy`, `https_proxy` and `no_proxy` (kernel argument `sandgate.proxy`)
for the guest agent and every process it starts, so curl, pip and npm go through the proxy, and
names the same address as its DNS server, over TCP (`options use-vc`): the gateway answers by
the sandbox's policy (gateway/egress/dns.py).
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

#: Where the guest finds the egress proxy: in slirp's 10.0.2.0/24, an address slirp does not use.
PROXY_ADDRESS = "10.0.2.100"
PROXY_PORT = 3128
DNS_PORT = 53
#: The handoff datagram's byte for a connection to the proxy and to the DNS server
#: (gateway/egress/handoff.py).
PROXY_KIND = b"c"
DNS_KIND = b"d"
HELPER = Path(__file__).with_name("guestfwd.py")
#: How long a connection's helper waits for the ones before it (then the connection is closed):
#: long enough for a burst on a busy host, short enough that a flood's sleepers do not pile up.
HANDOFF_WAIT_S = 30


def netdev(socket_path: Path) -> str:
    """The `-netdev` option of a VM with a network whose handoff listener is at `socket_path`: the
    proxy's port and DNS over TCP on port 53, at the one address the guest reaches.

    Raises:
        OSError: no `nice` or `flock` on PATH (coreutils and util-linux, on every Debian).
    """
    tools = [shutil.which(name) for name in ("nice", "flock")]
    if None in tools:
        raise OSError("the microVM network needs `nice` and `flock` (coreutils, util-linux) on PATH")
    nice, flock = tools
    lock = socket_path.with_name("egress.lock")
    rules = []
    for port, kind in ((PROXY_PORT, PROXY_KIND), (DNS_PORT, DNS_KIND)):
        command = shlex.join([str(nice), "-n", "19", str(flock), "-w", str(HANDOFF_WAIT_S), str(lock),
                              sys.executable, "-I", "-S", str(HELPER), str(socket_path), kind.decode()])
        # QEMU's option syntax: a comma inside a value is written twice.
        rules.append(f"guestfwd=tcp:{PROXY_ADDRESS}:{port}-cmd:{command}".replace(",", ",,"))
    # ipv6=off: slirp's IPv6 side (router adverts, its fec0::2 host alias) is not needed by the
    # forwards, and leaving it off leaves nothing to trust about how `restrict` treats it.
    return f"user,id=net0,restrict=on,ipv6=off,{','.join(rules)}"


def kernel_argument() -> str:
    """Tells the guest's init where the proxy is (it sets the proxy environment from it)."""
    return f"sandgate.proxy={PROXY_ADDRESS}:{PROXY_PORT}"
