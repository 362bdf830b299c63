"""Secrets that never enter a sandbox: the guest holds a placeholder, the policy proxy puts the
real value in its place only in requests to the hosts the secret is bound to.

`"secrets": [{"env": "OPENAI_API_KEY", "value": "...", "hosts": ["api.openai.com"]}]` at create:
the sandbox's environment gets `OPENAI_API_KEY=sandgate-secret-<random>`; a request the proxy
sees in plain text (an intercepted HTTPS request to a bound host, or a proxy request naming an
https:// URL) has each bound placeholder replaced, in its headers and in a body it can rewrite.
A placeholder headed anywhere else, a plain-HTTP request or another secret's host, is refused:
the guest learns nothing, the host learns nothing.

Sans-I/O: parsing, the placeholders, substitution and the leak check, over bytes.
"""

from __future__ import annotations

import re
import secrets as random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.egress.policy import Rule, normal_name
from guest_agent.wire import ProtocolError

MAX_SECRETS = 32
MAX_VALUE_BYTES = 16 << 10
MAX_HOSTS = 16
PLACEHOLDER_PREFIX = b"sandgate-secret-"
#: Every placeholder is the prefix and this many random hex digits: long enough to be unguessable
#: and never to occur by accident, of one length so a stream's scan knows how much to hold back.
PLACEHOLDER_HEX = 32
PLACEHOLDER_BYTES = len(PLACEHOLDER_PREFIX) + PLACEHOLDER_HEX
_PLACEHOLDER = re.compile(re.escape(PLACEHOLDER_PREFIX) + b"[0-9a-f]{%d}" % PLACEHOLDER_HEX)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


@dataclass(frozen=True)
class Secret:
    env: str
    value: bytes = field(repr=False)
    hosts: tuple[Rule, ...]
    placeholder: bytes

    def bound_to(self, host: str) -> bool:
        return any(rule.matches_name(host, None) for rule in self.hosts)

    def describe(self) -> dict[str, Any]:
        """What list/describe answers show: never the value."""
        return {"env": self.env, "hosts": [rule.text for rule in self.hosts]}


class Leak(Exception):
    """A placeholder headed where its secret may not go."""

    def __init__(self, secret: Secret, host: str) -> None:
        super().__init__(f"the request carries the placeholder of secret {secret.env!r}, which is bound to "
                         f"{', '.join(r.text for r in secret.hosts)}, not to {host}")
        self.secret = secret


@dataclass(frozen=True)
class Secrets:
    items: tuple[Secret, ...] = ()

    @classmethod
    def parse(cls, value: Any) -> Secrets:
        """The secrets of a create request's `"secrets"`, each given a fresh placeholder.

        Raises:
            ProtocolError: `bad_request`, naming the entry and what is wrong (never its value).
        """
        if value is None:
            return cls()
        if not isinstance(value, list) or len(value) > MAX_SECRETS:
            raise ProtocolError("bad_request", f"secrets must be a list of at most {MAX_SECRETS} objects")
        items: list[Secret] = []
        for i, entry in enumerate(value):
            where = f"secrets[{i}]"
            if not isinstance(entry, Mapping) or set(entry) - {"env", "value", "hosts"}:
                raise ProtocolError("bad_request", f"{where} must be an object with env, value and hosts")
            env, secret, hosts = entry.get("env"), entry.get("value"), entry.get("hosts")
            if not isinstance(env, str) or not _ENV_NAME.fullmatch(env):
                raise ProtocolError("bad_request", f"{where}.env must be an environment variable name")
            if any(item.env == env for item in items):
                raise ProtocolError("bad_request", f"{where}.env: {env!r} is given twice")
            if not isinstance(secret, str) or not 0 < len(secret.encode()) <= MAX_VALUE_BYTES:
                raise ProtocolError("bad_request", f"{where}.value must be a non-empty string of at most "
                                                   f"{MAX_VALUE_BYTES} bytes")
            if not isinstance(hosts, list) or not 0 < len(hosts) <= MAX_HOSTS:
                raise ProtocolError("bad_request", f"{where}.hosts must list 1 to {MAX_HOSTS} host names")
            rules = []
            for host in hosts:
                rule = Rule.parse(host)
                if rule.network is not None or rule.port is not None:
                    raise ProtocolError("bad_request", f"{where}.hosts: {host!r} must be a host name or *.domain "
                                                       "(secrets go to names checked against TLS certificates)")
                rules.append(rule)
            placeholder = PLACEHOLDER_PREFIX + random.token_hex(PLACEHOLDER_HEX // 2).encode()
            items.append(Secret(env, secret.encode(), tuple(rules), placeholder))
        return cls(tuple(items))

    def __bool__(self) -> bool:
        return bool(self.items)

    def env(self) -> dict[str, str]:
        """The sandbox's environment: each secret's name and its placeholder."""
        return {item.env: item.placeholder.decode() for item in self.items}

    def describe(self) -> list[dict[str, Any]]:
        return [item.describe() for item in self.items]

    def intercepts(self, host: str) -> bool:
        """Whether TLS to `host` is intercepted: some secret is bound to it."""
        return any(item.bound_to(normal_name(host)) for item in self.items)

    def fill(self, data: bytes, host: str | None) -> bytes:
        """`data` with the placeholders of the secrets bound to `host` replaced by their values.

        Args:
            host: where `data` goes, or None for plain HTTP (no secret may go there).

        Raises:
            Leak: `data` holds a placeholder whose secret is not bound to `host` (or any, for None).
        """
        if PLACEHOLDER_PREFIX not in data:
            return data
        by_placeholder = {item.placeholder: item for item in self.items}
        name = normal_name(host) if host is not None else None

        def replace(match: re.Match[bytes]) -> bytes:
            item = by_placeholder.get(match.group())
            if item is None:
                return match.group()  # not one of this sandbox's: nothing to fill or guard
            if name is None or not item.bound_to(name):
                raise Leak(item, name or "a plain-HTTP destination (secrets go over HTTPS only)")
            return item.value

        return _PLACEHOLDER.sub(replace, data)


class _Pieces:
    """`substitute` over data that arrives in pieces: a match of `pattern` split between two
    pieces is still found, at the cost of holding back `keep` bytes (the longest match's length
    minus one) until the next piece or `end`."""

    def __init__(self, pattern: re.Pattern[bytes], keep: int, substitute: Callable[[bytes], bytes]) -> None:
        self._pattern = pattern
        self._keep = keep
        self._substitute = substitute
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        cut = max(0, len(data) - self._keep)
        # A match may start before the cut and end after it: cut before it.
        for match in self._pattern.finditer(data):
            if match.start() < cut < match.end():
                cut = match.start()
        self._held = data[cut:]
        return self._substitute(data[:cut])

    def end(self) -> bytes:
        held, self._held = self._held, b""
        return self._substitute(held)


class StreamFiller(_Pieces):
    """`Secrets.fill` over a body that arrives in pieces (raises `Leak` as it does)."""

    def __init__(self, secrets: Secrets, host: str | None) -> None:
        super().__init__(_PLACEHOLDER, PLACEHOLDER_BYTES - 1, lambda data: secrets.fill(data, host))


class Redactor:
    """The other way, for what comes back from a bound host: each secret's value, should the host
    echo it (an error message, a debug endpoint), goes back to being its placeholder, so the
    guest never sees a value. `feed`/`end` work on pieces as `StreamFiller` does."""

    def __init__(self, secrets: Secrets) -> None:
        self._swap = {item.value: item.placeholder for item in secrets.items}
        self._pattern = re.compile(b"|".join(re.escape(v) for v in sorted(self._swap, key=len, reverse=True))) \
            if self._swap else None
        keep = max((len(v) for v in self._swap), default=1) - 1
        self._pieces = _Pieces(self._pattern, keep, self.redact) if self._pattern is not None else None

    def redact(self, data: bytes) -> bytes:
        """Everything at once (a header value)."""
        if self._pattern is None:
            return data
        return self._pattern.sub(lambda m: self._swap[m.group()], data)

    def feed(self, data: bytes) -> bytes:
        return data if self._pieces is None else self._pieces.feed(data)

    def end(self) -> bytes:
        return b"" if self._pieces is None else self._pieces.end()
