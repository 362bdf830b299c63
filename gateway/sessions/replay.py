"""A bounded buffer of numbered stream events, for replay after a reconnect (sans-I/O)."""

from __future__ import annotations

from collections import deque
from typing import Any


def event_size(event: dict[str, Any]) -> int:
    """What an event costs the buffer: its data plus a fixed overhead for the rest."""
    data = event.get("data")
    return 64 + (len(data) if isinstance(data, bytes | bytearray) else 0)


class ReplayBuffer:
    """Keeps the newest events up to `max_bytes`; says exactly which sequence numbers it dropped."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._events: deque[dict[str, Any]] = deque()
        self._bytes = 0
        self.next_seq = 0

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Number `event` (seq = next number) and keep it; returns it."""
        event["seq"] = self.next_seq
        self.next_seq += 1
        self._events.append(event)
        self._bytes += event_size(event)
        # Never drop the newest event, so `end` is always replayable.
        while self._bytes > self.max_bytes and len(self._events) > 1:
            self._bytes -= event_size(self._events.popleft())
        return event

    @property
    def first_seq(self) -> int:
        return self._events[0]["seq"] if self._events else self.next_seq

    def since(self, from_seq: int) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
        """Events with seq >= from_seq, and the inclusive range of wanted ones already dropped."""
        from_seq = max(0, from_seq)
        first = self.first_seq
        lost = (from_seq, first - 1) if from_seq < first else None
        return [e for e in self._events if e["seq"] >= from_seq], lost
