"""What the agent keeps about each stream it sends and each exec it runs.

Shared by the dispatcher (`agent`: the exec registry, process execs, fs.read) and the Python exec
engine (`pyrunner`); neither owns the other's half of an `ExecRecord`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .channel import Channel

if TYPE_CHECKING:
    from .pyrunner import PythonRun


class Stream:
    """The agent's handle on one stream: the channel's leg numbers its events and ends it once."""

    def __init__(self, channel: Channel, request_id: int) -> None:
        self._channel = channel
        self.request_id = request_id
        self.ended = False
        #: Fields added to the `end` event, computed when it is sent (an exec's `files`).
        self.end_fields: Callable[[], dict[str, Any]] | None = None

    def emit(self, ev: str, **fields: Any) -> bool:
        """Send one event; False (and nothing sent) once the stream has ended."""
        if self.ended:
            return False
        if ev == "end":
            self.ended = True
            if self.end_fields is not None:
                fields = {**self.end_fields(), **fields}
        return self._channel.event(self.request_id, ev, **fields)


@dataclass
class ExecRecord:
    exec_id: str
    tag: str | None
    stream: Stream
    started: float
    deadline: float | None
    timeout: float | None
    pid: int | None = None
    running: bool = True
    exit_code: int | None = None
    signal: str | None = None
    process: Any = None  # procexec.ProcessExec, imported only where processes exist
    python: PythonRun | None = None
    #: Called once when the exec ends, before its `end` (a language exec's private directory goes).
    cleanup: Callable[[], None] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "exec_id": self.exec_id,
            "tag": self.tag,
            "pid": self.pid,
            "running": self.running,
            "exit_code": self.exit_code,
        }
