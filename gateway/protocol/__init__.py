"""The sans-I/O protocol core: no asyncio, aiohttp or sockets in this package.

The agent leg (frames, message shapes, the error table) lives in `guest_agent.wire` so the guest can
use it without the gateway; this package re-exports it and adds the client leg (`client`).
"""

from guest_agent.wire import (
    DEFAULT_MAX_FRAME,
    ERRORS,
    PROTOCOL_VERSION,
    ErrorKind,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    error_reply,
    event,
    field,
    message_kind,
    reply,
    request,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ERRORS",
    "PROTOCOL_VERSION",
    "ErrorKind",
    "FrameDecoder",
    "ProtocolError",
    "encode_frame",
    "error_reply",
    "event",
    "field",
    "message_kind",
    "reply",
    "request",
]
