"""Sandbox egress: where a sandbox's outbound connections may go, and the gateway-side proxy that
makes them on its behalf.

`policy` holds the one table of address ranges no sandbox may reach (the gateway's host, private
networks, the cloud metadata address, ...) and the check against it; `proxy` is an HTTP forward
proxy (CONNECT and absolute-URI requests) that resolves names itself and connects only to
addresses the policy allows. Runtimes hand it the connections their sandboxes open (the microVM
runtime through QEMU's restricted user networking: plugins/microvm/egress.py).
"""
