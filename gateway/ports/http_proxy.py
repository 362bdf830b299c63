"""One HTTP exchange through a published port: the client's request written to the guest's server
with h11 over a `GuestConnection`, its response parsed by h11 and streamed back to the client.

Bodies stream both ways and are never held whole: the request body goes a chunk at a time, each
once the guest's socket took the previous one; the response body goes to the client a window at a
time, and the guest gets credit for more only once the client took it (tunnel.py). One guest
connection per exchange (`Connection: close`): a guest server needs nothing more, and a browser's
keep-alive stays with the gateway. The guest's response head is bounded (`max_header_bytes`).
"""

from __future__ import annotations

import asyncio
import contextlib

import h11
from aiohttp import web

from gateway.config import Ports
from gateway.http1 import next_event
from gateway.ports import headers as hdr
from gateway.ports.tunnel import GuestConnection
from guest_agent.wire import CHUNK_SIZE, ProtocolError


async def proxy_http(request: web.Request, conn: GuestConnection, *, target: str, headers: list[tuple[str, str]],
                     port: int, prefix: str, limits: Ports) -> web.StreamResponse:
    """Forward `request` (its method, `target` path and query, `headers` as `hdr.to_guest` made
    them, its body) and answer with the guest's response.

    Raises:
        ProtocolError: before the response head: `guest_protocol` (a malformed or oversized head,
            a server that closed without answering), `timeout` (idle past `idle_timeout_s`).
        ConnectionResetError: after the head went out, when the guest's side broke: the client
            sees a broken transfer, never a short body that looks whole.
    """
    h = h11.Connection(h11.CLIENT, max_incomplete_event_size=limits.max_header_bytes)
    framing: list[tuple[str, str]] = [("Connection", "close")]
    if request.content_length is not None:
        framing.append(("Content-Length", str(request.content_length)))
    elif request.body_exists:
        framing.append(("Transfer-Encoding", "chunked"))
    try:
        head = h11.Request(method=request.method, target=target.encode("latin-1"),
                           headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in [*headers, *framing]])
    except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
        raise ProtocolError("bad_request", f"the request cannot be forwarded as HTTP/1.1: {exc}") from None
    await conn.write(h.send(head))
    upload = asyncio.create_task(_upload(request, conn, h), name=f"port-{port}-upload")
    try:
        response = await _response_head(h, conn)
        # h11 bounds only a head still incomplete; one that came whole in a read is measured here.
        size = len(response.reason) + sum(len(n) + len(v) + 4 for n, v in response.headers)
        if size > limits.max_header_bytes:
            raise ProtocolError("guest_protocol", f"the server in the sandbox sent a response head of {size} bytes "
                                                  f"(at most {limits.max_header_bytes}: [ports] max_header_bytes)")
        reply = web.StreamResponse(status=response.status_code, reason=response.reason.decode("latin-1") or None)
        raw = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in response.headers]
        for name, value in hdr.to_client(raw, port=port, prefix=prefix):
            reply.headers.add(name, value)
        length = next((v for n, v in raw if n.lower() == "content-length"), None)
        if length is not None and length.isdigit():
            reply.content_length = int(length)
        await reply.prepare(request)
        try:
            await _body(h, conn, reply)
        except (ProtocolError, h11.RemoteProtocolError, TimeoutError) as exc:
            raise ConnectionResetError(f"the guest's response broke off: {exc}") from None
        await reply.write_eof()
        return reply
    finally:
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await upload


async def _upload(request: web.Request, conn: GuestConnection, h: h11.Connection) -> None:
    """The request body, a chunk at a time; a server that answers early stops it (cancelled)."""
    if request.body_exists:
        async for chunk in request.content.iter_chunked(CHUNK_SIZE):
            await conn.write(h.send(h11.Data(data=chunk)))
    end = h.send(h11.EndOfMessage())
    if end:
        await conn.write(end)


async def _response_head(h: h11.Connection, conn: GuestConnection) -> h11.Response:
    try:
        while True:
            event = await next_event(conn, h)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):  # 100 Continue and the like pass by
                raise ProtocolError("guest_protocol", "the server in the sandbox closed the connection without "
                                                      "answering")
    except h11.RemoteProtocolError as exc:
        raise ProtocolError("guest_protocol", f"the server in the sandbox sent no valid HTTP response: {exc}") from None
    except TimeoutError:
        raise ProtocolError("timeout", "the server in the sandbox did not answer in time") from None


async def _body(h: h11.Connection, conn: GuestConnection, reply: web.StreamResponse) -> None:
    while True:
        event = await next_event(conn, h)
        if isinstance(event, h11.Data):
            await reply.write(event.data)  # waits while the client's socket is full: backpressure
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise ProtocolError("guest_protocol", "the server in the sandbox closed the connection mid-response")
