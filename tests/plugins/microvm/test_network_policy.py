"""A microVM sandbox's network policy, DNS and secrets, from inside a real guest: the guest asks
the gateway's DNS server (over TCP through the restricted network), reaches the allowlisted name
and nothing else, sends its secret's placeholder over HTTPS that the gateway fills in for the
bound host only, and a PATCH changes what it reaches while it runs.

"The internet" is the test upstream (tests/net/upstream.py): servers on 203.0.113.x in a
network namespace, names from a DNS server of its own, which the gateway is configured to ask.
One sandbox answers many questions: a network VM boots cold.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config import Limits, NetworkAccess, Settings
from gateway.testing.conformance import AUTH, KEY, Gateway
from gateway.web.app import create_app
from tests.net.upstream import ADDRESS, API, OTHER, OTHER_ADDRESS, PORT, PRIVATE, TLS_PORT, Upstream

# The full template: its Python has ssl (the default template's has no OpenSSL, so no HTTPS).
pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_full_image")]

SECRET = "sk-real-value-never-in-the-guest"

#: Run in the guest: each probe's outcome, as JSON.
PROBE = r"""
import json, os, socket, ssl, sys, urllib.request, urllib.error

def resolve(name):
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)})
    except socket.gaierror as exc:
        return "gaierror %d" % exc.errno

def fetch(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as resp:
            return {"status": resp.status, "body": resp.read().decode()}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode()}
    except Exception as exc:
        return {"error": repr(exc)}

names, urls, secret_url = json.loads(sys.argv[1])
key = os.environ.get("API_KEY", "")
print(json.dumps({
    "resolved": {name: resolve(name) for name in names},
    "fetched": {url: fetch(url) for url in urls},
    "secret": fetch(secret_url, {"Authorization": "Bearer " + key}) if secret_url else None,
    "env_key": key,
    "bundle": os.environ.get("SSL_CERT_FILE"),
}))
"""


@pytest.fixture
async def gateway(aiohttp_client: Any, egress_upstream: Upstream) -> Gateway:
    assert egress_upstream.ca is not None
    settings = Settings(api_keys={KEY: "tenant-a"}, limits=Limits(exec_timeout_s=90.0), reap_interval_s=3600.0,
                        blocked_plugins=("wasm", "pod"), default_runtime="microvm",
                        network=NetworkAccess(nameservers=(egress_upstream.nameserver,),
                                              upstream_ca_file=str(egress_upstream.ca.ca_file)),
                        runtimes={"microvm": {"pool_size": 0}})
    client = await aiohttp_client(create_app(settings))
    return Gateway(client, "microvm", {})


async def _probe(gateway: Gateway, sid: str, names: list[str], urls: list[str], secret_url: str = "") -> Any:
    done = await gateway.exec(sid, command=["python3", "-c", PROBE, json.dumps([names, urls, secret_url])],
                              timeout=90)
    assert done["exit_code"] == 0, done["stderr"]
    return json.loads(done["stdout"])


async def test_a_guest_reaches_its_allowlist_with_its_secret_filled_in_and_a_patch_applies(
        gateway: Gateway, egress_upstream: Upstream) -> None:
    sandbox = await gateway.create(template="full", network={"allow": [API, f"{PRIVATE}"]},
                                   secrets=[{"env": "API_KEY", "value": SECRET, "hosts": [API]}])
    sid = sandbox["id"]
    assert sandbox["network"] == {"allow": [API, PRIVATE], "deny": []}
    assert sandbox["secrets"] == [{"env": "API_KEY", "hosts": [API]}]
    assert SECRET not in json.dumps(sandbox)
    unlisted, raw = f"http://{OTHER}:{PORT}/hello", f"http://{OTHER_ADDRESS}:{PORT}/hello"
    private = f"http://{PRIVATE}:{PORT}/hello"
    seen = await _probe(gateway, sid, [API, OTHER, PRIVATE],
                        [f"http://{API}:{PORT}/hello", unlisted, raw, private], f"https://{API}:{TLS_PORT}/echo")
    # DNS answered by the gateway: the allowed name resolves, the unlisted one does not exist,
    # the one that resolves to a private address is answered empty.
    assert seen["resolved"][API] == [ADDRESS]
    assert isinstance(seen["resolved"][OTHER], str) and isinstance(seen["resolved"][PRIVATE], str)
    fetched = seen["fetched"]
    assert fetched[f"http://{API}:{PORT}/hello"] == {"status": 200, "body": f"hello from {ADDRESS}\n"}
    for refused in (unlisted, raw, private):
        assert fetched[refused]["status"] == 403, fetched[refused]
    assert "not in the allow list" in fetched[unlisted]["body"] and "public addresses only" in fetched[private]["body"]
    # The secret: a placeholder in the guest, the value at the bound host, the placeholder again
    # in what the host echoed back; the guest trusts the sandbox's CA through SSL_CERT_FILE.
    placeholder = seen["env_key"]
    assert placeholder.startswith("sandgate-secret-") and seen["bundle"]
    assert seen["secret"]["status"] == 200, seen["secret"]
    echoed = json.loads(seen["secret"]["body"])
    assert echoed["headers"]["Authorization"] == f"Bearer {placeholder}"
    assert egress_upstream.received()[-1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    grep = await gateway.exec(sid, command=["sh", "-c", f"grep -rl {SECRET} /work /tmp /etc 2>/dev/null; env"])
    assert SECRET not in grep["stdout"]
    # Visible to the tenant: figures and each refusal with its reason.
    network = await (await gateway.client.get(f"/v1/sandboxes/{sid}/network", headers=AUTH)).json()
    assert network["metrics"]["refusals"] >= 4 and network["metrics"]["bytes_in"] > 0
    assert any(OTHER in r["target"] for r in network["recent_refusals"])
    metrics = await (await gateway.client.get(f"/v1/sandboxes/{sid}/metrics", headers=AUTH)).json()
    assert metrics["network"]["connections"] >= 2
    # A PATCH opens the other name to the running sandbox.
    patched = await gateway.client.patch(f"/v1/sandboxes/{sid}", json={"network": {"allow": [API, OTHER]}},
                                         headers=AUTH)
    assert patched.status == 200 and (await patched.json())["network"]["allow"] == [API, OTHER]
    seen = await _probe(gateway, sid, [OTHER], [unlisted])
    assert seen["resolved"][OTHER] == [OTHER_ADDRESS]
    assert seen["fetched"][unlisted] == {"status": 200, "body": f"hello from {OTHER_ADDRESS}\n"}


async def test_policy_requests_are_checked(gateway: Gateway) -> None:
    for body, status, code in (({"network": "all"}, 403, "forbidden"),
                               ({"network": {"allow": ["bad name"]}}, 400, "bad_request"),
                               ({"secrets": [{"env": "K", "value": "v", "hosts": [API]}]}, 400, "bad_request"),
                               ({"network": {"allow": [API]},
                                 "secrets": [{"env": "K", "value": "v", "hosts": [OTHER]}]}, 400, "bad_request")):
        resp = await gateway.client.post("/v1/sandboxes", json=body, headers=AUTH)
        assert resp.status == status, body
        assert (await resp.json())["error"]["code"] == code
    # A sandbox made without a network keeps none: no device to open later.
    sandbox = await gateway.create()
    resp = await gateway.client.patch(f"/v1/sandboxes/{sandbox['id']}", json={"network": "public"}, headers=AUTH)
    assert resp.status == 501 and "created without a network" in (await resp.json())["error"]["message"]
    resp = await gateway.client.patch(f"/v1/sandboxes/{sandbox['id']}", json={"ttl": 5}, headers=AUTH)
    assert resp.status == 400
