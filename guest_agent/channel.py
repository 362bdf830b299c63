"""The agent's only I/O: frames in and out over file descriptors (docs/protocol.md §2).

A `Channel` moves bytes between the byte channel the runtime gives the agent (a pipe pair, a
virtio-serial port, a socket) and the sans-I/O agent leg (`protocol.AgentLeg`), which validates
requests against the op schema, numbers stream events and makes keepalives.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from .protocol import AGENT, AgentLeg
from .schema import Request
from .wire import DEFAULT_MAX_FRAME, ProtocolError

READ_SIZE = 256 * 1024


class Channel:
    """The agent's end of the agent leg over a pair of file descriptors (the same fd twice for a
    device or a socket), around the sans-I/O `AgentLeg`.

    `receive` is called by one thread at a time (the request loop, or on a single-threaded
    platform an exec waiting for stdin). Replies and events may be sent from any thread: the leg
    and the writes are guarded by one lock, so frames never interleave and numbering follows the
    order of writing. A failed write marks the channel broken and later sends are dropped: the peer
    is gone, and the read side will see EOF.
    """

    def __init__(self, fd_in: int, fd_out: int, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.max_frame = max_frame
        self.leg = AgentLeg(AGENT, max_frame=max_frame)
        self._pending: deque[Request] = deque()
        self._eof = False
        self._lock = threading.Lock()
        self.broken = False

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._pending

    def receive(self) -> Request | None:
        """The next valid request, or None at end of input. A malformed request never comes out:
        the leg answers it with its error.

        Raises:
            ProtocolError: the byte stream is not frames (`bad_frame`, `frame_too_large`). The
                error is sticky: the stream cannot be resynchronised, so the caller closes.
        """
        while not self._pending:
            if self.leg.failure is not None:
                raise self.leg.failure
            if self._eof:
                return None
            try:
                data = os.read(self.fd_in, READ_SIZE)
            except BlockingIOError:
                _wait_fd(self.fd_in, readable=True)
                continue
            except OSError as exc:
                # A closed pty or serial port reads EIO, a reset socket ECONNRESET: both are EOF.
                if exc.errno not in (errno.EIO, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN):
                    raise
                data = b""
            if not data:
                self._eof = True
                continue
            with self._lock:
                self.leg.receive_data(data)  # requests before a framing error still come out
                self._pending.extend(self.leg.events_received())
                self._write(self.leg.data_to_send())  # its answers to malformed requests
        return self._pending.popleft()

    def wait(self, timeout: float) -> bool:
        """Whether `receive` has something (a request, or the end of input) within `timeout`
        seconds: the request loop of a single-threaded agent waits this way when it has other
        work to do at a given time (polling watches)."""
        if self._pending or self._eof or self.leg.failure is not None:
            return True
        try:
            import select
        except ImportError:  # no select: receive blocks, and the other work waits for a request
            return True
        readable, _, _ = select.select([self.fd_in], [], [], timeout)
        return bool(readable)

    def reply(self, request_id: int, result: Mapping[str, Any]) -> None:
        with self._lock:
            self.leg.send_reply(request_id, result)
            self._write(self.leg.data_to_send())

    def error(self, request_id: int | None, error: ProtocolError) -> None:
        with self._lock:
            self.leg.send_error(request_id, error)
            self._write(self.leg.data_to_send())

    def event(self, request_id: int, ev: str, **fields: Any) -> bool:
        """Send the next event of a stream (its first, `start`, opens it); False once it ended."""
        with self._lock:
            sent = self.leg.send_event(request_id, ev, time.monotonic(), **fields)
            self._write(self.leg.data_to_send())
            return sent

    def keepalives(self) -> None:
        with self._lock:
            self.leg.keepalives(time.monotonic())
            self._write(self.leg.data_to_send())

    def _write(self, data: bytes) -> None:
        if self.broken or not data:
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    written = os.write(self.fd_out, view)
                except BlockingIOError:
                    _wait_fd(self.fd_out, readable=False)
                    continue
                view = view[written:]
        except OSError:
            self.broken = True


def _wait_fd(fd: int, *, readable: bool) -> None:
    """Block until a non-blocking fd is ready (rare: the runtime handed us one)."""
    try:
        import select
    except ImportError:  # a platform without select: spin politely
        import time

        time.sleep(0.001)
        return
    if readable:
        select.select([fd], [], [])
    else:
        select.select([], [fd], [])
