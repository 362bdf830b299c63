"""Published ports, the agent's half: TCP connections to the guest's loopback (the `net.*` ops).

The gateway proxies a published port's HTTP and WebSocket traffic through these connections, over
the agent's own channel, so a sandbox without any network device can still publish a port. One
thread serves every connection with `selectors`; the request loop only hands it commands and never
waits on a socket. Replies to net.* requests come from that thread.

Flow control, both ways, so that nothing a client or a guest server does grows anyone's memory:
- guest -> gateway: a connection's socket is read only while it has credit (`window` at
  net.connect, more with each net.credit). A slow client holds the guest's server back in its own
  socket buffers, not in the agent or the gateway, and the channel's other streams go on.
- gateway -> guest: net.send is answered once its bytes are written to the socket, and the gateway
  sends a connection's next chunk only then. `SEND_BUFFER` bounds what a gateway that does not
  wait could queue here.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ._log import log_exception
from .channel import Channel
from .records import Stream
from .wire import CHUNK_SIZE, MAX_WRITE_CHUNK, ProtocolError

#: Connections one agent keeps open at once (the gateway bounds them per port and sandbox too).
MAX_CONNECTIONS = 256
#: Bytes of net.send data a connection may hold unwritten.
SEND_BUFFER = 2 * MAX_WRITE_CHUNK
#: Where a port is looked for: IPv4 loopback first, then IPv6's (a server bound to "localhost"
#: may have taken ::1 only, as Node's often does).
LOOPBACKS = ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"))
_CONNECTING = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)


class _Conn:
    """One connection, as the serving thread keeps it."""

    def __init__(self, conn_id: str, port: int, stream: Stream, credit: int) -> None:
        self.conn_id = conn_id
        self.port = port
        self.stream = stream
        self.credit = credit
        self.sock: socket.socket | None = None
        self.addresses = list(LOOPBACKS)
        self.connected = False
        #: net.send data not yet written; bytes written and queued so far (the sends' marks).
        self.out = bytearray()
        self.written = 0
        self.queued = 0
        #: net.send requests waiting for their bytes to be written: (request id, mark).
        self.waiting: deque[tuple[int, int]] = deque()
        #: Where the writing side is shut down (a net.send with eof), once written up to it.
        self.shut_at: int | None = None
        self.read_done = False
        self.write_done = False
        self.registered = 0

    def interest(self) -> int:
        events = 0
        if not self.connected or self.out or (self.shut_at is not None and not self.write_done):
            events |= selectors.EVENT_WRITE
        if self.connected and not self.read_done and self.credit > 0:
            events |= selectors.EVENT_READ
        return events


class Connections:
    """The agent's TCP connections to guest ports, served by one thread (module doc).

    Args:
        channel: where replies and stream events go.
        spawn_thread: how the agent starts (and later joins) its threads.
    """

    def __init__(self, channel: Channel, spawn_thread: Callable[[str, Callable[[], None]], None]) -> None:
        self._channel = channel
        self._spawn_thread = spawn_thread
        self._lock = threading.Lock()
        self._commands: deque[tuple[str, int, Mapping[str, Any]]] = deque()
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = -1, -1
        self._conns: dict[str, _Conn] = {}
        self._stopped = False

    # -- the request loop's side: each op is queued for the serving thread, which answers it ------

    def connect(self, rid: int, args: Mapping[str, Any]) -> None:
        self._queue("connect", rid, args)

    def send(self, rid: int, args: Mapping[str, Any]) -> None:
        self._queue("send", rid, args)

    def credit(self, rid: int, args: Mapping[str, Any]) -> None:
        self._queue("credit", rid, args)

    def close(self, rid: int, args: Mapping[str, Any]) -> None:
        self._queue("close", rid, args)

    def shutdown(self) -> None:
        """Close every connection and stop the thread (the agent is going)."""
        with self._lock:
            self._stopped = True
            if self._selector is None:
                return
        self._wake()

    def _queue(self, op: str, rid: int, args: Mapping[str, Any]) -> None:
        with self._lock:
            if self._stopped:
                raise ProtocolError("unavailable", "the agent is shutting down")
            self._commands.append((op, rid, args))
            if self._selector is None:  # started with the first connection
                self._selector = selectors.DefaultSelector()
                self._wake_r, self._wake_w = os.pipe()
                os.set_blocking(self._wake_r, False)
                os.set_blocking(self._wake_w, False)
                self._selector.register(self._wake_r, selectors.EVENT_READ, None)
                self._spawn_thread("net-connections", self._serve)
                return
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # a wake-up is pending already
            pass

    # -- the serving thread -----------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._selector is not None
        try:
            while True:
                with self._lock:
                    commands, self._commands = self._commands, deque()
                    stopped = self._stopped
                if stopped:
                    break
                for op, rid, args in commands:
                    self._command(op, rid, args)
                for conn in list(self._conns.values()):
                    self._register(conn)
                # A command queued from now on writes to the wake pipe, which ends this wait.
                for key, mask in self._selector.select():
                    if key.data is None:
                        self._drain_wake()
                    else:
                        self._guarded(key.data, mask)
        finally:
            for conn in list(self._conns.values()):
                self._end(conn, None)
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _guarded(self, conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._writable(conn)
            if mask & selectors.EVENT_READ and conn.conn_id in self._conns:
                self._readable(conn)
        except Exception as exc:  # a bug must end this connection, never the thread serving all of them
            log_exception(f"connection {conn.conn_id} failed")
            self._end(conn, ProtocolError("internal", f"{type(exc).__name__}: {exc}"))

    def _command(self, op: str, rid: int, args: Mapping[str, Any]) -> None:
        try:
            if op == "connect":
                self._connect(rid, args)
                return
            conn = self._conns.get(args["conn_id"])
            if conn is None:
                raise ProtocolError("not_found", f"no connection {args['conn_id']!r:.80}")
            if op == "send":
                self._send(rid, conn, args.get("data", b""), args["eof"])
            elif op == "credit":
                conn.credit += args["bytes"]
                self._channel.reply(rid, {})
            else:  # close
                self._end(conn, None)
                self._channel.reply(rid, {})
        except ProtocolError as exc:
            self._channel.error(rid, exc)

    def _connect(self, rid: int, args: Mapping[str, Any]) -> None:
        conn_id = args["conn_id"]
        if conn_id in self._conns:
            raise ProtocolError("exists", f"connection {conn_id!r:.80} is open")
        if len(self._conns) >= MAX_CONNECTIONS:
            raise ProtocolError("busy", f"{MAX_CONNECTIONS} connections are open")
        conn = _Conn(conn_id, args["port"], Stream(self._channel, rid), args["window"])
        self._conns[conn_id] = conn
        self._dial(conn)

    def _dial(self, conn: _Conn) -> None:
        """Start connecting to the next loopback address; a connection that has none left is
        refused (its request answered with the error: the stream never started)."""
        while conn.addresses:
            family, host = conn.addresses.pop(0)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError:  # no IPv6 in this guest
                continue
            sock.setblocking(False)
            code = sock.connect_ex((host, conn.port))
            if code == 0 or code in _CONNECTING:
                conn.sock = sock
                return
            sock.close()
        del self._conns[conn.conn_id]
        self._channel.error(conn.stream.request_id, ProtocolError(
            "unavailable", f"nothing listens on port {conn.port} in the sandbox (127.0.0.1 or ::1)"))

    def _register(self, conn: _Conn) -> None:
        assert self._selector is not None and conn.sock is not None
        events = conn.interest()
        if events == conn.registered:
            return
        if not conn.registered:
            self._selector.register(conn.sock, events, conn)
        elif not events:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.registered = events

    def _writable(self, conn: _Conn) -> None:
        assert conn.sock is not None
        if not conn.connected:
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._unregister(conn)
                conn.sock.close()
                conn.sock = None
                self._dial(conn)
                if conn.conn_id in self._conns:
                    self._register(conn)
                return
            conn.connected = True
            conn.stream.emit("start")
        if conn.out:
            try:
                written = conn.sock.send(conn.out)
            except BlockingIOError:
                return
            except OSError as exc:
                self._end(conn, _broken(exc))
                return
            del conn.out[:written]
            conn.written += written
        if conn.shut_at is not None and not conn.write_done and conn.written >= conn.shut_at:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._end(conn, _broken(exc))
                return
            conn.write_done = True
        # A send is done once its bytes are written (one with eof: once the side is shut down too).
        while conn.waiting and conn.waiting[0][1] <= conn.written and (
                conn.write_done or conn.shut_at is None or conn.waiting[0][1] < conn.shut_at):
            self._channel.reply(conn.waiting.popleft()[0], {})
        self._end_if_done(conn)

    def _readable(self, conn: _Conn) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(min(conn.credit, CHUNK_SIZE))
        except BlockingIOError:
            return
        except OSError as exc:
            self._end(conn, _broken(exc))
            return
        if data:
            conn.credit -= len(data)
            conn.stream.emit("data", data=data)
        else:
            conn.read_done = True
            conn.stream.emit("data", data=b"", eof=True)
            self._end_if_done(conn)

    def _send(self, rid: int, conn: _Conn, data: bytes, eof: bool) -> None:
        if conn.shut_at is not None:
            raise ProtocolError("bad_request", f"connection {conn.conn_id!r:.80}: its writing side is shut down")
        if len(conn.out) + len(data) > SEND_BUFFER:
            raise ProtocolError("busy", f"connection {conn.conn_id!r:.80}: {len(conn.out)} bytes wait to be written; "
                                        "wait for the answers to earlier sends")
        conn.out += data
        conn.queued += len(data)
        if eof:
            conn.shut_at = conn.queued
        conn.waiting.append((rid, conn.queued))
        if conn.connected:
            self._writable(conn)  # most sends fit the socket's buffer at once

    def _end_if_done(self, conn: _Conn) -> None:
        if conn.read_done and conn.write_done:
            self._end(conn, None)

    def _end(self, conn: _Conn, error: ProtocolError | None) -> None:
        """Close the connection and end its stream (with `error`); sends still waiting get it too."""
        if self._conns.pop(conn.conn_id, None) is None:
            return
        failure = error or ProtocolError("unavailable", f"connection {conn.conn_id!r:.80} was closed")
        while conn.waiting:
            self._channel.error(conn.waiting.popleft()[0], failure)
        if conn.sock is not None:
            self._unregister(conn)
            conn.sock.close()
        if conn.connected:
            conn.stream.emit("end", **({"error": error.to_wire()} if error is not None else {}))
        else:  # closed while connecting: its request gets an answer all the same
            self._channel.error(conn.stream.request_id, failure)

    def _unregister(self, conn: _Conn) -> None:
        if conn.registered and self._selector is not None and conn.sock is not None:
            self._selector.unregister(conn.sock)
        conn.registered = 0


def _broken(exc: OSError) -> ProtocolError:
    return ProtocolError("unavailable", f"the connection broke: {exc.strerror or exc}")
