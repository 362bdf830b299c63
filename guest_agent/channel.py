"""The agent's only I/O: frames in and out over file descriptors (docs/protocol.md §2).

A `Channel` moves bytes between the byte channel the runtime gives the agent (a pipe pair, a
virtio-serial port, a socket) and the sans-I/O codec in `wire`. It knows nothing about ops.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from .wire import DEFAULT_MAX_FRAME, FrameDecoder, ProtocolError, encode_frame

READ_SIZE = 256 * 1024


class Channel:
    """Frames over a pair of file descriptors (the same fd twice for a device or a socket).

    `receive` is called by one thread at a time (the request loop, or on a single-threaded
    platform an exec waiting for stdin). `send` may be called from any thread: whole frames are
    written under a lock, so frames never interleave. A failed write marks the channel broken
    and later sends are dropped: the peer is gone, and the read side will see EOF.
    """

    def __init__(self, fd_in: int, fd_out: int, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame=max_frame)
        self._pending: deque[dict[str, Any]] = deque()
        self._eof = False
        self._failure: ProtocolError | None = None
        self._write_lock = threading.Lock()
        self.broken = False

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._pending

    def receive(self) -> dict[str, Any] | None:
        """The next message, or None at end of input.

        Raises:
            ProtocolError: the byte stream is not frames (`bad_frame`, `frame_too_large`). The
                error is sticky: the stream cannot be resynchronised, so the caller closes.
        """
        while not self._pending:
            if self._failure is not None:
                raise self._failure
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
            self._decoder.receive_data(data)
            try:
                for message in self._decoder.messages_received():
                    self._pending.append(message)
            except ProtocolError as exc:
                self._failure = exc  # deliver what came before it first
        return self._pending.popleft()

    def send(self, message: Mapping[str, Any]) -> None:
        """Write one message as a frame.

        Raises:
            ProtocolError: `frame_too_large` if the message cannot be framed (nothing is written).
        """
        frame = encode_frame(message, max_frame=self.max_frame)
        with self._write_lock:
            if self.broken:
                return
            view = memoryview(frame)
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
