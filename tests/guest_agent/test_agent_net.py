"""The agent's net.* ops (published ports' transport) against real TCP servers on the loopback."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from guest_agent.schema import NET_WINDOW
from guest_agent.wire import CHUNK_SIZE
from tests.guest_agent.agent_harness import AgentClient, AgentError


class Server:
    """A TCP server on the loopback that runs `handle` for each connection on a thread."""

    def __init__(self, handle: Callable[[socket.socket], None], family: int = socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.handle(conn)
        except BaseException as exc:
            self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()
        for thread in self.threads:
            thread.join(10)
        assert not self.errors, self.errors


def _echo_until_eof(conn: socket.socket) -> None:
    """Echo everything, then after the client's half-close say goodbye and close."""
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.sendall(b"bye")


@pytest.fixture
def echo() -> Iterator[Server]:
    server = Server(_echo_until_eof)
    yield server
    server.close()


def _collect(client: AgentClient, rid: int) -> tuple[bytes, list[dict[str, object]]]:
    """Data up to and including the end, and every event."""
    events, data = [], b""
    while True:
        ev = client.event(rid)
        events.append(ev)
        if ev["ev"] == "data":
            data += ev["data"]  # type: ignore[operator]
        if ev["ev"] == "end":
            return data, events


def test_data_both_ways_half_close_and_end(client: AgentClient, echo: Server) -> None:
    rid = client.send("net.connect", conn_id="c1", port=echo.port)
    assert client.event(rid)["ev"] == "start"
    assert client.request("net.send", conn_id="c1", data=b"hello ") == {}
    assert client.event(rid) == {"id": rid, "ev": "data", "seq": 1, "data": b"hello "}
    # The gateway's side shuts down its writing: the server sees EOF, answers, and closes its side.
    assert client.request("net.send", conn_id="c1", data=b"world", eof=True) == {}
    data, events = _collect(client, rid)
    assert data == b"worldbye"
    eof = [e for e in events if e.get("eof")]
    assert len(eof) == 1 and eof[0]["data"] == b""
    assert events[-1]["ev"] == "end" and "error" not in events[-1]
    # The connection is gone with its stream.
    assert client.error("net.send", conn_id="c1", data=b"x")["code"] == "not_found"


def test_nothing_listening_is_refused_before_start(client: AgentClient) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago, and nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rid = client.send("net.connect", conn_id="c1", port=port)
    with pytest.raises(AgentError) as refused:
        client.event(rid)
    assert refused.value.code == "unavailable" and str(port) in str(refused.value)


def test_ipv6_only_server_is_found() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        server = Server(_echo_until_eof, socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    from tests.guest_agent.agent_harness import InProcessAgent

    agent = InProcessAgent(os.getcwd())
    try:
        rid = agent.client.send("net.connect", conn_id="v6", port=server.port)
        assert agent.client.event(rid)["ev"] == "start"
        agent.client.request("net.send", conn_id="v6", data=b"six", eof=True)
        assert _collect(agent.client, rid)[0] == b"sixbye"
    finally:
        agent.stop()
        server.close()


def test_output_waits_for_credit_and_loses_nothing(client: AgentClient) -> None:
    """A server streaming 1 MiB: the agent sends one window, then nothing until credit comes."""
    body = os.urandom(1 << 20)
    server = Server(lambda conn: conn.sendall(body))
    try:
        window = 2 * CHUNK_SIZE
        rid = client.send("net.connect", conn_id="big", port=server.port, window=window)
        assert client.event(rid)["ev"] == "start"
        received = b""
        while len(received) < window:
            received += client.event(rid)["data"]  # type: ignore[operator]
        assert len(received) == window
        # A round trip later, still nothing more: the agent holds back without credit.
        client.request("ping")
        assert not [m for m in client.inbox[rid] if m.get("ev") == "data"]
        while True:
            client.request("net.credit", conn_id="big", bytes=window)
            chunk = b""
            ev = client.event(rid)
            while ev["ev"] == "data" and not ev.get("eof"):
                chunk += ev["data"]  # type: ignore[operator]
                if len(chunk) == window:
                    break
                ev = client.event(rid)
            received += chunk
            if ev.get("eof"):
                break
        assert received == body
        client.request("net.close", conn_id="big")
        assert client.event(rid)["ev"] == "end"
    finally:
        server.close()


def test_close_ends_the_stream_and_the_server_sees_it(client: AgentClient) -> None:
    seen = threading.Event()

    def wait_for_close(conn: socket.socket) -> None:
        assert conn.recv(100) == b""
        seen.set()

    server = Server(wait_for_close)
    try:
        rid = client.send("net.connect", conn_id="c", port=server.port)
        assert client.event(rid)["ev"] == "start"
        assert client.request("net.close", conn_id="c") == {}
        end = client.event(rid)
        assert end["ev"] == "end" and "error" not in end
        assert seen.wait(10)
    finally:
        server.close()


def test_bad_requests(client: AgentClient) -> None:
    release = threading.Event()

    def hold_after_eof(conn: socket.socket) -> None:
        assert conn.recv(100) == b""
        release.wait(20)
        conn.sendall(b"bye")

    server = Server(hold_after_eof)
    try:
        assert client.error("net.credit", conn_id="nope", bytes=10)["code"] == "not_found"
        assert client.error("net.close", conn_id="nope")["code"] == "not_found"
        assert client.error("net.connect", conn_id="c", port=0)["code"] == "bad_request"
        assert client.error("net.connect", conn_id="c", port=8000, window=10)["code"] == "bad_request"
        rid = client.send("net.connect", conn_id="c", port=server.port)
        assert client.event(rid)["ev"] == "start"
        assert client.error("net.connect", conn_id="c", port=server.port)["code"] == "exists"
        client.request("net.send", conn_id="c", eof=True)
        assert client.error("net.send", conn_id="c", data=b"late")["code"] == "bad_request"
        release.set()
        assert _collect(client, rid)[0] == b"bye"
    finally:
        release.set()
        server.close()


def test_the_default_window_is_the_schemas() -> None:
    assert NET_WINDOW >= CHUNK_SIZE
