"""TLS as the policy proxy needs it, over bytes (ssl.MemoryBIO): the server name a ClientHello
asks for, read by OpenSSL's own parser without answering it, and the server side of an
intercepted connection, whose certificate is picked by that name.
"""

from __future__ import annotations

import asyncio
import ssl

#: A ClientHello larger than this is not waited for (real ones are well under 2 KiB; post-quantum
#: key shares bring them near 2 KiB more).
MAX_HELLO_BYTES = 64 << 10
HANDSHAKE_RECORD = 0x16
READ_CHUNK = 64 << 10


def looks_like_tls(first: bytes) -> bool:
    """Whether a connection's first bytes start a TLS handshake record."""
    return bool(first) and first[0] == HANDSHAKE_RECORD


class ServerNamePeek:
    """Feed a client's first bytes; `done` once its ClientHello has been read, with the name it
    asks for in `server_name` (None: no SNI, or not a ClientHello OpenSSL accepts)."""

    def __init__(self) -> None:
        self.done = False
        self.server_name: str | None = None
        self.size = 0
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.sni_callback = self._seen
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)

    def _seen(self, _obj: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> int:
        self.server_name = name
        return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE  # stop here: nothing is answered

    def feed(self, data: bytes) -> bool:
        self.size += len(data)
        self._in.write(data)
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self.done = self.size > MAX_HELLO_BYTES
        except ssl.SSLError:
            self.done = True
        else:  # cannot happen without a certificate; taken as done
            self.done = True
        return self.done


class ServerTLS:
    """The server side of TLS over an asyncio stream pair: the guest's end of an intercepted
    connection, with `context`'s certificate (the proxy has already checked that the client asks
    for that certificate's name)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext) -> None:
        self.reader = reader
        self.writer = writer
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)

    async def handshake(self, first: bytes) -> None:
        """Complete the handshake, `first` being the bytes already read from the client.

        Raises:
            ssl.SSLError, ConnectionError: the client went away or broke the handshake.
        """
        self._in.write(first)
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the client closed during the TLS handshake") from None
                continue
            await self._flush()
            return

    async def read(self) -> bytes:
        """Up to READ_CHUNK plaintext bytes; b"" at the end."""
        while True:
            try:
                return self._tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def write(self, data: bytes) -> None:
        self._tls.write(data)
        self.writer.write(self._out.read())

    async def drain(self) -> None:
        await self.writer.drain()

    async def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            self.writer.write(pending)
            await self.writer.drain()

    async def _fill(self) -> bool:
        data = await self.reader.read(READ_CHUNK)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True
