"""A ByteChannel over a Kubernetes exec/attach stream (`v4.channel.k8s.io` WebSocket subprotocol).

Every WebSocket message is one byte naming the channel and then the bytes: 0 stdin (we send), 1
stdout (the agent's frames), 2 stderr (the agent's diagnostics: logged, bounded), 3 the stream's
status as JSON (the exec ended; for us the end of input), 4 resize (unused: no TTY). Binary
messages carry raw bytes, so frames pass unchanged in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from typing import Any

import aiohttp
import msgpack

from gateway.runtime.base import ByteChannel
from guest_agent.wire import DEFAULT_MAX_FRAME

log = logging.getLogger(__name__)

STDIN, STDOUT, STDERR, STATUS = 0, 1, 2, 3
#: Stdin goes out in messages of at most this much: one agent frame can be 1 MiB, and a bounded
#: message keeps the apiserver's and kubelet's per-message buffers small.
WRITE_CHUNK = 64 * 1024
STDERR_TAIL = 16 * 1024


class StreamChannel(ByteChannel):
    """Args:
    ws: the open exec/attach WebSocket (its subprotocol must be v4.channel.k8s.io).
    label: names the pod in logs.
    resync: the stream may start in the middle of a frame (re-attaching to an agent that was
        writing): skip bytes until a whole, well-formed frame starts.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, label: str, *, resync: bool = False) -> None:
        self.ws = ws
        self.label = label
        self.stderr_tail = bytearray()
        #: The channel-3 status (exec/attach ended), once received.
        self.status: dict[str, Any] | None = None
        self._resync = Resync(label) if resync else None
        self._write_lock = asyncio.Lock()

    async def read(self) -> bytes:
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                data: bytes = msg.data
            elif msg.type == aiohttp.WSMsgType.TEXT:  # never sent for v4; tolerate a server that does
                data = msg.data.encode()
            else:  # CLOSE, CLOSED, ERROR: the stream is over
                return b""
            if not data:
                continue
            channel, payload = data[0], data[1:]
            if channel == STDOUT and payload:
                if self._resync is None:
                    return payload
                out = self._resync.feed(payload)
                if self._resync.done:
                    self._resync = None
                if out:
                    return out
            elif channel == STDERR and payload:
                self._stderr(payload)
            elif channel == STATUS:
                with contextlib.suppress(ValueError):
                    self.status = json.loads(payload) if payload else {}
                return b""
            # An empty message on a channel is the server announcing it: nothing to deliver.

    def _stderr(self, payload: bytes) -> None:
        self.stderr_tail += payload
        del self.stderr_tail[:-STDERR_TAIL]
        for line in payload.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.info("%s: agent: %s", self.label, line[:500])

    async def write(self, data: bytes) -> None:
        async with self._write_lock:  # one frame's chunks must not interleave with another's
            view = memoryview(data)
            for offset in range(0, len(view), WRITE_CHUNK):
                await self.ws.send_bytes(b"\x00" + view[offset:offset + WRITE_CHUNK].tobytes())

    async def close(self) -> None:
        await self.ws.close()

    def ended_reason(self) -> str | None:
        """What the stream's status said, for error messages."""
        if self.status is None:
            return None
        if self.status.get("status") == "Success":
            return "the agent exited with status 0"
        return str(self.status.get("message") or self.status.get("reason") or self.status)


class Resync:
    """Finds the first whole frame in a stream that may begin in the middle of one (sans-I/O).

    A boundary is a length header within bounds followed by that many bytes that decode as one
    msgpack map with an integer or null `id`, and then either the end of what arrived or another
    plausible header. Bytes before it are dropped (logged); from it on, everything passes.
    """

    def __init__(self, label: str = "stream") -> None:
        self.label = label
        self.done = False
        self.skipped = 0
        self._pending = bytearray()
        #: Positions before this one are refused for good: each feed scans only what is new.
        self._scan_from = 0

    def feed(self, payload: bytes) -> bytes:
        """The bytes from the boundary on once it is found (then `done`), else b"" for now.

        Raises:
            ConnectionError: two maximum frames arrived without a boundary: not our agent.
        """
        if self.done:
            return payload
        self._pending += payload
        buf = self._pending
        waiting: int | None = None  # the first candidate whose frame is not whole yet
        for start in range(self._scan_from, len(buf) - 3):
            (size,) = struct.unpack_from(">I", buf, start)
            end = start + 4 + size
            if not 0 < size <= DEFAULT_MAX_FRAME:
                continue
            if end > len(buf):  # a frame not whole yet: a later feed may complete it
                waiting = start if waiting is None else waiting
                continue
            if not _is_message(bytes(buf[start + 4:end])):
                continue
            if end + 4 <= len(buf):
                (next_size,) = struct.unpack_from(">I", buf, end)
                if not 0 < next_size <= DEFAULT_MAX_FRAME:
                    continue
            if start:
                log.info("%s: skipped %d bytes of a frame cut by the re-attach", self.label, start)
            self.skipped, self.done = start, True
            out = bytes(buf[start:])
            self._pending.clear()
            return out
        if len(buf) > 2 * DEFAULT_MAX_FRAME + 8:
            raise ConnectionError(f"{self.label}: no protocol frame in the re-attached stream")
        self._scan_from = waiting if waiting is not None else max(0, len(buf) - 3)
        return b""


def _is_message(body: bytes) -> bool:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises ValueError, its own errors and more on garbage
        return False
    return isinstance(message, dict) and "id" in message and (
        message["id"] is None or isinstance(message["id"], int))
