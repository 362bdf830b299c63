"""Run by QEMU for each connection a guest opens to the egress proxy's address (`guestfwd`'s
`cmd:`, which gives the command the connection as stdin, stdout and stderr): hands the connection
to the gateway (`gateway.egress.handoff.HandoffListener`, over the Unix socket named by the first argument, the
second being the datagram's byte: what the connection is for, `egress.PROXY_KIND` or `DNS_KIND`) and exits.

One process per connection, so it must start fast and say nothing: standard library only, run
with `python -I -S`, and silent (its stderr is the guest's connection). When the gateway is gone
the send fails and the guest's connection closes as this exits: nothing is left running.
"""

import array
import os
import socket
import sys

#: A gateway that does not take the connection within this long is taken as gone.
SEND_TIMEOUT_S = 10.0


def main() -> int:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as handoff:
            handoff.settimeout(SEND_TIMEOUT_S)
            # (socket.send_fds would drop the address: Python 3.11 does not pass it on.)
            fds = array.array("i", [0])
            handoff.sendmsg([sys.argv[2].encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, sys.argv[1])
    except BaseException:  # nothing may reach stderr: it is the guest's connection
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    os._exit(code)  # no interpreter teardown: nothing of it may write to the guest's connection
