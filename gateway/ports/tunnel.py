"""The gateway's end of one TCP connection to a port inside a sandbox, over the agent's channel.

`open_connection` sends `net.connect` (guest_agent/netconn.py is the agent's end) and returns a
`GuestConnection`: `read` / `write` / `write_eof` / `close`, as a socket would offer them. It never
touches the sandbox's network: the bytes travel in the agent leg's frames, so a sandbox with no
network device can publish a port.

Flow control, so that neither a slow client nor a fast guest server grows the gateway's memory:
the agent may send a connection `window` bytes ahead of what the gateway granted. The connection
takes them into its buffer without ever waiting (so it never holds the channel's reader, and the
sandbox's other streams go on), and grants credit again (`net.credit`) only once its reader took
the bytes, that is once the client took the previous ones. A guest that sends past its credit
breaks the protocol, and its connection is cut. Writes wait for the agent's answer to each chunk
(`net.send` is answered once the bytes are in the guest's socket): a guest server that does not
read holds the client's upload back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

from gateway.runtime.agent_client import AgentClient, AgentStream
from guest_agent.wire import CHUNK_SIZE, ProtocolError

_ids = itertools.count(1)


class GuestConnection(AgentStream):
    """One connection to a guest port (module doc). Made by `open_connection`."""

    def __init__(self, client: AgentClient, request_id: int, conn_id: str, window: int, idle_timeout: float) -> None:
        super().__init__(client, request_id, max_bytes=window, max_events=1)
        self.conn_id = conn_id
        self.window = window
        self.idle_timeout = idle_timeout
        self._buffer = bytearray()
        #: Bytes the agent may still send; bytes taken by the reader and not yet granted again.
        self._credit = window
        self._taken = 0
        self._started = False
        self._eof = False
        self._error: ProtocolError | None = None
        self._changed = asyncio.Event()
        #: Bytes carried each way (for the sandbox's figures).
        self.bytes_in = 0
        self.bytes_out = 0

    # -- events from the agent's channel: taken at once, never waited on --------------------------

    async def _put(self, message: dict[str, Any]) -> None:
        self._take(message)

    def _put_now(self, message: dict[str, Any]) -> None:
        self._take(message)

    def _take(self, message: dict[str, Any]) -> None:
        if self.finished:
            return
        ev = message["ev"]
        if ev == "start":
            self._started = True
        elif ev == "data":
            data: bytes = message["data"]
            if len(data) > self._credit:
                self._fail(ProtocolError("guest_protocol", f"connection {self.conn_id}: the agent sent {len(data)} "
                                                           f"bytes with {self._credit} bytes of credit"))
                return
            self._credit -= len(data)
            self._buffer += data
            self._eof = self._eof or bool(message.get("eof"))
        elif ev == "end":
            self.finished = True
            if "error" in message and message["error"] is not None:
                self._error = ProtocolError.from_wire(message["error"])
        self._changed.set()

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        self._buffer.clear()
        self.discard()  # stops taking events; the agent's end of it is closed by `close`
        self._changed.set()

    # -- the proxy's side ---------------------------------------------------------------------------

    async def _wait(self, ready: Any, timeout: float | None) -> None:
        async with asyncio.timeout(timeout):
            while not ready():
                self._changed.clear()
                await self._changed.wait()

    async def wait_started(self, timeout: float) -> None:
        """Return once the guest accepted the connection.

        Raises:
            ProtocolError: the agent's refusal (`unavailable`: nothing listens), `timeout`."""
        try:
            await self._wait(lambda: self._started or self.finished, timeout)
        except TimeoutError:
            raise ProtocolError("timeout", f"the guest did not accept the connection in {timeout:g} s") from None
        if not self._started:
            raise self._error or ProtocolError("unavailable", "the guest refused the connection")

    async def read(self, timeout: float | None = None) -> bytes:
        """What the guest sent since the last read (at most a window), waiting for some;
        b"" once the guest's side is shut down (or the connection closed).

        Raises:
            ProtocolError: the connection failed (reset, the guest broke the protocol, the agent died).
            TimeoutError: nothing came for `timeout` seconds (default: the idle timeout).
        """
        await self._wait(lambda: self._buffer or self._eof or self.finished or self._error,
                         self.idle_timeout if timeout is None else timeout)
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self.bytes_in += len(data)
            await self._grant(len(data))
            return data
        if self._error is not None:
            raise self._error
        return b""

    async def _grant(self, taken: int) -> None:
        """Give the agent back credit for bytes the reader took: in batches of half a window, so a
        stream costs a grant per half window, not one per chunk."""
        self._taken += taken
        if self._taken >= self.window // 2 and not self.finished and not self._eof:
            grant, self._taken = self._taken, 0
            self._credit += grant
            await self._client.notify("net.credit", conn_id=self.conn_id, bytes=grant)

    async def write(self, data: bytes) -> None:
        """Send bytes to the guest, a chunk at a time, each once the agent wrote the one before."""
        view = memoryview(data)
        while view:
            chunk, view = view[:CHUNK_SIZE], view[CHUNK_SIZE:]
            await self._send(bytes(chunk), eof=False)
            self.bytes_out += len(chunk)

    async def write_eof(self) -> None:
        """Shut down the writing side (the guest reads EOF); reading goes on."""
        await self._send(b"", eof=True)

    async def _send(self, data: bytes, *, eof: bool) -> None:
        if self._error is not None:
            raise self._error
        fields: dict[str, Any] = {"conn_id": self.conn_id, "eof": eof}
        if data:
            fields["data"] = data
        await self._client.request("net.send", timeout=self.idle_timeout, **fields)

    async def close(self) -> None:
        """Close both ways at once (idempotent; never raises: the agent may be gone)."""
        was_open = not self.finished or self._error is not None
        if not self.finished:
            self.discard()
        self._changed.set()
        if was_open:
            with contextlib.suppress(ProtocolError, OSError):
                await self._client.notify("net.close", conn_id=self.conn_id)


async def open_connection(agent: AgentClient, port: int, *, window: int, connect_timeout: float,
                          idle_timeout: float) -> GuestConnection:
    """Connect to `port` on the sandbox's loopback through its agent.

    Raises:
        ProtocolError: `unsupported` (an agent without net.connect), `unavailable` (nothing
            listens on the port), `timeout`, or what the agent leg raises (`guest_died`).
    """
    if "net.connect" not in agent.capabilities:
        raise ProtocolError("unsupported", "this sandbox's agent cannot open connections to its ports")
    conn_id = f"n{next(_ids)}"
    conn = await agent.open_stream(
        "net.connect", lambda client, rid: GuestConnection(client, rid, conn_id, window, idle_timeout),
        conn_id=conn_id, port=port, window=window)
    try:
        await conn.wait_started(connect_timeout)
    except BaseException:
        await conn.close()
        raise
    return conn
