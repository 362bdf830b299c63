"""Outbound HTTP for code in a sandgate WASM sandbox, which has no sockets.

    import sandgate
    r = sandgate.fetch("https://api.example.com/v1/items", headers={"Authorization": "Bearer " + key})
    r.status, r.headers["content-type"], r.body, r.text, r.json()

Each request goes through the host (the WASM launcher, then the gateway's egress proxy), under
the sandbox's network policy: a request the policy refuses raises `Refused` with the proxy's
reason, and a sandbox without a network refuses everything. Secrets' placeholders (the sandbox's
environment holds them) are filled in by the proxy for the hosts they are bound to, over
https:// only; the sandbox never sees the real values, and one the host echoes comes back as its
placeholder. `urllib.request.urlopen` works the same way (for http:// and https:// URLs): the
launcher installs `install()`'s handler when the agent starts.

TLS is the proxy's: an https:// URL is fetched over TLS the proxy verifies; there is no
certificate or client-side TLS setting here. Responses are capped in size by the gateway
(`fetch_max_response_mb`); request bodies by `wire.MAX_BODY`.

Kept light at import (the agent imports it at every start): the door and urllib are imported
when first used.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import wire

__all__ = ["FetchError", "FetchTimeout", "Headers", "Refused", "Response", "fetch", "install"]


class FetchError(OSError):
    """A fetch that failed: `kind` is one of `wire.KINDS`, `status` the proxy's for refusals."""

    def __init__(self, message: str, kind: str = "error", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = status


class Refused(FetchError):
    """The gateway's egress proxy refused the request: `status` (403 for the policy, 502 when a
    name does not resolve, ...) and `reason`, the proxy's own words."""

    def __init__(self, status: int | None, reason: str) -> None:
        super().__init__(f"sandgate egress refused the request ({status}): {reason}", "refused", status)
        self.reason = reason


class FetchTimeout(FetchError, TimeoutError):
    """A wait for the network took longer than the request's timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "timeout")


def _call(message: dict[str, Any]) -> dict[str, Any]:
    """One door call: the host's answer, or the exception its failure stands for."""
    try:
        import _host  # type: ignore[import-not-found]  # python.wasm's builtin door module
    except ImportError:
        raise FetchError("sandgate.fetch works in a sandgate WASM sandbox only (no host door here)") from None
    try:
        answer = _host.call(wire.encode(message))
    except ConnectionRefusedError:
        raise FetchError("no host answers the door: this WASM runtime offers no fetch") from None
    except OSError as exc:
        raise FetchError(f"the host could not answer: {exc}") from None
    reply = wire.decode(answer)
    if reply.get("ok") is True:
        return reply
    kind, text, status = reply.get("kind"), str(reply.get("message")), reply.get("status")
    if kind == "refused":
        raise Refused(status, text)
    if kind == "timeout":
        raise FetchTimeout(text)
    raise FetchError(text, str(kind), status)


class Headers:
    """A response's headers: case-insensitive, in the order received, repeats kept."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = [(str(name), str(value)) for name, value in pairs]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of `name`, or `default`."""
        wanted = name.lower()
        return next((value for key, value in self._pairs if key.lower() == wanted), default)

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self._pairs if key.lower() == wanted]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def keys(self) -> list[str]:
        return [key for key, _ in self._pairs]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._pairs)

    def __repr__(self) -> str:
        return f"Headers({self._pairs!r})"


class Response:
    """A response: `status`, `reason`, `headers`, `url`, and its body (`body`, `text`, `json()`,
    or `read(n)` piece by piece when fetched with `stream=True`). Usable as a context manager,
    which closes a body not read to its end."""

    def __init__(self, url: str, head: dict[str, Any]) -> None:
        self.url = url
        self.status: int = head["status"]
        self.reason: str = head["reason"]
        self.headers = Headers(tuple(pair) for pair in head["headers"])
        self._id: int | None = None if head["done"] else head["id"]
        self._buffer = bytearray()
        self._body: bytes | None = None

    @property
    def ok(self) -> bool:
        """The status is below 400."""
        return self.status < 400

    def _more(self, size: int) -> bytes:
        """Up to `size` more bytes from the host (b"" once the body ended)."""
        if self._id is None:
            return b""
        reply = _call({"op": "read", "id": self._id, "size": size})
        if reply["done"]:
            self._id = None
        return bytes(reply["data"])

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of the body (all that is left with -1); b"" at its end."""
        while (size < 0 or len(self._buffer) < size) and self._id is not None:
            try:
                self._buffer += self._more(wire.READ_CHUNK if size < 0 else size - len(self._buffer))
            except FetchError:
                self._id = None  # the host dropped the response
                raise
        if size < 0 or size >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
        return data

    def read1(self, size: int = -1) -> bytes:
        """What is buffered, else at most one answer of the host's (at least a byte, unless the
        body ended): for readers that want what has arrived."""
        if not self._buffer:
            self._buffer += self._more(wire.READ_CHUNK if size < 0 else min(size, wire.READ_CHUNK))
        return self.read(len(self._buffer) if size < 0 else min(size, len(self._buffer)))

    @property
    def body(self) -> bytes:
        """The whole body (read on first use)."""
        if self._body is None:
            self._body = self.read()
        return self._body

    @property
    def text(self) -> str:
        """The body decoded by the charset its Content-Type names (UTF-8 if none)."""
        return self.body.decode(self._charset(), "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.body)

    def _charset(self) -> str:
        for part in (self.headers.get("content-type") or "").split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                import codecs

                name = value.strip("\"' ")
                try:
                    return codecs.lookup(name).name
                except LookupError:
                    break
        return "utf-8"

    def close(self) -> None:
        """Drop the rest of the body (the host frees the response)."""
        if self._id is not None:
            response_id, self._id = self._id, None
            _call({"op": "close", "id": response_id})

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_id", None) is not None:
            try:
                self.close()
            except Exception:
                pass  # the host frees what a dead sandbox held anyway

    def __repr__(self) -> str:
        return f"<sandgate.Response {self.status} {self.reason} {self.url}>"


def fetch(url: str, method: str = "GET", headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
          body: bytes | str | None = None, timeout: float = wire.DEFAULT_TIMEOUT_S, *, json: Any = None,
          stream: bool = False) -> Response:
    """One HTTP request through the gateway's egress proxy, under the sandbox's network policy.

    Args:
        url: an absolute http:// or https:// URL (percent-encoded).
        headers: a mapping or (name, value) pairs; Content-Length is set from the body.
        body: bytes, or text sent as UTF-8; `json=` sends a value as JSON instead.
        timeout: seconds any one wait for the network may take (at most `wire.MAX_TIMEOUT_S`).
        stream: leave the body to be read with `Response.read` (and closed) instead of reading
            it now.

    Returns:
        The response, whatever its status (a 404 is a response, not an error).

    Raises:
        Refused: the egress proxy refused the request (the policy, a secret's placeholder
            headed for a host it is not bound to, a name that does not resolve); `.reason` says why.
        FetchTimeout: a wait took longer than `timeout`.
        FetchError: the request could not be made or its response was past the size cap.
        ValueError: a URL, header or body this function does not send (the message says which).
    """
    pairs = list(headers.items() if isinstance(headers, Mapping) else headers or ())
    if json is not None:
        if body is not None:
            raise ValueError("give body or json, not both")
        import json as json_module

        body = json_module.dumps(json).encode()
        if not any(str(name).lower() == "content-type" for name, _ in pairs):
            pairs.append(("Content-Type", "application/json"))
    if isinstance(body, str):
        body = body.encode()
    elif isinstance(body, bytearray | memoryview):
        body = bytes(body)
    request = wire.check_open({"method": method, "url": url, "headers": pairs, "body": body,
                               "timeout": timeout})
    response = Response(request.url, _call(request.to_wire()))
    if not stream:
        response.body  # noqa: B018 (read it now, as documented)
    return response


class _UrllibHook:
    """A meta path finder that makes urllib.request fetch through the door once it is imported
    (importing urllib.request takes ~0.1 s in the guest: never at the agent's start)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "urllib.request":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)  # type: ignore[assignment]  # a Loader in all but name
        return spec


class _PatchingLoader:
    """urllib.request's loader, patching the module once it ran. A wrapper: the loader itself is
    the stdlib zip's, shared by every module in it."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        from . import _urllib

        _urllib.patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source and the rest, for tracebacks
        if name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


_HOOK = _UrllibHook()


def install() -> None:
    """Make `urllib.request` (urlopen, build_opener, Request) fetch http:// and https:// URLs
    through the door: now if it is imported, else as it is. Idempotent."""
    module = sys.modules.get("urllib.request")
    if module is not None:
        from . import _urllib

        _urllib.patch(module)
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
