"""The egress core without a VM: the policy and secrets (sans-I/O, with Hypothesis), and the real
policy proxy and DNS server in this process, in front of the test upstream ("the internet" on
203.0.113.x in a network namespace, with its own DNS server and CA: tests/net/upstream.py).

The guest's view through real sandboxes is in tests/plugins/microvm/test_network.py (microVM),
tests/plugins/pod/ (pods) and tests/plugins/wasm/ (WASM's fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import ssl
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import given
from hypothesis import strategies as st

from gateway.egress import dns, proxy
from gateway.egress.network import Egress, SandboxNetwork, upstream_context
from gateway.egress.policy import REFUSED, NetworkPolicy, refusal
from gateway.egress.resolver import Resolver, parse_nameservers
from gateway.egress.secrets import Leak, Redactor, Secrets, StreamFiller
from guest_agent.wire import ProtocolError
from tests.net.upstream import ADDRESS, API, LOOPBACK, MIXED, OTHER, OTHER_ADDRESS, PORT, PRIVATE, TLS_PORT, Upstream

IPV4_REFUSED = [net for net, _ in REFUSED if net.version == 4]
ip = ipaddress.ip_address


# -- the policy ------------------------------------------------------------------------------------


@given(st.sampled_from(IPV4_REFUSED), st.integers(min_value=0))
def test_every_spelling_of_a_refused_ipv4_address_is_refused(network: ipaddress.IPv4Network, offset: int) -> None:
    address = network[offset % network.num_addresses]
    assert refusal(address) is not None
    for spelled in (f"::ffff:{address}", f"2002:{int(address) >> 16:x}:{int(address) & 0xFFFF:x}::",
                    f"64:ff9b::{address}"):
        assert refusal(ip(spelled)) is not None, spelled


@pytest.mark.parametrize("address", ["203.0.113.10", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ip(address)) is None


def test_the_hosts_own_public_address_is_refused() -> None:
    own = ip("198.51.100.7")
    assert refusal(own) is None
    assert "gateway's host" in (refusal(own, [own]) or "")


@pytest.mark.parametrize(("wire", "mode"), [(None, "none"), (False, "none"), (True, "public"), ("none", "none"),
                                            ("public", "public"), ("all", "all"), ({"allow": []}, "rules")])
def test_policy_forms(wire: Any, mode: str) -> None:
    assert NetworkPolicy.parse(wire).mode == mode


@pytest.mark.parametrize("wire", ["open", 3, {"allow": "x.org"}, {"allow": ["x.org"], "other": []},
                                  {"allow": ["bad name.org"]}, {"allow": ["x.org:99999"]}, {"allow": ["[::1"]},
                                  {"deny": [""]}, {"allow": ["x" * 400]}, {"allow": ["a.org"] * 300}])
def test_bad_policies_are_bad_requests(wire: Any) -> None:
    with pytest.raises(ProtocolError) as error:
        NetworkPolicy.parse(wire)
    assert error.value.code == "bad_request"


def test_rules_deny_beats_allow_and_nothing_else_passes() -> None:
    policy = NetworkPolicy.parse({"allow": ["*.example.org", "api.example.com:443", "203.0.113.0/24"],
                                  "deny": ["bad.example.org", "203.0.113.66"]})
    assert policy.name_refusal("x.example.org") is None
    assert policy.name_refusal("deep.x.example.org", 80) is None
    assert "not in the allow list" in (policy.name_refusal("example.org") or "")  # a wildcard: subdomains only
    assert "denied by the rule" in (policy.name_refusal("bad.example.org") or "")
    assert policy.name_refusal("api.example.com", 443) is None
    assert policy.name_refusal("api.example.com", 80) is not None
    # Address rules match addresses; name rules only through names this sandbox resolved.
    assert policy.address_refusal(ip("203.0.113.5"), 80, [], []) is None
    assert "denied" in (policy.address_refusal(ip("203.0.113.66"), 80, [], []) or "")
    assert "not in the allow list" in (policy.address_refusal(ip("198.51.100.9"), 443, [], []) or "")
    assert policy.address_refusal(ip("198.51.100.9"), 443, ["api.example.com"], []) is None
    assert policy.address_refusal(ip("198.51.100.9"), 80, ["api.example.com"], []) is not None
    # Rules never open a refused range, not even by a name that resolves there.
    assert "private" in (policy.address_refusal(ip("10.0.0.1"), 443, ["x.example.org"], []) or "")


def test_all_opens_private_ranges_but_never_loopback_or_the_host() -> None:
    policy = NetworkPolicy.parse("all")
    assert policy.address_refusal(ip("10.0.0.1"), 80, [], []) is None
    assert policy.address_refusal(ip("169.254.169.254"), 80, [], []) is None
    assert "loopback" in (policy.address_refusal(ip("127.0.0.1"), 80, [], []) or "")
    assert "gateway's host" in (policy.address_refusal(ip("198.51.100.7"), 80, [], [ip("198.51.100.7")]) or "")
    assert NetworkPolicy.parse("none").address_refusal(ip("203.0.113.1"), 80, [], []) is not None


# -- secrets ---------------------------------------------------------------------------------------


SECRETS_WIRE = [{"env": "API_KEY", "value": "real-key-1", "hosts": [API]},
                {"env": "OTHER_KEY", "value": "real-key-2", "hosts": ["*.elsewhere.example"]}]


def test_secrets_fill_only_for_their_hosts() -> None:
    secrets = Secrets.parse(SECRETS_WIRE)
    key, other = (item.placeholder for item in secrets.items)
    assert secrets.env()["API_KEY"] == key.decode() and b"real" not in key
    assert secrets.fill(b"Bearer " + key, API) == b"Bearer real-key-1"
    assert secrets.fill(b"x." + other, "a.elsewhere.example") == b"x.real-key-2"
    with pytest.raises(Leak):
        secrets.fill(b"Bearer " + key, OTHER)
    with pytest.raises(Leak):
        secrets.fill(b"Bearer " + key, None)  # plain HTTP: no secret goes there
    assert secrets.describe() == [{"env": "API_KEY", "hosts": [API]},
                                  {"env": "OTHER_KEY", "hosts": ["*.elsewhere.example"]}]
    assert "real-key" not in repr(secrets)


@pytest.mark.parametrize("wire", [[{"env": "1X", "value": "v", "hosts": ["a.org"]}],
                                  [{"env": "X", "value": "", "hosts": ["a.org"]}],
                                  [{"env": "X", "value": "v", "hosts": []}],
                                  [{"env": "X", "value": "v", "hosts": ["203.0.113.0/24"]}],
                                  [{"env": "X", "value": "v", "hosts": ["a.org"]}] * 2,
                                  "x"])
def test_bad_secrets_are_bad_requests_that_never_show_the_value(wire: Any) -> None:
    with pytest.raises(ProtocolError) as error:
        Secrets.parse(wire)
    assert error.value.code == "bad_request" and "v'" not in error.value.message


@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30), st.binary(max_size=200))
def test_a_stream_fills_and_redacts_whatever_the_pieces(cuts: list[int], noise: bytes) -> None:
    secrets = Secrets.parse(SECRETS_WIRE[:1])
    key = secrets.items[0].placeholder
    data = noise + key + noise + b"sandgate-secret-" + noise + key
    filler, redactor = StreamFiller(secrets, API), Redactor(secrets)
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(data[at:at + cut])
        at += cut
    pieces.append(data[at:])
    filled = b"".join(filler.feed(p) for p in pieces) + filler.end()
    assert filled == secrets.fill(data, API)
    back = b"".join(redactor.feed(filled[i:i + 7]) for i in range(0, len(filled), 7)) + redactor.end()
    assert b"real-key-1" not in back


# -- the proxy and the DNS server, for real --------------------------------------------------------


class Sandbox:
    """A SandboxNetwork served by the real proxy on a loopback port, as a runtime would bring it."""

    def __init__(self, upstream: Upstream, policy: Any, secrets: Any = None) -> None:
        assert upstream.ca is not None
        egress = Egress(resolver=Resolver(parse_nameservers([upstream.nameserver])),
                        upstream_tls=upstream_context(str(upstream.ca.ca_file)))
        self.network: SandboxNetwork = egress.attach("sb_test", "tenant", NetworkPolicy.parse(policy),
                                                     Secrets.parse(secrets))
        self.upstream = upstream
        self.port = 0

    async def __aenter__(self) -> Sandbox:
        self.handlers: set[asyncio.Task[None]] = set()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        # The outermost frame of a connection's task: a cancel (the sandbox going) ends it quietly.
        with contextlib.suppress(asyncio.CancelledError):
            await proxy.handle(reader, writer, lambda _request: self.network)
        self.handlers.discard(task)

    async def __aexit__(self, *exc: object) -> None:
        self.network.egress.detach(self.network)
        self.server.close()
        # A connection the test left open ends with the sandbox, as a runtime's listener ends them.
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def ask(self, head: bytes) -> bytes:
        """One request through the proxy; its whole answer."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(head)
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer

    async def tunnel(self, target: str) -> tuple[bytes, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status = await reader.readuntil(b"\r\n\r\n")
        return status, reader, writer

    async def https(self, target: str, server_name: str, request: bytes, cafile: str | None = None,
                    cadata: bytes | None = None) -> bytes:
        """An HTTPS request through a CONNECT tunnel, TLS as the guest would do it."""
        status, reader, writer = await self.tunnel(target)
        assert status.startswith(b"HTTP/1.1 200"), status
        context = ssl.create_default_context(cafile=cafile, cadata=cadata.decode() if cadata else None)
        await writer.start_tls(context, server_hostname=server_name)
        writer.write(request)
        answer = await reader.read()
        writer.close()
        return answer

    async def dns(self, name: str, qtype: str = "A") -> DNSRecord:
        reply = await dns.answer(DNSRecord.question(name, qtype).pack(), self.network)
        assert reply is not None
        return DNSRecord.parse(reply)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


@pytest.fixture
def upstream(egress_upstream: Upstream) -> Upstream:
    return egress_upstream


async def test_none_reaches_nothing(upstream: Upstream) -> None:
    async with Sandbox(upstream, "none") as box:
        answer = await box.ask(f"GET http://{API}:{PORT}/hello HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert _status(answer) == 403 and b"no network" in _body(answer)
        assert (await box.dns(API)).header.rcode == RCODE.NXDOMAIN
        assert box.network.counters.refusals == 2


async def test_an_allowlisted_name_is_reachable_and_nothing_else(upstream: Upstream) -> None:
    async with Sandbox(upstream, {"allow": [API]}) as box:
        hello = await box.ask(f"GET http://{API}:{PORT}/hello HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
        assert _status(hello) == 200 and _body(hello) == f"hello from {ADDRESS}\n".encode()
        unlisted = await box.ask(f"GET http://{OTHER}:{PORT}/hello HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert _status(unlisted) == 403 and b"not in the allow list" in _body(unlisted)
        # The raw address of an allowed name: refused, as no name of it was resolved for a rule...
        raw = await box.ask(f"GET http://{OTHER_ADDRESS}:{PORT}/hello HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert _status(raw) == 403
        status, _, writer = await box.tunnel(f"{OTHER_ADDRESS}:{TLS_PORT}")
        assert status.startswith(b"HTTP/1.1 403")
        writer.close()
        # ... while the address the sandbox resolved the allowed name to matches its rule.
        answer = await box.dns(API)
        assert [str(rr.rdata) for rr in answer.rr] == [ADDRESS]
        direct = await box.ask(f"GET http://{ADDRESS}:{PORT}/hello HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert _status(direct) == 200
        assert (await box.dns(OTHER)).header.rcode == RCODE.NXDOMAIN
        assert (await box.dns(API, "MX")).rr == []  # admitted, but the gateway answers addresses only
        assert box.network.counters.connections == 2 and box.network.counters.bytes_in > 0
        reasons = [r["reason"] for r in box.network.describe()["recent_refusals"]]
        assert len(reasons) == 4 and all("allow list" in r or "no address" in r for r in reasons), reasons
    async with Sandbox(upstream, "public") as box:
        assert (await box.dns(f"nowhere.{API}")).header.rcode == RCODE.NXDOMAIN  # admitted, but no such name


async def test_names_resolving_to_refused_ranges_are_refused(upstream: Upstream) -> None:
    async with Sandbox(upstream, {"allow": [f"*.{API.split('.', 1)[1]}"]}) as box:
        for name in (PRIVATE, LOOPBACK):
            answer = await box.ask(f"GET http://{name}:{PORT}/ HTTP/1.1\r\nHost: h\r\n\r\n".encode())
            assert _status(answer) == 403, answer
            assert b"public addresses only" in _body(answer)
            assert (await box.dns(name)).rr == []  # the rebinding guard drops the answer
        mixed = await box.dns(MIXED)
        assert [str(rr.rdata) for rr in mixed.rr] == [ADDRESS]  # the private half trimmed
        assert _status(await box.ask(f"GET http://{MIXED}:{PORT}/hello HTTP/1.1\r\nHost: h\r\n\r\n".encode())) == 200


async def test_tls_must_name_the_host_the_tunnel_was_opened_to(upstream: Upstream) -> None:
    assert upstream.ca is not None
    ca = str(upstream.ca.ca_file)
    async with Sandbox(upstream, {"allow": [API, OTHER]}) as box:
        ok = await box.https(f"{API}:{TLS_PORT}", API, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                             cafile=ca)
        assert _body(ok) == f"hello from {ADDRESS}\n".encode()
        # Fronting: a tunnel to one allowed name, TLS asking for another.
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await box.https(f"{API}:{TLS_PORT}", OTHER, b"GET / HTTP/1.1\r\n\r\n", cafile=ca)
        assert "does not match the tunnel's host" in box.network.describe()["recent_refusals"][-1]["reason"]
    async with Sandbox(upstream, {"allow": ["203.0.113.0/24"]}) as box:  # an address rule: any name will do
        ok = await box.https(f"{ADDRESS}:{TLS_PORT}", OTHER, b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n",
                             cafile=ca)
        assert _status(ok) == 200


async def test_secrets_are_filled_for_their_host_only(upstream: Upstream) -> None:
    async with Sandbox(upstream, {"allow": [API, OTHER]}, SECRETS_WIRE) as box:
        key = box.network.secrets.env()["API_KEY"]
        body = json.dumps({"key": key, "pad": "x" * 100}).encode()
        request = (f"POST /echo/a?k={key} HTTP/1.1\r\nHost: {API}:{TLS_PORT}\r\nAuthorization: Bearer {key}\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        answer = await box.https(f"{API}:{TLS_PORT}", API, request, cadata=box.network.ca.cert_pem)
        assert _status(answer) == 200, answer
        seen = upstream.received()[-1]
        assert seen["tls"] and seen["headers"]["Authorization"] == "Bearer real-key-1"
        assert json.loads(seen["body"])["key"] == "real-key-1" and seen["path"] == "/echo/a?k=real-key-1"
        # The upstream echoed the value back: the guest gets the placeholder again.
        assert b"real-key-1" not in answer and key.encode() in answer
        # The placeholder to another host: refused, never sent.
        before = len(upstream.received())
        leak = await box.ask(f"POST https://{OTHER}:{TLS_PORT}/echo HTTP/1.1\r\nHost: h\r\nX-Key: {key}\r\n"
                             f"Content-Length: 0\r\n\r\n".encode())
        assert _status(leak) == 403 and b"bound to" in _body(leak)
        plain = await box.ask(f"GET http://{API}:{PORT}/echo HTTP/1.1\r\nHost: h\r\nX-Key: {key}\r\n\r\n".encode())
        assert _status(plain) == 403 and b"HTTPS only" in _body(plain)
        assert len(upstream.received()) == before
        # An https:// proxy request (WASM's fetch) is filled the same way, a large body streamed.
        big = b"y" * (3 << 20) + key.encode()
        fetched = await box.ask(f"PUT https://{API}:{TLS_PORT}/echo HTTP/1.1\r\nHost: h\r\n"
                                f"Content-Length: {len(big)}\r\n\r\n".encode() + big)
        assert _status(fetched) == 200
        assert upstream.received()[-1]["body"].endswith("real-key-1")
        assert b"real-key-1" not in fetched


async def test_a_policy_change_applies_to_new_and_open_connections(upstream: Upstream) -> None:
    async with Sandbox(upstream, {"allow": [API]}) as box:
        status, reader, writer = await box.tunnel(f"{API}:{PORT}")
        assert status.startswith(b"HTTP/1.1 200")
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(1) == b"."
        assert box.network.set_policy(NetworkPolicy.parse({"allow": [OTHER]})) == 1
        assert await reader.read() in (b"", b".")  # the tunnel is cut
        writer.close()
        assert _status(await box.ask(f"GET http://{API}:{PORT}/hello HTTP/1.1\r\nHost: h\r\n\r\n".encode())) == 403
        assert _status(await box.ask(f"GET http://{OTHER}:{PORT}/hello HTTP/1.1\r\nHost: h\r\n\r\n".encode())) == 200


@pytest.mark.parametrize(("head", "status"), [
    (b"CONNECT user@example.org:443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT example.org HTTP/1.1\r\nHost: e\r\n\r\n", 400),
    (b"GET /relative HTTP/1.1\r\nHost: e\r\n\r\n", 400),
    (b"GET ftp://example.org/ HTTP/1.1\r\nHost: e\r\n\r\n", 400),
    (b"BREW coffee\r\n\r\n", 400),
    (b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (100 << 10) + b"\r\n\r\n", 431),
])
async def test_bad_requests_answer_an_error(upstream: Upstream, head: bytes, status: int) -> None:
    async with Sandbox(upstream, "public") as box:
        answer = await box.ask(head)
        assert _status(answer) == status, answer


@pytest.mark.parametrize(("target", "reason"), [
    ("127.0.0.1:22", b"loopback"), ("[::ffff:10.1.2.3]:80", b"private"), ("[::1]:22", b"loopback"),
    ("169.254.169.254:80", b"link-local"),
])
async def test_public_refuses_the_refused_ranges(upstream: Upstream, target: str, reason: bytes) -> None:
    async with Sandbox(upstream, "public") as box:
        answer = await box.ask(f"CONNECT {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        assert _status(answer) == 403 and reason in _body(answer), answer


async def test_dns_over_tcp_answers_by_the_policy(upstream: Upstream) -> None:
    async with Sandbox(upstream, {"allow": [API]}) as box:
        server = await asyncio.start_server(lambda r, w: dns.serve_tcp(r, w, box.network), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            replies = []
            for name in (API, OTHER):  # two queries on one connection (RFC 7766)
                query = DNSRecord.question(name).pack()
                writer.write(len(query).to_bytes(2, "big") + query)
                length = int.from_bytes(await reader.readexactly(2), "big")
                replies.append(DNSRecord.parse(await reader.readexactly(length)))
            writer.close()
            assert [str(rr.rdata) for rr in replies[0].rr] == [ADDRESS] and replies[0].q.qtype == QTYPE.A
            assert replies[1].header.rcode == RCODE.NXDOMAIN
        finally:
            server.close()
            await server.wait_closed()


async def test_a_sandbox_connection_flood_is_counted_and_the_log_bounded(upstream: Upstream,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    async with Sandbox(upstream, {"allow": []}) as box:
        caplog.set_level("INFO", "sandgate.egress")
        for _ in range(100):
            await box.dns(OTHER)
        assert box.network.counters.refusals == 100
        assert len(box.network.describe()["recent_refusals"]) == 50
        assert len([r for r in caplog.records if "refused" in r.getMessage()]) <= 21
