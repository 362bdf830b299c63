"""One WebSocket through a published port: the client's WebSocket ends in aiohttp, and the gateway
speaks to the guest's server as a WebSocket client with websockets' sans-I/O `ClientProtocol` over
a `GuestConnection`. Messages go both ways whole (text stays text, binary stays binary), and a
close's code and reason reach the other side.

The guest's handshake answer comes first: a server that refuses the upgrade (404, 403, ...) has its
answer passed to the client as a plain HTTP response, and only a 101 makes the gateway accept the
client's WebSocket, with the subprotocol the guest chose among those the client offered. Messages
are bounded by `max_websocket_message_bytes` on both sides (1009 past it). Each direction waits
for the other side to take what it sent: a slow client holds the guest back (the connection's
credit), a guest that does not read holds the client back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from aiohttp import WSMsgType, web
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.exceptions import ProtocolError as WsProtocolError
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from gateway.config import Ports
from gateway.ports import headers as hdr
from gateway.ports.tunnel import GuestConnection
from gateway.protocol.client import BEARER_PREFIX
from guest_agent.wire import ProtocolError

log = logging.getLogger(__name__)

#: Seconds the other side has to answer a close before the connection is cut.
CLOSE_TIMEOUT_S = 10.0
#: Close codes that may be sent in a close frame (RFC 6455 §7.4; 1005 and 1006 never are).
_SENDABLE = frozenset({*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)})


def is_upgrade(request: web.Request) -> bool:
    """Whether `request` asks for a WebSocket."""
    return (request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


def offered_subprotocols(request: web.Request) -> list[str]:
    """The subprotocols the client offers, without one carrying a sandgate API key."""
    return [name.strip() for value in request.headers.getall("Sec-WebSocket-Protocol", ())
            for name in value.split(",") if name.strip() and not name.strip().startswith(BEARER_PREFIX)]


async def proxy_websocket(request: web.Request, conn: GuestConnection, *, target: str,
                          headers: list[tuple[str, str]], port: int, limits: Ports) -> web.StreamResponse:
    """Shake hands with the guest's server for `target` (path and query), then relay (module doc).

    Raises:
        ProtocolError: `guest_protocol` for a handshake answer that is not HTTP, `timeout`.
    """
    protocol = ClientProtocol(parse_uri(f"ws://localhost:{port}{target}"),
                              subprotocols=[Subprotocol(s) for s in offered_subprotocols(request)] or None,
                              max_size=limits.max_websocket_message_bytes)
    handshake = protocol.connect()
    for name, value in headers:
        handshake.headers[name] = value
    protocol.send_request(handshake)
    await _flush(protocol, conn)
    response, early = await _handshake(protocol, conn, limits.connect_timeout_s + limits.idle_timeout_s)
    if response.status_code != 101 or protocol.state is not State.OPEN:
        # The guest refused (or answered badly): the client gets its answer as it was.
        raw = [(name, value) for name, value in response.headers.raw_items()]
        return web.Response(status=response.status_code, reason=response.reason_phrase or None,
                            body=bytes(response.body),
                            headers=_plain_headers(hdr.to_client(raw, port=port, prefix="")))
    ws = web.WebSocketResponse(protocols=[protocol.subprotocol] if protocol.subprotocol else (), autoclose=False,
                               max_msg_size=limits.max_websocket_message_bytes)
    await ws.prepare(request)
    relay = _Relay(ws, protocol, conn, limits.max_websocket_message_bytes)
    await relay.run(early)
    return ws


def _plain_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(n, v) for n, v in headers if n.lower() not in ("content-type", "content-encoding")] + [
        (n, v) for n, v in headers if n.lower() == "content-type"]


async def _flush(protocol: ClientProtocol, conn: GuestConnection) -> None:
    for data in protocol.data_to_send():
        if data:
            await conn.write(data)
        else:  # websockets' way of saying: half-close the connection now
            await conn.write_eof()


async def _handshake(protocol: ClientProtocol, conn: GuestConnection, timeout: float) -> tuple[Response, list[Frame]]:
    """The guest's handshake answer, and the frames that came right behind it."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                data = await conn.read(timeout=None)
                if data:
                    protocol.receive_data(data)
                else:
                    protocol.receive_eof()
                events = protocol.events_received()
                if events:
                    response = events[0]
                    assert isinstance(response, Response)
                    return response, [e for e in events[1:] if isinstance(e, Frame)]
                if protocol.handshake_exc is not None or not data:
                    raise ProtocolError("guest_protocol", f"the server in the sandbox answered the WebSocket handshake "
                                                          f"badly: {protocol.handshake_exc}")
    except TimeoutError:
        raise ProtocolError("timeout", "the server in the sandbox did not answer the WebSocket handshake") from None


class _Relay:
    """Moves messages both ways until a close (module doc)."""

    def __init__(self, ws: web.WebSocketResponse, protocol: ClientProtocol, conn: GuestConnection,
                 max_message: int) -> None:
        self.ws = ws
        self.protocol = protocol
        self.conn = conn
        self.max_message = max_message
        #: Set once the client sent its close (the guest then has CLOSE_TIMEOUT_S to answer).
        self.client_closed: tuple[int, str] | None = None
        self._fragments: list[bytes] = []
        self._fragment_opcode: Opcode | None = None
        self._fragment_bytes = 0

    async def run(self, early: list[Frame]) -> None:
        to_guest = asyncio.create_task(self._client_to_guest(), name="port-ws-to-guest")
        try:
            if not await self._frames(early):
                await self._guest_to_client()
        except (ProtocolError, WsProtocolError, InvalidState, TimeoutError, ConnectionError) as exc:
            log.debug("port WebSocket ends: %s", exc)
            await self._close_client(CloseCode.INTERNAL_ERROR, "the connection to the sandbox's server broke")
        finally:
            to_guest.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await to_guest
            await self.conn.close()

    async def _client_to_guest(self) -> None:
        while True:
            msg = await self.ws.receive()
            if self.protocol.state is not State.OPEN:
                return
            if msg.type == WSMsgType.TEXT:
                self.protocol.send_text(msg.data.encode())
            elif msg.type == WSMsgType.BINARY:
                self.protocol.send_binary(msg.data)
            elif msg.type == WSMsgType.CLOSE:
                code = msg.data if msg.data in _SENDABLE else None
                reason = msg.extra or "" if code is not None else ""
                self.client_closed = (code or CloseCode.NORMAL_CLOSURE, reason)
                self.protocol.send_close(code, reason)
                await _flush(self.protocol, self.conn)
                return
            else:  # the client went away (CLOSED, ERROR): say so to the guest
                self.client_closed = (CloseCode.GOING_AWAY, "")
                self.protocol.send_close(CloseCode.GOING_AWAY)
                await _flush(self.protocol, self.conn)
                return
            await _flush(self.protocol, self.conn)

    async def _guest_to_client(self) -> None:
        while True:
            data = await self.conn.read(timeout=CLOSE_TIMEOUT_S if self.client_closed else None)
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            done = await self._frames(self.protocol.events_received())
            await _flush(self.protocol, self.conn)  # pongs, and the answer to a close
            if done:
                return
            if not data:  # the guest's side is gone without a close frame
                await self._close_client(CloseCode.GOING_AWAY, "the sandbox's server closed the connection")
                return

    async def _frames(self, frames: Sequence[object]) -> bool:
        """Deliver the guest's frames; True once its close was handled."""
        for frame in frames:
            assert isinstance(frame, Frame)
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                if frame.opcode is not Opcode.CONT:
                    self._fragment_opcode = frame.opcode
                self._fragments.append(bytes(frame.data))
                self._fragment_bytes += len(frame.data)
                if self._fragment_bytes > self.max_message:
                    self.protocol.send_close(CloseCode.MESSAGE_TOO_BIG)
                    await self._close_client(CloseCode.MESSAGE_TOO_BIG, "the sandbox's server sent too large a message")
                    return True
                if frame.fin:
                    message = b"".join(self._fragments)
                    self._fragments, self._fragment_bytes = [], 0
                    if self._fragment_opcode is Opcode.TEXT:
                        await self.ws.send_str(message.decode("utf-8", "replace"))
                    else:
                        await self.ws.send_bytes(message)
            elif frame.opcode is Opcode.CLOSE:
                close = Close.parse(frame.data)
                code, reason = close.code, close.reason
                if code not in _SENDABLE:  # 1005 (no code): the client's own, when it closed first
                    code, reason = self.client_closed or (CloseCode.NORMAL_CLOSURE, "")
                await self._close_client(code, reason)
                return True
        return False

    async def _close_client(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code=code, message=reason.encode())
