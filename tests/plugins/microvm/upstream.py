"""A stand-in for "the internet": an HTTP server on a public-looking address (203.0.113.10, the
TEST-NET-3 documentation range) inside a network namespace made here, joined to the host by a veth
pair. The egress proxy sees an address that is neither private nor the host's, as a real upstream
would be; no packet leaves the machine. Needs root and iproute2; `Upstream.start` says why not.

The server answers `GET /hello` with a line naming itself and `GET /bytes/<n>` with n zero bytes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

ADDRESS = "203.0.113.10"
HOST_SIDE = "203.0.113.1"
PORT = 8080

SERVER = f"""
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/hello":
            body = b"hello from {ADDRESS}\\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/bytes/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = bytes(1 << 16)
            while n:
                self.wfile.write(chunk[:min(n, len(chunk))])
                n -= min(n, len(chunk))
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("{ADDRESS}", {PORT}), Handler)
print("ready", flush=True)
server.serve_forever()
"""


class UnavailableHere(Exception):
    """This machine cannot make the namespace (not root, no iproute2, no netns support)."""


@dataclass
class Upstream:
    """The namespace, its veth pair and the server; `stop` removes all three."""

    name: str = field(default_factory=lambda: f"sgup{os.getpid() % 100000}")
    server: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{ADDRESS}:{PORT}"

    def start(self) -> None:
        """Make the namespace and start the server; return once it listens.

        Raises:
            UnavailableHere: with the reason.
        """
        if os.geteuid() != 0:
            raise UnavailableHere("making a network namespace needs root")
        if shutil.which("ip") is None:
            raise UnavailableHere("no `ip` command (iproute2)")
        host_if, ns_if = f"{self.name}h", f"{self.name}n"
        try:
            self._ip("netns", "add", self.name)
        except subprocess.CalledProcessError as exc:
            raise UnavailableHere(f"`ip netns add` failed: {exc.stderr.strip()}") from None
        try:
            self._ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", self.name)
            self._ip("addr", "add", f"{HOST_SIDE}/24", "dev", host_if)
            self._ip("link", "set", host_if, "up")
            for args in (("addr", "add", f"{ADDRESS}/24", "dev", ns_if), ("link", "set", ns_if, "up"),
                         ("link", "set", "lo", "up")):
                self._ip("netns", "exec", self.name, "ip", *args)
            self.server = subprocess.Popen(
                ["ip", "netns", "exec", self.name, sys.executable, "-I", "-c", SERVER],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            )
            assert self.server.stdout is not None
            if self.server.stdout.readline().strip() != "ready":
                raise RuntimeError("the upstream server did not start")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            if self.server.stdout is not None:
                self.server.stdout.close()
            self.server = None
        # Deleting the namespace removes its end of the veth pair, and with it the host's end.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], capture_output=True, text=True, check=True)
