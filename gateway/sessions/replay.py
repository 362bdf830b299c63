"""Bounded buffers of numbered stream events, for replay after a reconnect (sans-I/O).

Each exec's `ReplayBuffer` keeps its newest events up to its own cap. Buffers also draw on shared
`ReplayBudget`s (one per sandbox, one for the gateway), so that the sum over every exec a sandbox or
the gateway remembers stays bounded too: when a budget is over, the buffers of the execs that
finished longest ago are emptied first (their `end` is kept, so an attach still ends), and only
then does the buffer that grows lose its own oldest events. What is dropped is never silent: an
attach says which sequence numbers it cannot replay (`lost`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from guest_agent.protocol import event_size


class ReplayBudget:
    """Bytes shared by many buffers (a sandbox's, or the gateway's), reclaimed from the buffers of
    finished execs, oldest finished first."""

    def __init__(self, max_bytes: int, parent: ReplayBudget | None = None) -> None:
        self.max_bytes = max_bytes
        self.parent = parent
        self.used = 0
        #: Buffers of finished execs, oldest finished first (their content can be given up).
        self._finished: OrderedDict[int, ReplayBuffer] = OrderedDict()

    def _charge(self, delta: int) -> None:
        budget: ReplayBudget | None = self
        while budget is not None:
            budget.used += delta
            budget = budget.parent

    def over(self) -> bool:
        budget: ReplayBudget | None = self
        while budget is not None:
            if budget.used > budget.max_bytes:
                return True
            budget = budget.parent
        return False

    def finished(self, buffer: ReplayBuffer) -> None:
        """`buffer`'s exec has ended: its content may be reclaimed, after older finished ones'."""
        budget: ReplayBudget | None = self
        while budget is not None:
            budget._finished[id(buffer)] = buffer
            budget = budget.parent

    def release(self, buffer: ReplayBuffer) -> None:
        """`buffer` is forgotten (its exec record is dropped): give back everything it holds."""
        buffer.clear()
        budget: ReplayBudget | None = self
        while budget is not None:
            budget._finished.pop(id(buffer), None)
            budget = budget.parent

    def reclaim(self) -> None:
        """While this budget or an ancestor is over, empty finished buffers, oldest first (the
        over one's: a full gateway reclaims from any sandbox, a full sandbox from its own)."""
        budget: ReplayBudget | None = self
        while budget is not None:
            while budget.used > budget.max_bytes and budget._finished:
                _, oldest = budget._finished.popitem(last=False)
                oldest.keep_last_only()
            budget = budget.parent


class ReplayBuffer:
    """Keeps the newest events up to `max_bytes` (and what `budget` allows); says exactly which
    sequence numbers it dropped."""

    def __init__(self, max_bytes: int, budget: ReplayBudget | None = None) -> None:
        self.max_bytes = max_bytes
        self.budget = budget
        self._events: deque[dict[str, Any]] = deque()
        self._bytes = 0
        self.next_seq = 0

    @property
    def bytes(self) -> int:
        """What the buffered events cost (`event_size` summed)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._events)

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Number `event` (seq = next number) and keep it; returns it."""
        event["seq"] = self.next_seq
        self.next_seq += 1
        self._events.append(event)
        self._grow(event_size(event))
        if self._bytes <= self.max_bytes and (self.budget is None or not self.budget.over()):
            return event
        if self.budget is not None and self.budget.over():
            self.budget.reclaim()
        # Never drop the newest event, so `end` is always replayable.
        while len(self._events) > 1 and (self._bytes > self.max_bytes
                                         or (self.budget is not None and self.budget.over())):
            self._grow(-event_size(self._events.popleft()))
        return event

    def keep_last_only(self) -> None:
        """Drop every event but the newest (a finished exec's `end`)."""
        while len(self._events) > 1:
            self._grow(-event_size(self._events.popleft()))

    def clear(self) -> None:
        self._events.clear()
        self._grow(-self._bytes)

    def _grow(self, delta: int) -> None:
        self._bytes += delta
        if self.budget is not None:
            self.budget._charge(delta)

    @property
    def first_seq(self) -> int:
        return self._events[0]["seq"] if self._events else self.next_seq

    def since(self, from_seq: int) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
        """Events with seq >= from_seq, and the inclusive range of wanted ones already dropped."""
        from_seq = max(0, from_seq)
        first = self.first_seq
        lost = (from_seq, first - 1) if from_seq < first else None
        return [e for e in self._events if e["seq"] >= from_seq], lost
