"""A stand-in for "the internet": HTTP and HTTPS servers on public-looking addresses (TEST-NET-3,
203.0.113.0/24, a documentation range: .10 and .11 of a /28 this process holds alone, ADDRESS and
OTHER_ADDRESS) inside a network namespace made here, joined to the host by a veth pair, and a DNS
server on the host's loopback that gives test names those addresses (and some refused ones). The
egress proxy sees addresses that are neither private nor the host's, as real upstreams would be;
no packet leaves the machine. Needs root and iproute2; `Upstream.start` says why not.

The servers answer:
- `GET /hello`: a line naming the address;
- `GET /bytes/<n>`: n zero bytes;
- any method on `/echo...`: a JSON object of what arrived (method, path, headers, body as text),
  also appended as a line to `Upstream.record` (what the upstream received, for a test to read
  where the guest cannot: a secret's real value is there, never in the guest);
- `GET /slow`: headers, then a byte a second until the client goes (a long-lived connection).
HTTPS uses a certificate from `TestCA` for the test names and both addresses.

Names (`Names`): api. and other. -> .10 and .11; private. -> 10.20.30.40; loopback. -> 127.0.0.1;
mixed. -> ADDRESS and 10.20.30.40 (an answer the rebinding guard must trim).
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer


def _take_slot() -> int:
    """A /28 of TEST-NET-3 for this process alone (a lock file held while the process lives), so
    test runs on one machine at once (a developer's and CI's, or helpers') get their own routes."""
    for slot in range(16):
        fd = os.open(f"/tmp/sandgate-upstream-slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _SLOT_LOCKS.append(fd)  # held, never closed: the slot is this process's until it exits
        return slot
    raise RuntimeError("16 test upstreams are in use on this machine")


_SLOT_LOCKS: list[int] = []
_BASE = 16 * _take_slot()
ADDRESS = f"203.0.113.{_BASE + 10}"
OTHER_ADDRESS = f"203.0.113.{_BASE + 11}"
HOST_SIDE = f"203.0.113.{_BASE + 1}"
PREFIX = 28
PORT = 8080
TLS_PORT = 8443
DOMAIN = "sgtest.example"
API = f"api.{DOMAIN}"
OTHER = f"other.{DOMAIN}"
PRIVATE = f"private.{DOMAIN}"
LOOPBACK = f"loopback.{DOMAIN}"
MIXED = f"mixed.{DOMAIN}"
NAMES: dict[str, list[str]] = {API: [ADDRESS], OTHER: [OTHER_ADDRESS], PRIVATE: ["10.20.30.40"],
                               LOOPBACK: ["127.0.0.1"], MIXED: [ADDRESS, "10.20.30.40"]}

SERVER = r"""
import http.server, json, socketserver, ssl, sys, threading, time

ADDRESSES, PORT, TLS_PORT, CERT, RECORD = json.loads(sys.argv[1])
lock = threading.Lock()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # As servers meant to be fast do: otherwise a keep-alive answer's second segment waits for the
    # client's delayed ACK (40 ms), and every figure through the upstream would measure that.
    disable_nagle_algorithm = True

    def answer(self, status, body, kind="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if not size:
                    break
                body += chunk
        local = self.connection.getsockname()[0]
        if self.path == "/hello":
            self.answer(200, ("hello from %s\n" % local).encode())
        elif self.path.startswith("/bytes/"):
            n = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            chunk = bytes(1 << 16)
            while n:
                self.wfile.write(chunk[:min(n, len(chunk))])
                n -= min(n, len(chunk))
        elif self.path.startswith("/echo"):
            seen = {"address": local, "tls": isinstance(self.connection, ssl.SSLSocket), "method": self.command,
                    "path": self.path, "headers": dict(self.headers.items()),
                    "body": body.decode("utf-8", "replace")}
            with lock, open(RECORD, "a") as f:
                f.write(json.dumps(seen) + "\n")
            self.answer(200, json.dumps(seen).encode(), "application/json")
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.flush()
            try:
                while True:
                    self.wfile.write(b".")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:
                pass
        else:
            self.answer(404, b"no such path\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT)
servers = []
for address in ADDRESSES:
    servers.append(Server((address, PORT), Handler))
    tls = Server((address, TLS_PORT), Handler)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    servers.append(tls)
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


class UnavailableHere(Exception):
    """This machine cannot make the namespace (not root, no iproute2, no netns support)."""


class TestCA:
    """A CA made for one test run, and a server certificate from it for the test names."""

    def __init__(self, folder: Path) -> None:
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandgate test upstream CA")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
              .not_valid_after(now + datetime.timedelta(days=2))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(key, hashes.SHA256()))
        server_key = ec.generate_private_key(ec.SECP256R1())
        alt = [x509.DNSName(n) for n in NAMES] + [x509.IPAddress(ipaddress.ip_address(a))
                                                  for a in (ADDRESS, OTHER_ADDRESS)]
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, API)]))
                .issuer_name(name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                .sign(key, hashes.SHA256()))
        self.ca_file = folder / "upstream-ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.server_file = folder / "upstream-server.pem"
        self.server_file.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM) + server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


class _Names(BaseResolver):  # type: ignore[misc]
    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        if name not in NAMES:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for address in NAMES[name]:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=60))
        return reply


@dataclass
class Upstream:
    """The namespace, its veth pair, the servers and the DNS server; `stop` removes them all."""

    folder: Path
    name: str = field(default_factory=lambda: f"sgup{os.getpid() % 100000}")
    server: subprocess.Popen[str] | None = None
    dns: DNSServer | None = None
    ca: TestCA | None = None

    @property
    def url(self) -> str:
        return f"http://{ADDRESS}:{PORT}"

    @property
    def record(self) -> Path:
        return self.folder / "upstream-record.jsonl"

    @property
    def nameserver(self) -> str:
        """The DNS server, as `[network] nameservers` takes it."""
        assert self.dns is not None
        return f"127.0.0.1:{self.dns.server.server_address[1]}"

    def received(self) -> list[dict[str, Any]]:
        """What the /echo endpoints received so far, oldest first."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def start(self) -> None:
        """Make the namespace and start the servers; return once they listen.

        Raises:
            UnavailableHere: with the reason.
        """
        if os.geteuid() != 0:
            raise UnavailableHere("making a network namespace needs root")
        if shutil.which("ip") is None:
            raise UnavailableHere("no `ip` command (iproute2)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA(self.folder)
        host_if, ns_if = f"{self.name}h", f"{self.name}n"
        try:
            self._ip("netns", "add", self.name)
        except subprocess.CalledProcessError as exc:
            raise UnavailableHere(f"`ip netns add` failed: {exc.stderr.strip()}") from None
        try:
            self._ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", self.name)
            self._ip("addr", "add", f"{HOST_SIDE}/{PREFIX}", "dev", host_if)
            self._ip("link", "set", host_if, "up")
            for args in (("addr", "add", f"{ADDRESS}/{PREFIX}", "dev", ns_if),
                         ("addr", "add", f"{OTHER_ADDRESS}/{PREFIX}", "dev", ns_if),
                         ("link", "set", ns_if, "up"), ("link", "set", "lo", "up")):
                self._ip("netns", "exec", self.name, "ip", *args)
            config = json.dumps([[ADDRESS, OTHER_ADDRESS], PORT, TLS_PORT, str(self.ca.server_file), str(self.record)])
            self.server = subprocess.Popen(
                ["ip", "netns", "exec", self.name, sys.executable, "-I", "-c", SERVER, config],
                stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
            )
            assert self.server.stdout is not None
            if self.server.stdout.readline().strip() != "ready":
                raise RuntimeError("the upstream server did not start")
            self.dns = DNSServer(_Names(), port=0, address="127.0.0.1", tcp=False, logger=_Quiet())
            self.dns.start_thread()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.dns is not None:
            self.dns.stop()
            self.dns.server.server_close()
            self.dns = None
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            for stream in (self.server.stdout, self.server.stdin):
                if stream is not None:
                    stream.close()
            self.server = None
        # Deleting the namespace removes its end of the veth pair, and with it the host's end.
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], capture_output=True, text=True, check=True)


class _Quiet:
    """dnslib's server logger, silenced (its default prints every query)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
