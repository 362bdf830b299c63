"""The sans-I/O agent leg (guest_agent/protocol.py): both roles, bytes fed one at a time, no event
loop. The guest is untrusted, so most of this is what a hostile agent can send the gateway."""

from __future__ import annotations

from typing import Any

from guest_agent.protocol import AGENT, GATEWAY, AgentLeg, Reply, StreamEvent
from guest_agent.schema import Request
from guest_agent.wire import FrameDecoder, ProtocolError, encode_frame


def _bytewise(leg: AgentLeg, data: bytes) -> list[Any]:
    events = []
    for i in range(len(data)):
        leg.receive_data(data[i : i + 1])
        events += leg.events_received()
    return events


def _frames(data: bytes) -> list[dict[str, Any]]:
    decoder = FrameDecoder()
    decoder.receive_data(data)
    return list(decoder.messages_received())


def _gateway_with_stream() -> tuple[AgentLeg, int]:
    leg = AgentLeg(GATEWAY)
    rid = leg.send_request("exec.start", {"exec_id": "e1", "command": "ls"})
    assert _frames(leg.data_to_send()) == [{"id": rid, "op": "exec.start", "exec_id": "e1", "command": "ls"}]
    return leg, rid


def test_both_roles_talk_to_each_other_byte_by_byte() -> None:
    gateway, agent = AgentLeg(GATEWAY), AgentLeg(AGENT)
    ping = gateway.send_request("ping", {})
    stream = gateway.send_request("fs.read", {"path": "f"})
    (first, second) = _bytewise(agent, gateway.data_to_send())
    assert isinstance(first, Request) and first.op.name == "ping" and first.id == ping
    assert isinstance(second, Request) and second.args == {"path": "f", "offset": 0}
    agent.send_reply(ping, {})
    assert agent.send_event(stream, "start", 0.0, size=1)
    assert agent.send_event(stream, "data", 0.0, data=b"x")
    assert agent.send_event(stream, "end", 0.0, bytes=1)
    assert not agent.send_event(stream, "data", 0.0, data=b"late"), "an ended stream sends nothing"
    events = _bytewise(gateway, agent.data_to_send())
    assert events[0] == Reply(ping, {}, None)
    assert [(e.ev, e.seq) for e in events[1:]] == [("start", 0), ("data", 1), ("end", 2)]
    assert gateway.failure is None


def test_agent_answers_bad_requests_itself() -> None:
    agent = AgentLeg(AGENT)
    events = _bytewise(agent, encode_frame({"id": 7, "op": "fs.stat"}) + encode_frame({"id": 8, "ev": "data", "seq": 0})
                       + encode_frame({"op": "ping"}) + encode_frame({"id": 9, "op": "ping"}))
    assert [e.id for e in events] == [9]
    answers = _frames(agent.data_to_send())
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(7, "bad_request"), (8, "bad_request"),
                                                                 (None, "bad_request")]


def test_agent_keepalive_carries_the_last_seq_and_only_when_quiet() -> None:
    agent = AgentLeg(AGENT, keepalive_idle=10.0)
    agent.send_event(1, "start", 100.0, exec_id="e", pid=None)
    agent.send_event(1, "data", 101.0, fd="stdout", data=b"a")
    agent.send_event(1, "data", 102.0, fd="stdout", data=b"b")
    agent.keepalives(105.0)  # quiet for 3 s only
    agent.keepalives(112.0)
    agent.keepalives(113.0)  # just sent one
    sent = _frames(agent.data_to_send())
    assert [(m["ev"], m["seq"]) for m in sent] == [("start", 0), ("data", 1), ("data", 2), ("keepalive", 2)]


def test_agent_refuses_a_reply_too_large_to_frame() -> None:
    agent = AgentLeg(AGENT, max_frame=100)
    agent.send_reply(1, {"blob": "x" * 200})
    (answer,) = _frames(agent.data_to_send())
    assert answer["id"] == 1 and answer["error"]["code"] == "frame_too_large"


def test_gateway_checks_sequence_numbers_and_keepalives() -> None:
    leg, rid = _gateway_with_stream()
    ok = _bytewise(leg, encode_frame({"id": rid, "ev": "start", "seq": 0, "exec_id": "e1", "pid": 1})
                   + encode_frame({"id": rid, "ev": "keepalive", "seq": 0}))
    assert [(e.ev, e.seq) for e in ok] == [("start", 0), ("keepalive", 0)]
    bad = _bytewise(leg, encode_frame({"id": rid, "ev": "keepalive", "seq": 5}))
    assert leg.failure is not None and leg.failure.code == "guest_protocol"
    assert "keepalive with seq 5" in leg.failure.message
    (end,) = bad
    assert end == StreamEvent(rid, "end", 1, {"exit_code": None, "signal": None, "error": leg.failure.to_wire()})


def test_gateway_fails_every_request_and_stream_on_a_bad_frame() -> None:
    leg, _ = _gateway_with_stream()
    ping = leg.send_request("ping", {})
    events = _bytewise(leg, b"\xff\xff\xff\xff")
    assert leg.failure is not None and leg.failure.code == "guest_protocol"
    assert {type(e) for e in events} == {Reply, StreamEvent}
    reply = next(e for e in events if isinstance(e, Reply))
    assert reply.id == ping and reply.error is leg.failure
    try:
        leg.send_request("ping", {})
    except ProtocolError as exc:
        assert exc is leg.failure
    else:
        raise AssertionError("a failed leg sends nothing")


def test_gateway_refuses_what_an_agent_never_sends() -> None:
    for hostile, reason in [
        ({"ev": "data", "seq": 0, "fd": "stdout", "data": b"x"}, "data out of order"),
        ({"ev": "start", "seq": 0}, None),
        ({"op": "exec.start"}, "do not send requests"),
    ]:
        leg, rid = _gateway_with_stream()
        _bytewise(leg, encode_frame({**hostile, "id": rid}))
        if reason is None:
            assert leg.failure is None
        else:
            assert leg.failure is not None and reason in leg.failure.message


def test_a_refused_stream_ends_with_the_agents_error_and_a_forgotten_one_costs_nothing() -> None:
    leg, rid = _gateway_with_stream()
    (end,) = _bytewise(leg, encode_frame({"id": rid, "error": {"code": "busy", "message": "m", "retryable": True}}))
    assert end.ev == "end" and end.fields["error"]["code"] == "busy"
    leg, rid = _gateway_with_stream()
    leg.forget(rid)
    events = _bytewise(leg, encode_frame({"id": rid, "ev": "start", "seq": 0})
                       + encode_frame({"id": rid, "ev": "end", "seq": 1}) + encode_frame({"id": 99, "result": {}}))
    assert events == [] and leg.failure is None


def test_eof_ends_everything_with_guest_died() -> None:
    leg, rid = _gateway_with_stream()
    leg.receive_eof()
    (end,) = leg.events_received()
    assert end.id == rid and end.fields["error"]["code"] == "guest_died"
