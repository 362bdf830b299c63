"""Connections handed to the gateway as file descriptors over a Unix datagram socket.

A sandbox's outbound connections are made somewhere the gateway's event loop is not: QEMU runs
`guestfwd`'s command per connection a microVM guest opens (plugins/microvm/guestfwd.py), and the
WASM launcher opens one per `sandgate.fetch` call. Either passes the connected socket to the
gateway over a datagram socket (SCM_RIGHTS, one or more fds per datagram, whose one byte of data
says what the connection is for) and forgets it; from then on the connection is the gateway's,
served in its event loop by the policy proxy or the DNS server. `HandoffListener` is the gateway's
end: one per sandbox, so who made a connection is never in doubt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from gateway.egress.streams import READ_CHUNK

log = logging.getLogger(__name__)

#: A sandbox may hold this many handed-over connections at once; more are closed as they arrive.
MAX_CONNECTIONS = 256
#: A Unix socket's path must fit `sun_path`.
MAX_SOCKET_PATH = 107

#: Serves one connection; its reader and writer are closed by it (or by the listener's `close`).
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HandoffListener:
    """Takes the connections handed over on one datagram socket and serves each by the kind its
    datagram names (`serves`: one byte of data -> how to serve it; an unknown kind is closed).
    `close` ends them all; a sender that comes later fails to send and gives up."""

    def __init__(self, sock: socket.socket, label: str, serves: Mapping[bytes, Serve]) -> None:
        self.sock = sock
        self.label = label
        self.serves = dict(serves)
        self.connections: set[asyncio.Task[None]] = set()
        #: How many connections were refused for being over MAX_CONNECTIONS.
        self.overflowed = 0
        self._reading = False

    @classmethod
    def bind(cls, path: Path, label: str, serves: Mapping[bytes, Serve]) -> HandoffListener:
        """A listener on a datagram socket bound at `path` (senders name the path)."""
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise OSError(f"the handoff socket path {path} is too long for a Unix socket; "
                          "set SANDGATE_STATE_DIR to a shorter folder")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock, label, serves)

    @classmethod
    def pair(cls, label: str, serves: Mapping[bytes, Serve]) -> tuple[HandoffListener, socket.socket]:
        """A listener and the other end of its socket pair, for a child process to inherit."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return cls(ours, label, serves), theirs

    def start(self) -> None:
        self.sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._take)
        self._reading = True

    def _take(self) -> None:
        while True:
            try:
                kind, fds, _, _ = socket.recv_fds(self.sock, 16, 4)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("handoff %s: cannot take a connection: %s", self.label, exc)
                return
            serve = self.serves.get(kind)
            for fd in fds:
                if serve is None or len(self.connections) >= MAX_CONNECTIONS:
                    os.close(fd)
                    self.overflowed += serve is not None
                    continue
                task = asyncio.create_task(self._serve(fd, serve), name=f"handoff-{self.label}")
                self.connections.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.connections.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("handoff %s: a connection failed", self.label, exc_info=task.exception())

    @staticmethod
    async def _serve(fd: int, serve: Serve) -> None:
        sock = socket.socket(fileno=fd)
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_CHUNK)
        except BaseException:
            sock.close()
            raise
        await serve(reader, writer)

    async def close(self) -> None:
        if self._reading:
            with contextlib.suppress(ValueError, RuntimeError):  # the loop or the fd already gone
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
