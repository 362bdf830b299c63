"""The client's view of one exec stream, without I/O: sequence numbers, resume points, results.

A reconnecting client must deliver every event exactly once. The gateway numbers each exec's events
0, 1, 2, …; `StreamTracker` remembers the last number delivered, says where to resume
(`exec.attach` `from_seq`), drops events that arrive twice, and turns both the attach reply's `lost`
range and any gap into one `OutputLost`. `ResultBuilder` folds events into an `ExecResult`.
Both are plain objects fed with messages, so tests drive them without sockets or an event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.client.errors import GuestProtocol, error_from_wire
from gateway.client.models import Display, ExecEvent, ExecResult, Exited, Output, OutputLost, Started, WatchEvent

_FDS = ("stdout", "stderr", "pty")


class StreamTracker:
    """Which events of one stream this client has delivered."""

    def __init__(self) -> None:
        self.last_seq: int | None = None

    @property
    def resume_from(self) -> int:
        """The `from_seq` to re-attach with: the first event not yet delivered."""
        return 0 if self.last_seq is None else self.last_seq + 1

    def attached(self, result: Mapping[str, Any]) -> OutputLost | None:
        """Take an `exec.attach` result; the events it says are gone, if any.

        The lost range is counted as delivered, so the gap it leaves is not reported twice."""
        lost = result.get("lost")
        if not (isinstance(lost, list) and len(lost) == 2 and all(isinstance(n, int) for n in lost)):
            return None
        first, last = max(lost[0], self.resume_from), lost[1]
        if last < first:
            return None
        self.last_seq = last
        return OutputLost(first, last)

    def accept(self, seq: int) -> tuple[bool, OutputLost | None]:
        """Whether to deliver the event numbered `seq`, and the gap before it (if events are missing).

        An event at or below the last delivered number is a replay of one already seen: dropped."""
        if self.last_seq is not None and seq <= self.last_seq:
            return False, None
        expected = self.resume_from
        gap = OutputLost(expected, seq - 1) if seq > expected else None
        self.last_seq = seq
        return True, gap


def event_from_wire(message: Mapping[str, Any]) -> Started | Output | Display | Exited | WatchEvent:
    """An exec stream's `start`, `data`, `display` or `end` message (or a watch's `change`) as an
    event object.

    Raises:
        GuestProtocol: a message that is none of those, or has mistyped fields.
    """
    ev, seq = message.get("ev"), message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise GuestProtocol(f"stream event without a sequence number: {dict(message)!r:.200}")
    if ev == "start":
        pid = message.get("pid")
        return Started(exec_id=str(message.get("exec_id", "")),
                       pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None, seq=seq)
    if ev == "data":
        fd, data = message.get("fd"), message.get("data")
        if fd not in _FDS or not isinstance(data, bytes):
            raise GuestProtocol(f"malformed data event: fd={fd!r:.20} data={type(data).__name__}")
        return Output(fd=fd, data=data, seq=seq)
    if ev == "display":
        display = Display.from_wire(message.get("bundle"), seq)
        if display is None:
            raise GuestProtocol(f"malformed display event: bundle={type(message.get('bundle')).__name__}")
        return display
    if ev == "change":
        kind, path, is_dir, src = message.get("change"), message.get("path"), message.get("dir"), message.get("src")
        if not (isinstance(kind, str) and isinstance(path, str) and isinstance(is_dir, bool)
                and (src is None or isinstance(src, str))):
            raise GuestProtocol(f"malformed change event: {dict(message)!r:.200}")
        return WatchEvent(kind=kind, path=path, is_dir=is_dir, src=src, seq=seq)
    if ev == "end":
        code, signal, duration = message.get("exit_code"), message.get("signal"), message.get("duration_ms")
        error = message.get("error")
        return Exited(
            exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
            signal=str(signal) if signal is not None else None,
            duration=float(duration) / 1000 if isinstance(duration, int | float) else 0.0,
            error=error_from_wire(error) if error is not None else None,
            truncated=message.get("truncated") is True,
            seq=seq,
        )
    raise GuestProtocol(f"unexpected stream event {ev!r:.20}")


class ResultBuilder:
    """Folds an exec's events into its `ExecResult`, keeping at most `max_output_bytes` of output."""

    def __init__(self, exec_id: str, max_output_bytes: int) -> None:
        self.result = ExecResult(exec_id=exec_id)
        self.max_output_bytes = max_output_bytes
        self._taken = 0
        self._out: dict[str, bytearray] = {fd: bytearray() for fd in _FDS}

    def add(self, event: ExecEvent) -> None:
        result = self.result
        if isinstance(event, Output):
            data = event.data
            room = self.max_output_bytes - self._taken
            if len(data) > room:
                data = data[: max(room, 0)]
                result.truncated = True
            self._taken += len(data)
            self._out[event.fd] += data
        elif isinstance(event, Display):
            result.display.append(event)
        elif isinstance(event, OutputLost):
            result.lost.append((event.first_seq, event.last_seq))
        elif isinstance(event, Exited):
            result.exit_code, result.signal, result.duration = event.exit_code, event.signal, event.duration
            result.error = event.error
            result.truncated = result.truncated or event.truncated

    def build(self) -> ExecResult:
        """The result so far (complete once the `Exited` event was added)."""
        result = self.result
        result.stdout_bytes = bytes(self._out["stdout"])
        result.stderr_bytes = bytes(self._out["stderr"])
        result.pty_bytes = bytes(self._out["pty"])
        return result
