"""urllib.request over the door: `patch(urllib.request)` replaces its HTTPHandler (every opener
`build_opener` makes, `urlopen`'s included, takes it from there) with one that opens http:// and
https:// URLs with `sandgate.fetch`, and defines the HTTPSHandler CPython-on-WASI lacks (it has no
ssl module; TLS is the egress proxy's).

Redirects, cookies, HTTPError for 4xx/5xx and the rest stay urllib's own. A refusal or a failed
request is a URLError whose `reason` is the `sandgate.FetchError` (`Refused`: the proxy's reason).
"""

from __future__ import annotations

import http.client
import io
import urllib.error
import urllib.response
from types import ModuleType
from typing import Any

from . import FetchError, Response, fetch, wire


class _Body(io.RawIOBase):
    """A streamed response's body as a raw stream (urllib wraps it in a BufferedReader)."""

    def __init__(self, response: Response) -> None:
        self._response = response

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._response.read1(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()


def _body(data: Any) -> bytes | None:
    """A Request's data as bytes: bytes-like, a file (read to wire.MAX_BODY) or an iterable of
    bytes-like pieces (urllib's own forms)."""
    if data is None:
        return None
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    if hasattr(data, "read"):
        return bytes(data.read(wire.MAX_BODY + 1))
    return b"".join(bytes(piece) for piece in data)


def open_request(request: Any) -> urllib.response.addinfourl:
    """What urllib's HTTP handlers return, for `request`, fetched through the door."""
    headers = dict(request.unredirected_hdrs)
    headers.update({k: v for k, v in request.headers.items() if k not in headers})
    headers.pop("Connection", None)  # the launcher frames each request itself
    timeout = request.timeout  # set by OpenerDirector.open
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
        timeout = wire.DEFAULT_TIMEOUT_S  # urllib's "no timeout" sentinel: the door's default
    try:
        response = fetch(request.full_url, request.get_method(), list(headers.items()), _body(request.data),
                         min(float(timeout), wire.MAX_TIMEOUT_S), stream=True)
    except (FetchError, ValueError) as exc:
        raise urllib.error.URLError(exc) from None
    message = http.client.HTTPMessage()
    for name, value in response.headers.items():
        message[name] = value
    result = urllib.response.addinfourl(io.BufferedReader(_Body(response)), message, request.full_url,
                                        response.status)
    result.msg = response.reason  # type: ignore[attr-defined]  # urllib's HTTPErrorProcessor reads it
    result.reason = response.reason  # type: ignore[attr-defined]
    return result


def _handlers(request_module: ModuleType) -> tuple[type, type]:
    """The HTTP and HTTPS handler classes, made from the module being patched: `patch` runs as
    urllib.request finishes importing, before `urllib.request` may be named as an attribute."""
    base = request_module.HTTPHandler

    class SandgateHandler(base):  # type: ignore[valid-type, misc]
        """Opens http:// and https:// URLs through the door."""

        sandgate = True

        def http_open(self, req: Any) -> Any:
            return open_request(req)

        def https_open(self, req: Any) -> Any:
            return open_request(req)

        https_request = request_module.AbstractHTTPHandler.do_request_

    class SandgateHTTPSHandler(SandgateHandler):
        """`urllib.request.HTTPSHandler`'s signature (code passes a context); TLS is the proxy's."""

        def __init__(self, debuglevel: int | None = None, context: Any = None,
                     check_hostname: bool | None = None) -> None:
            super().__init__(debuglevel)

    return SandgateHandler, SandgateHTTPSHandler


def patch(module: ModuleType) -> None:
    """Make `module` (urllib.request) open http:// and https:// URLs through the door. Idempotent."""
    if getattr(module.HTTPHandler, "sandgate", False):
        return
    module.HTTPHandler, module.HTTPSHandler = _handlers(module)  # type: ignore[attr-defined]
    module.install_opener(None)  # an opener made before the patch would bypass it
