"""Typed exceptions for the protocol's error codes (docs/protocol.md §4).

There is one class per wire code, named after it (`not_found` → `NotFound`), so callers can write
`except errors.NotFound`. The classes carry only the code: whether it is retryable and its HTTP
status come from the one table, `guest_agent.wire.ERRORS`, and a test checks that every code in
that table has its class here. An error from a newer gateway with a code this client does not know
still arrives, as a plain `SandgateError` with that code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from guest_agent.wire import ERRORS

if TYPE_CHECKING:
    from gateway.client.models import ExecResult

_BY_CODE: dict[str, type[SandgateError]] = {}


class SandgateError(Exception):
    """An error the gateway (or this client, on its behalf) reported, with the protocol's code.

    Attributes:
        code: the stable wire code (`not_found`, `busy`, ...).
        message: what happened, for people.
        retryable: whether the same request may succeed later unchanged.
        http_status: the REST status for this code.
        retry_after: seconds to wait before retrying, where the gateway said (quotas).
        result: for an exec that started and then failed (timeout, guest died): what it printed.
    """

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None,
                 http_status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]  # an instance may carry a code newer than this client
        kind = ERRORS.get(self.code)
        self.message = message
        self.retryable = retryable if retryable is not None else (kind.retryable if kind else False)
        self.http_status = http_status if http_status is not None else (kind.http_status if kind else 500)
        self.retry_after = retry_after
        self.result: ExecResult | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__ and cls.code not in _BY_CODE:
            _BY_CODE[cls.code] = cls

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The error as the protocol writes it: `{"code", "message", "retryable"}`."""
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class BadRequest(SandgateError):
    code = "bad_request"


class BadFrame(SandgateError):
    code = "bad_frame"


class FrameTooLarge(SandgateError):
    code = "frame_too_large"


class UnknownOp(SandgateError):
    code = "unknown_op"


class Unsupported(SandgateError):
    code = "unsupported"


class Unauthorized(SandgateError):
    code = "unauthorized"


class ForbiddenOrigin(SandgateError):
    code = "forbidden_origin"


class Forbidden(SandgateError):
    code = "forbidden"


class NotFound(SandgateError):
    code = "not_found"


class PathEscape(SandgateError):
    code = "path_escape"


class Exists(SandgateError):
    code = "exists"


class NotADirectory(SandgateError):
    code = "not_a_directory"


class IsADirectory(SandgateError):
    code = "is_a_directory"


class Busy(SandgateError):
    code = "busy"


class QuotaExceeded(SandgateError):
    code = "quota_exceeded"


class DiskQuota(SandgateError):
    code = "disk_quota"


class Timeout(SandgateError):
    code = "timeout"


class GuestDied(SandgateError):
    code = "guest_died"


class GuestProtocol(SandgateError):
    code = "guest_protocol"


class IoError(SandgateError):
    code = "io_error"


class Unavailable(SandgateError):
    code = "unavailable"


class Internal(SandgateError):
    code = "internal"


class ConnectionLost(Unavailable):
    """The connection to the gateway failed or dropped, and this client could not (or must not)
    carry on by itself: the gateway is unreachable, reconnecting ran out of time, or a request that
    changes something was in flight (it may or may not have taken effect)."""


def error_class(code: str) -> type[SandgateError]:
    """The exception class for a wire code (`SandgateError` itself for a code this client lacks)."""
    return _BY_CODE.get(code, SandgateError)


def error_from_wire(error: Any, *, http_status: int | None = None, retry_after: float | None = None) -> SandgateError:
    """Rebuild the typed exception from the protocol's `{"code", "message", "retryable"}`.

    Args:
        error: the `error` map of a reply, an `end` event or a REST body.
        http_status: the REST status it came with, if any.
        retry_after: the `Retry-After` header, if any.

    Returns:
        The exception (not raised). Something that is not an error map becomes `GuestProtocol`.
    """
    if not isinstance(error, Mapping) or not isinstance(error.get("code"), str):
        return GuestProtocol(f"the gateway sent a malformed error: {error!r:.200}", http_status=http_status)
    code = error["code"]
    message = error.get("message")
    retryable = error.get("retryable")
    return error_class(code)(
        message if isinstance(message, str) else code,
        code=code,
        retryable=retryable if isinstance(retryable, bool) else None,
        http_status=http_status,
        retry_after=retry_after,
    )


def error_for_status(status: int, message: str) -> SandgateError:
    """An error for an HTTP status that came without a protocol body (a proxy's page, a refused
    WebSocket upgrade): the code whose table row has that status when exactly one does."""
    codes = [kind.code for kind in ERRORS.values() if kind.http_status == status]
    code = codes[0] if len(codes) == 1 else ("unavailable" if status >= 500 else "bad_request")
    return error_class(code)(message, code=code, http_status=status)
