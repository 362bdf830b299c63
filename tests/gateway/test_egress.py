"""The egress proxy's hostile-input handling and the refused ranges, without a VM: random request
heads into `plan`, the IPv6 spellings of refused IPv4 addresses, and a real client socket against
`handle` (refusals answer an HTTP error naming the reason; nothing connects anywhere).

The guest's view through a real microVM is in tests/plugins/microvm/test_network.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.egress import proxy
from gateway.egress.policy import REFUSED, refusal

IPV4_REFUSED = [net for net, _ in REFUSED if net.version == 4]


@given(st.sampled_from(IPV4_REFUSED), st.integers(min_value=0))
def test_every_spelling_of_a_refused_ipv4_address_is_refused(network: ipaddress.IPv4Network, offset: int) -> None:
    address = network[offset % network.num_addresses]
    assert refusal(address) is not None
    for spelled in (f"::ffff:{address}", f"2002:{int(address) >> 16:x}:{int(address) & 0xFFFF:x}::",
                    f"64:ff9b::{address}"):
        assert refusal(ipaddress.ip_address(spelled)) is not None, spelled


@pytest.mark.parametrize("address", ["203.0.113.10", "8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_the_hosts_own_public_address_is_refused() -> None:
    own = ipaddress.ip_address("198.51.100.7")
    assert refusal(own) is None
    assert "gateway's host" in (refusal(own, [own]) or "")


@given(st.binary(max_size=400))
def test_any_head_is_a_plan_or_a_refusal(head: bytes) -> None:
    try:
        proxy.plan(head + b"\r\n\r\n")
    except proxy.Refused as exc:
        assert exc.status == 400


def test_a_plain_http_request_is_rewritten_for_one_request_to_its_origin() -> None:
    plan = proxy.plan(b"POST http://example.org:8080/a?b=1 HTTP/1.1\r\nHost: example.org:8080\r\n"
                      b"Proxy-Authorization: Basic eA==\r\nConnection: keep-alive, X-Drop\r\nX-Drop: 1\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
    assert (plan.host, plan.port) == ("example.org", 8080)
    assert plan.forward_head == (b"POST /a?b=1 HTTP/1.1\r\nHost: example.org:8080\r\nTransfer-Encoding: chunked\r\n"
                                 b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("head", [
    b"CONNECT user@example.org:443 HTTP/1.1\r\n\r\n",
    b"CONNECT example.org HTTP/1.1\r\n\r\n",
    b"CONNECT example.org:0 HTTP/1.1\r\n\r\n",
    b"GET https://example.org/ HTTP/1.1\r\n\r\n",
    b"GET /relative HTTP/1.1\r\n\r\n",
    b"GET http://example.org/ HTTP/2\r\n\r\n",
    b"GET http://ex\xffample.org/ HTTP/1.1\r\n\r\n",
])
def test_bad_targets_are_refused_with_400(head: bytes) -> None:
    with pytest.raises(proxy.Refused) as refused:
        proxy.plan(head)
    assert refused.value.status == 400


@pytest.fixture
async def proxy_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(lambda r, w: proxy.handle(r, w, "test"), "127.0.0.1", 0,
                                        limit=proxy.MAX_HEAD_BYTES)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


async def _ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize(("request_bytes", "status", "reason"), [
    (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n", 403, b"127.0.0.1 is loopback"),
    (b"CONNECT localhost:22 HTTP/1.1\r\n\r\n", 403, b"is loopback"),
    (b"GET http://169.254.169.254/latest/ HTTP/1.1\r\n\r\n", 403, b"link-local"),
    (b"CONNECT 2130706433:80 HTTP/1.1\r\n\r\n", 403, b"127.0.0.1 is loopback"),  # a number that resolves
    (b"CONNECT [::ffff:10.1.2.3]:80 HTTP/1.1\r\n\r\n", 403, b"private"),
    (b"BREW coffee HTTP/1.1\r\n\r\n", 400, b"absolute http://"),
    (b"GET http://x/ HTTP/1.1\r\n" + b"X: " + b"a" * proxy.MAX_HEAD_BYTES + b"\r\n\r\n", 431, b"over"),
])
async def test_refusals_answer_an_http_error_naming_the_reason(proxy_port: int, request_bytes: bytes, status: int,
                                                               reason: bytes) -> None:
    answer = await _ask(proxy_port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert reason in answer.partition(b"\r\n\r\n")[2], answer
