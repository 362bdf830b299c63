from __future__ import annotations

from gateway.sessions.replay import ReplayBuffer
from guest_agent.protocol import EVENT_OVERHEAD


def test_replay_since_and_exact_loss() -> None:
    buffer = ReplayBuffer(max_bytes=(EVENT_OVERHEAD + 10) * 2 + 10)  # two events of 10 data bytes fit
    for i in range(5):
        buffer.append({"ev": "data", "data": b"x" * 10, "i": i})
    events, lost = buffer.since(0)
    assert [e["seq"] for e in events] == [3, 4] and lost == (0, 2)
    events, lost = buffer.since(4)
    assert [e["seq"] for e in events] == [4] and lost is None
    events, lost = buffer.since(9)
    assert events == [] and lost is None


def test_newest_event_is_always_kept() -> None:
    buffer = ReplayBuffer(max_bytes=10)
    buffer.append({"ev": "data", "data": b"x" * 1000})
    buffer.append({"ev": "end"})
    events, lost = buffer.since(0)
    assert [e["ev"] for e in events] == ["end"] and lost == (0, 0)
