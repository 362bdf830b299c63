"""Running the real guest agent: as a subprocess on pipes, or in-process on a socketpair.

`AgentClient` is a small synchronous client (encode_frame / FrameDecoder over fds) with a
per-read timeout, so a broken agent fails a test instead of hanging it.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import subprocess
import sys
import threading
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from guest_agent.agent import Agent, serve
from guest_agent.channel import Channel
from guest_agent.wire import FrameDecoder, encode_frame

READ_TIMEOUT = 20.0
REPO = Path(__file__).resolve().parents[2]


class AgentError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.error = error


class AgentClient:
    """Requests out, messages in; messages for other request ids are kept until asked for."""

    def __init__(self, fd_in: int, fd_out: int) -> None:
        self.fd_in = fd_in  # we read the agent's frames here
        self.fd_out = fd_out  # and write requests here
        self.decoder = FrameDecoder()
        self.ids = itertools.count(1)
        self.inbox: dict[Any, deque[dict[str, Any]]] = defaultdict(deque)
        self.exec_ids = itertools.count(1)
        self.eof = False

    # -- raw ------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd_out, view) :]

    def send(self, op: str, **fields: Any) -> int:
        rid = next(self.ids)
        self.write(encode_frame({"id": rid, "op": op, **fields}))
        return rid

    def _read_more(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd_in], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no message from the agent within {timeout} s")
        data = os.read(self.fd_in, 1 << 20)
        if not data:
            self.eof = True
            raise EOFError("the agent closed the channel")
        self.decoder.receive_data(data)
        for message in self.decoder.messages_received():
            self.inbox[message.get("id")].append(message)

    def next_for(self, rid: Any, timeout: float = READ_TIMEOUT) -> dict[str, Any]:
        """The next message with this id (keepalives included)."""
        while not self.inbox[rid]:
            self._read_more(timeout)
        return self.inbox[rid].popleft()

    def read_until_eof(self, timeout: float = READ_TIMEOUT) -> list[dict[str, Any]]:
        """Everything the agent still says before it closes the channel."""
        while not self.eof:
            try:
                self._read_more(timeout)
            except EOFError:
                break
        return [m for box in self.inbox.values() for m in box]

    # -- requests -------------------------------------------------------------------------------

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """The reply message (result or error)."""
        return self.next_for(self.send(op, **fields))

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """The result; AgentError for an error reply."""
        message = self.call(op, **fields)
        if "error" in message:
            raise AgentError(message["error"])
        return message["result"]  # type: ignore[no-any-return]

    def error(self, op: str, **fields: Any) -> dict[str, Any]:
        """The error of a request expected to fail."""
        message = self.call(op, **fields)
        assert "error" in message, message
        return message["error"]  # type: ignore[no-any-return]

    def event(self, rid: int, timeout: float = READ_TIMEOUT) -> dict[str, Any]:
        """The next stream event (keepalives skipped); AgentError if the stream never started."""
        while True:
            message = self.next_for(rid, timeout)
            if "ev" not in message and "error" in message:
                raise AgentError(message["error"])
            if message.get("ev") != "keepalive":
                return message

    def events(self, rid: int) -> list[dict[str, Any]]:
        """Every event of a stream up to and including its end."""
        out = []
        while True:
            ev = self.event(rid)
            out.append(ev)
            if ev["ev"] == "end":
                return out

    def start(self, **fields: Any) -> tuple[int, dict[str, Any]]:
        """exec.start; returns (request id, start event)."""
        fields.setdefault("exec_id", f"x{next(self.exec_ids)}")
        rid = self.send("exec.start", **fields)
        start = self.event(rid)
        assert start["ev"] == "start" and start["seq"] == 0, start
        return rid, start

    def run(self, **fields: Any) -> Result:
        rid, start = self.start(**fields)
        return Result([start, *self.events(rid)])

    def python(self, code: str, **fields: Any) -> Result:
        return self.run(language="python", code=code, **fields)


class Result:
    """A finished exec stream."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(len(events))), seqs
        self.end = events[-1]
        assert self.end["ev"] == "end"

    def out(self, fd: str = "stdout") -> bytes:
        return b"".join(e["data"] for e in self.events if e["ev"] == "data" and e["fd"] == fd)

    @property
    def stdout(self) -> str:
        return self.out("stdout").decode()

    @property
    def stderr(self) -> str:
        return self.out("stderr").decode()

    @property
    def exit_code(self) -> int | None:
        return self.end["exit_code"]  # type: ignore[no-any-return]

    @property
    def signal(self) -> str | None:
        return self.end["signal"]  # type: ignore[no-any-return]


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MSGPACK_PUREPYTHON"}
    env.update(extra)
    return env


class SubprocessAgent:
    """`python -m guest_agent` on stdin/stdout pipes."""

    def __init__(
        self,
        root: Path,
        *args: str,
        env: dict[str, str] | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            argv or [sys.executable, "-m", "guest_agent", "--root", str(root), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env or agent_env(),
            cwd=REPO,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.client = AgentClient(self.proc.stdout.fileno(), self.proc.stdin.fileno())

    def close_input(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait(self, timeout: float = READ_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        self.close_input()
        try:
            self.proc.wait(READ_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            assert self.proc.stdout is not None
            self.proc.stdout.close()


class InProcessAgent:
    """The agent loop on a thread of this process, over a socketpair."""

    def __init__(self, root: Path) -> None:
        self.ours, theirs = socket.socketpair()
        self._theirs = theirs
        channel = Channel(theirs.fileno(), theirs.fileno())
        self.agent = Agent(str(root), channel)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(channel,), name="agent-loop")
        self.thread.start()
        self.client = AgentClient(self.ours.fileno(), self.ours.fileno())

    def _run(self, channel: Channel) -> None:
        self.exit_code = serve(channel, self.agent)

    def stop(self) -> None:
        self.ours.shutdown(socket.SHUT_WR)
        self.thread.join(READ_TIMEOUT)
        assert not self.thread.is_alive(), "the in-process agent did not stop at EOF"
        self.ours.close()
        self._theirs.close()


def wait_gone(pid: int, timeout: float = READ_TIMEOUT) -> bool:
    """True once `pid` has exited (a zombie counts): waits on a pidfd, no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)
