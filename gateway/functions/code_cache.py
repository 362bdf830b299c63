"""The content-addressed code cache: every code body the gateway sees, per tenant (sans-I/O).

A body is keyed by the sha256 of its UTF-8 text, so `code_ref: "<sha256>"` can stand in for
`code` anywhere a request takes code (exec, invoke, test, executions, deployed functions): a
client sends a large script once and names it afterwards. Each tenant's entries are bounded in
bytes, least recently used out first; another tenant's hash is unknown here (its entries are
looked up in the caller's tenant only), so a hash proves nothing across tenants.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from guest_agent.wire import ProtocolError

#: A code_ref is a sha256 in lowercase hex.
REF_LENGTH = 64


def code_hash(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Entry:
    code: str
    language: str
    size: int
    created_at: float
    last_used: float
    hits: int = 0

    def describe(self, digest: str) -> dict[str, Any]:
        return {"hash": digest, "language": self.language, "bytes": self.size, "created_at": self.created_at,
                "last_used": self.last_used, "hits": self.hits}


class CodeCache:
    """Code bodies by tenant and sha256, at most `max_bytes` of code per tenant."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tenants: dict[str, OrderedDict[str, Entry]] = {}
        self._used: dict[str, int] = {}

    def remember(self, tenant: str, code: str, language: str) -> str:
        """Keep `code` (seen in a request) and return its hash; a body larger than the whole
        budget is not kept (it would evict everything), but its hash is still returned."""
        digest = code_hash(code)
        entries = self._tenants.setdefault(tenant, OrderedDict())
        now = time.time()
        entry = entries.get(digest)
        if entry is not None:
            entry.last_used = now
            entries.move_to_end(digest)
            return digest
        size = len(code.encode("utf-8", "surrogatepass"))
        if size > self.max_bytes:
            return digest
        entries[digest] = Entry(code, language, size, now, now)
        self._used[tenant] = self._used.get(tenant, 0) + size
        self._evict(tenant, entries)
        return digest

    def resolve(self, tenant: str, ref: str) -> Entry:
        """The entry `ref` names for `tenant`, counted as a hit.

        Raises:
            ProtocolError: `bad_request` for a malformed ref, `not_found` for one not cached."""
        if len(ref) != REF_LENGTH or any(c not in "0123456789abcdef" for c in ref):
            raise ProtocolError("bad_request", "code_ref must be the sha256 of the code, as 64 lowercase hex digits")
        entries = self._tenants.get(tenant)
        entry = entries.get(ref) if entries is not None else None
        if entry is None or entries is None:
            raise ProtocolError("not_found", f"no cached code {ref[:12]}...: send the code itself (it is cached "
                                             "again then)")
        entry.hits += 1
        entry.last_used = time.time()
        entries.move_to_end(ref)
        return entry

    def take_code(self, tenant: str, body: MutableMapping[str, Any], default_language: str = "python") -> None:
        """Resolve `code_ref` in a request body into `code` (and its language, when the body names
        none), or remember the body's `code`: called where a request that carries code enters."""
        if "code_ref" in body and body["code_ref"] is not None:
            if body.get("code") is not None:
                raise ProtocolError("bad_request", "give 'code' or 'code_ref', not both")
            ref = body.pop("code_ref")
            if not isinstance(ref, str):
                raise ProtocolError("bad_request", "code_ref must be a string")
            entry = self.resolve(tenant, ref)
            body["code"] = entry.code
            body.setdefault("language", entry.language)
        elif isinstance(body.get("code"), str):
            language = body.get("language")
            self.remember(tenant, body["code"], language if isinstance(language, str) else default_language)

    def entries(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's entries, most recently used first."""
        return [e.describe(h) for h, e in reversed(self._tenants.get(tenant, OrderedDict()).items())]

    def forget(self, tenant: str, ref: str | None = None) -> bool:
        """Drop one entry (or all of the tenant's); whether anything was dropped."""
        entries = self._tenants.get(tenant)
        if not entries:
            return False
        if ref is None:
            self._tenants.pop(tenant, None)
            self._used.pop(tenant, None)
            return True
        entry = entries.pop(ref, None)
        if entry is None:
            return False
        self._used[tenant] -= entry.size
        return True

    def used(self, tenant: str) -> int:
        return self._used.get(tenant, 0)

    def _evict(self, tenant: str, entries: OrderedDict[str, Entry]) -> None:
        while self._used[tenant] > self.max_bytes and entries:
            _, oldest = entries.popitem(last=False)
            self._used[tenant] -= oldest.size
