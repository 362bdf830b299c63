"""A pod sandbox's way out: the gateway's policy proxy (gateway/egress/proxy.py), over the pod network.

- Every sandbox pod is isolated both ways (`manifests.deny_policy`). One whose policy is not "none"
  carries `sandgate.dev/network: "true"`, which the namespace's `manifests.egress_policy` admits to
  the gateway pods' egress port and to nothing else: no DNS either, the proxy resolves names.
- Each gateway replica listens on `egress_listen` (`ProxyListener`). A pod's processes find it in
  HTTP_PROXY/HTTPS_PROXY (and the lower-case twins), which the gateway's `guest.env` gives the agent
  when it hands the sandbox out, as `http://<sandbox id>:<token>@<this replica's address>`. The
  credentials say whose connection it is: only the sandbox's own token opens its policy and
  secrets, compared in constant time; anything else answers 407.
- The address is the replica's own (its pod IP), not a Service spreading connections over the
  replicas: the replica holding a sandbox has its live policy, secrets, CA and counters, which
  no other replica has. A replica that adopts the sandbox (`PodRuntime.load_state`) mints a new
  token and sends its own address with `guest.env` again; a connection for a sandbox this replica
  does not hold answers 407 saying so (the adopting replica's address and token reach every
  process started after the adoption: with the `exec` channel, every process, since the old agent
  ends with its stream and takes its processes with it).
- What adoption needs outlives the replica: the policy in the pod's `sandgate.dev/network-policy`
  annotation (rewritten on a policy change: `PodBackend.network_changed`), the secrets (values,
  hosts and placeholders, so the guest's placeholders stay valid) in a Kubernetes Secret owned by
  the pod (`secrets_document`), never in an annotation or a label.

Sans-I/O but `ProxyListener`, which only accepts connections and hands them to the proxy.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets as random
from collections.abc import Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import quote

import h11

from gateway.egress import proxy
from gateway.egress.handoff import MAX_CONNECTIONS
from gateway.egress.network import SandboxNetwork
from gateway.egress.policy import NetworkPolicy, Rule
from gateway.egress.secrets import PLACEHOLDER_BYTES, PLACEHOLDER_PREFIX, Secret, Secrets
from gateway.egress.streams import READ_CHUNK
from gateway.egress.upstream import Refused
from guest_agent.wire import ProtocolError

log = logging.getLogger(__name__)

#: Where a process need not go through the proxy: the sandbox itself.
NO_PROXY = "localhost,127.0.0.1"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
#: The key of the Secret's one document.
SECRETS_KEY = "secrets.json"
#: What a 407 says about the credentials it did not accept (one answer for a wrong token and for a
#: sandbox this replica does not hold, so neither tells whether a sandbox exists here).
NOT_HERE = ("no sandbox on this gateway has these proxy credentials: a wrong token, or the sandbox moved to another "
            "gateway replica (processes started since then have its address in HTTPS_PROXY)")
_TOKEN_BYTES = 24
#: Connections one sandbox may hold open through the proxy at once (a microVM's cap, handoff.py).
MAX_PER_SANDBOX = MAX_CONNECTIONS
#: Connections the listener holds at once, sandboxes' and those still to say whose they are (each
#: may wait proxy.HEAD_TIMEOUT_S for its request): past it a new one is closed at once.
MAX_OPEN = 4096


def new_token() -> str:
    """A sandbox's proxy password: random, never stored outside the replica holding the sandbox."""
    return random.token_hex(_TOKEN_BYTES)


def proxy_url(host: str, port: int, sandbox_id: str, token: str) -> str:
    """The proxy URL a sandbox's processes get: its credentials at this replica's listener."""
    shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    return f"http://{quote(sandbox_id, safe='')}:{quote(token, safe='')}@{shown}:{port}"


def proxy_env(url: str) -> dict[str, str]:
    """The variables curl, pip, npm, git, requests and urllib read their proxy from."""
    return {**dict.fromkeys(PROXY_VARIABLES, url), "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY}


def credentials(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str]:
    """The (user, password) of a request's `Proxy-Authorization: Basic ...`.

    Raises:
        Refused: 407, when there is none, more than one, or it is not Basic with user:password.
    """
    values = [value for name, value in headers if name.lower() == b"proxy-authorization"]
    if not values:
        raise Refused(407, "proxy credentials required: use the proxy URL in this sandbox's HTTPS_PROXY, "
                           "credentials included")
    if len(values) > 1:
        raise Refused(407, "more than one Proxy-Authorization header")
    scheme, _, encoded = values[0].strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise Refused(407, "proxy credentials must be Basic (user: the sandbox id, password: its token)")
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Refused(407, "the Proxy-Authorization header is not base64 of user:password") from None
    if not sep:
        raise Refused(407, "the Proxy-Authorization header is not base64 of user:password")
    return user, password


class Holder(Protocol):
    """What the listener needs of a sandbox it serves (a PodBackend)."""

    proxy_token: str

    @property
    def network(self) -> SandboxNetwork | None: ...


class ProxyListener:
    """This replica's egress port: the policy proxy for the sandbox pods it holds."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._held: dict[str, Holder] = {}
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        #: Open connections by sandbox id, once `find` said whose they are.
        self._open: dict[str, int] = {}
        #: Connections closed at once for being over MAX_OPEN.
        self.overflowed = 0
        #: Compared against when no sandbox is held under the id, so that costs the same time.
        self._decoy = new_token()

    async def start(self) -> int:
        """Listen; returns the port (the one bound, when asked for 0)."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=READ_CHUNK)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and end the connections still open (their sandboxes are gone by now)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._clients):
            writer.transport.abort()

    def hold(self, sandbox_id: str, holder: Holder) -> None:
        """Serve `sandbox_id`'s connections from now on, with `holder`'s token and network."""
        self._held[sandbox_id] = holder

    def release(self, sandbox_id: str, holder: Holder) -> None:
        if self._held.get(sandbox_id) is holder:
            del self._held[sandbox_id]

    def find(self, request: h11.Request) -> SandboxNetwork:
        """Whose connection this is, by its proxy credentials (`proxy.Find`).

        Raises:
            Refused: 407 for missing or wrong credentials, or a sandbox this replica does not hold.
        """
        sandbox_id, token = credentials(request.headers)
        holder = self._held.get(sandbox_id)
        expected = holder.proxy_token if holder is not None else self._decoy
        matches = hmac.compare_digest(token.encode(), expected.encode())
        network = holder.network if holder is not None else None
        if not matches or network is None:
            raise Refused(407, NOT_HERE)
        return network

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_OPEN:
            self.overflowed += 1
            writer.transport.abort()
            return
        self._clients.add(writer)
        counted: list[str] = []

        def find(request: h11.Request) -> SandboxNetwork:
            network = self.find(request)
            if self._open.get(network.sandbox_id, 0) >= MAX_PER_SANDBOX:
                raise Refused(429, f"this sandbox has {MAX_PER_SANDBOX} connections open through the proxy already")
            self._open[network.sandbox_id] = self._open.get(network.sandbox_id, 0) + 1
            counted.append(network.sandbox_id)
            return network

        try:
            await proxy.handle(reader, writer, find)
        except (ConnectionError, OSError):
            pass  # the sandbox or the upstream went away mid-way: the connection is closed either way
        except Exception:  # one connection's failure must not be the listener's
            log.exception("pod egress: a proxy connection failed")
        finally:
            self._clients.discard(writer)
            for sandbox_id in counted:
                self._open[sandbox_id] -= 1
                if not self._open[sandbox_id]:
                    del self._open[sandbox_id]


# -- what outlives the replica --------------------------------------------------------------------


def policy_annotation(policy: NetworkPolicy) -> str:
    return json.dumps(policy.to_wire(), sort_keys=True)


def parse_policy(text: str) -> NetworkPolicy:
    """The policy a pod's annotation holds.

    Raises:
        ValueError: not JSON, or not a policy.
    """
    try:
        return NetworkPolicy.parse(json.loads(text))
    except ProtocolError as exc:
        raise ValueError(exc.message) from None


def secrets_document(secrets: Secrets) -> bytes:
    """The secrets as the pod's Secret keeps them: values, hosts and placeholders (the guest holds
    the placeholders already; a replica adopting the sandbox must fill in the same ones)."""
    return json.dumps([{"env": s.env, "value": s.value.decode(), "hosts": [r.text for r in s.hosts],
                        "placeholder": s.placeholder.decode()} for s in secrets.items]).encode()


def parse_secrets(document: bytes) -> Secrets:
    """The secrets of a pod's Secret (`secrets_document`).

    Raises:
        ValueError, KeyError, TypeError: anything but what `secrets_document` writes.
    """
    entries = json.loads(document)
    if not isinstance(entries, list):
        raise ValueError("the secrets document is not a list")
    items = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise ValueError("a secret is not an object")
        placeholder = str(entry["placeholder"]).encode()
        if not placeholder.startswith(PLACEHOLDER_PREFIX) or len(placeholder) != PLACEHOLDER_BYTES:
            raise ValueError("a secret's placeholder is malformed")
        try:
            hosts = tuple(Rule.parse(host) for host in entry["hosts"])
        except ProtocolError as exc:
            raise ValueError(exc.message) from None
        items.append(Secret(str(entry["env"]), str(entry["value"]).encode(), hosts, placeholder))
    return Secrets(tuple(items))


def secret_data(document: bytes) -> dict[str, str]:
    """A Secret's `data` for `document`."""
    return {SECRETS_KEY: base64.b64encode(document).decode()}


def document_of(secret: Mapping[str, Any]) -> bytes:
    """The document a Secret read from the API holds.

    Raises:
        ValueError: it holds none.
    """
    with contextlib.suppress(KeyError, TypeError, binascii.Error):
        return base64.b64decode(secret["data"][SECRETS_KEY], validate=True)
    raise ValueError("the Secret holds no secrets document")
