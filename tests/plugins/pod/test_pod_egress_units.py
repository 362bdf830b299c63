"""The pure parts of a pod sandbox's way out (plugins/pod/egress.py), without a cluster: the proxy
credentials as real clients send them, the listener's decision, what a pod keeps for an adopting
replica, and the egress settings. The path itself, through a real pod: test_pod_network.py."""

from __future__ import annotations

import base64
import urllib.request
from dataclasses import dataclass

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.egress.network import Egress, SandboxNetwork
from gateway.egress.policy import NetworkPolicy
from gateway.egress.secrets import Secrets
from gateway.egress.upstream import Refused
from plugins.pod import egress
from plugins.pod.settings import PodSettings

# What a sandbox id and a token can hold (ids are `sb_` + URL-safe base64; tokens hex), and more.
URL_TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters=":"), min_size=1,
                   max_size=40)


def urllib_header(url: str) -> tuple[bytes, bytes]:
    """The Proxy-Authorization urllib (and requests, pip: the same parsing) sends for a proxy URL."""
    _, user, password, _ = urllib.request._parse_proxy(url)  # type: ignore[attr-defined]
    assert user is not None and password is not None
    user, password = urllib.request.unquote(user), urllib.request.unquote(password)
    return b"proxy-authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@given(URL_TEXT, URL_TEXT)
def test_the_credentials_in_a_proxy_url_come_back_from_what_clients_send(sandbox_id: str, token: str) -> None:
    url = egress.proxy_url("10.1.2.3", 3128, sandbox_id, token)
    assert url.endswith("@10.1.2.3:3128")
    assert egress.credentials([(b"host", b"x"), urllib_header(url)]) == (sandbox_id, token)


def test_an_ipv6_proxy_is_bracketed() -> None:
    assert egress.proxy_url("fd00::5", 3128, "sb_x", "t") == "http://sb_x:t@[fd00::5]:3128"


@pytest.mark.parametrize("headers", [
    [],
    [(b"proxy-authorization", b"Bearer abc")],
    [(b"proxy-authorization", b"Basic !!!")],
    [(b"proxy-authorization", b"Basic " + base64.b64encode(b"no-colon"))],
    [(b"proxy-authorization", b"Basic " + base64.b64encode(b"\xff\xfe:x"))],
    [(b"proxy-authorization", b"Basic " + base64.b64encode(b"a:b"))] * 2,
])
def test_bad_credentials_are_407(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Refused) as refused:
        egress.credentials(headers)
    assert refused.value.status == 407


def test_the_proxy_env_names_the_proxy_for_every_client() -> None:
    env = egress.proxy_env("http://sb_x:t@10.1.2.3:3128")
    assert {env[name] for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")} == \
        {"http://sb_x:t@10.1.2.3:3128"}
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1"


@dataclass
class Held:
    proxy_token: str
    network: SandboxNetwork | None


def request_with(user: str, password: str) -> h11.Request:
    auth = b"Basic " + base64.b64encode(f"{user}:{password}".encode())
    return h11.Request(method="CONNECT", target="api.example.com:443",
                       headers=[("host", "api.example.com:443"), ("proxy-authorization", auth)])


def test_the_listener_opens_a_sandbox_to_its_own_token_only() -> None:
    listener = egress.ProxyListener("127.0.0.1", 0)
    network = Egress().attach("sb_a", "tenant-a", NetworkPolicy.parse("public"), Secrets())
    held = Held(egress.new_token(), network)
    listener.hold("sb_a", held)
    assert listener.find(request_with("sb_a", held.proxy_token)) is network
    for user, password in (("sb_a", held.proxy_token[:-1]), ("sb_a", ""), ("sb_b", held.proxy_token)):
        with pytest.raises(Refused) as refused:
            listener.find(request_with(user, password))
        assert refused.value.status == 407 and refused.value.reason == egress.NOT_HERE, "one answer for both"
    listener.release("sb_a", Held(held.proxy_token, network))  # another holder's release changes nothing
    assert listener.find(request_with("sb_a", held.proxy_token)) is network
    listener.release("sb_a", held)
    with pytest.raises(Refused):
        listener.find(request_with("sb_a", held.proxy_token))


def test_secrets_survive_the_document_placeholders_included() -> None:
    secrets = Secrets.parse([
        {"env": "API_KEY", "value": "s3cret \u00e9", "hosts": ["api.example.com", "*.example.org"]},
        {"env": "OTHER", "value": "x", "hosts": ["other.example.com"]}])
    document = egress.secrets_document(secrets)
    assert egress.parse_secrets(egress.document_of({"data": egress.secret_data(document)})) == secrets
    for broken in (b"{}", b"[1]", b'[{"env": "A"}]',
                   b'[{"env": "A", "value": "v", "hosts": ["a.example"], "placeholder": "sandgate-secret-short"}]',
                   b'[{"env": "A", "value": "v", "hosts": ["10.0.0.0/8:99999"], "placeholder": "x"}]'):
        with pytest.raises((ValueError, KeyError, TypeError)):
            egress.parse_secrets(broken)
    with pytest.raises(ValueError):
        egress.document_of({"data": {}})


def test_a_policy_survives_its_annotation() -> None:
    for wire in ("public", "all", "none", {"allow": ["api.example.com", "203.0.113.0/24", "*.example.org:443"],
                                           "deny": ["bad.example.org"]}):
        policy = NetworkPolicy.parse(wire)
        assert egress.parse_policy(egress.policy_annotation(policy)) == policy
    for broken in ("{", '"sometimes"', '{"allow": "x"}'):
        with pytest.raises(ValueError):
            egress.parse_policy(broken)


@pytest.mark.parametrize(("config", "message"), [
    ({"egress_listen": "localhost:3128"}, "an IP address and a port"),
    ({"egress_listen": "0.0.0.0"}, "must be host:port"),
    ({"egress_listen": "0.0.0.0:70000"}, "the port must be 0 to 65535"),
    ({"egress_listen": "0.0.0.0:3128"}, "set egress_proxy to the address sandbox pods reach"),
    ({"egress_listen": "0.0.0.0:3128", "egress_proxy": "gateway.sandgate.svc:3128"}, "an IP address"),
    ({"egress_listen": "0.0.0.0:3128", "egress_proxy": "::"}, "cannot reach a wildcard address"),
    ({"egress_proxy": "10.0.0.5"}, "needs egress_listen"),
    ({"egress_listen": "10.0.0.5:3128", "egress_gateway_labels": {}}, "the gateway pods' labels"),
    ({"egress_listen": "10.0.0.5:3128", "egress_gateway_labels": {"app": "not a label!"}}, "is not a label"),
])
def test_egress_settings_are_checked(config: dict[str, object], message: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_IP", raising=False)
    with pytest.raises(ValueError, match=message):
        PodSettings.from_config({"namespace": "ns", **config})


def test_pods_reach_the_listener_at_the_pod_ip_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_IP", "10.244.1.7")
    settings = PodSettings.from_config({"namespace": "ns", "egress_listen": "0.0.0.0:3128"})
    assert settings.egress and settings.listen_address() == ("0.0.0.0", 3128)
    assert settings.proxy_address(3128) == ("10.244.1.7", 3128)
    loopback = PodSettings.from_config({"namespace": "ns", "egress_listen": "127.0.0.1:0"})
    assert loopback.proxy_address(40123) == ("127.0.0.1", 40123), "port 0: the port bound"
    explicit = PodSettings.from_config({"namespace": "ns", "egress_listen": "[::]:3128",
                                        "egress_proxy": "[fd00::9]:13128"})
    assert explicit.proxy_address(3128) == ("fd00::9", 13128)
    assert not PodSettings.from_config({"namespace": "ns"}).egress, "off unless configured"
