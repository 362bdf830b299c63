"""The one op schema: its checks, and every copy of it that must not drift (docs, JS, SDK, agent).

Sans-I/O: no event loop, no sockets (except a socketpair to build a real agent's handler table).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.client.connection import IDEMPOTENT_OPS
from gateway.protocol.__main__ import DOC, JS, docs_with_table
from gateway.protocol.client import BINARY_FIELDS, describe, protocol_js
from guest_agent import schema
from guest_agent.schema import AGENT, CLIENT, OPS, parse
from guest_agent.wire import ProtocolError

ROOT = Path(__file__).resolve().parents[2]


def _error(message: dict[str, Any], leg: str = CLIENT) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(message, leg)
    return info.value


# -- drift -----------------------------------------------------------------------------------------


def test_generated_js_module_matches_the_schema() -> None:
    assert JS.read_text() == protocol_js(), "run `python -m gateway.protocol` and commit gateway/web/js/protocol.js"


def test_docs_op_table_matches_the_schema() -> None:
    doc = DOC.read_text()
    assert docs_with_table(doc) == doc, "run `python -m gateway.protocol` and commit docs/protocol.md"


def test_js_client_takes_its_constants_from_the_generated_module() -> None:
    client = (ROOT / "gateway" / "web" / "js" / "sandgate.js").read_text()
    assert 'import { PROTOCOL } from "./protocol.js";' in client
    code = "\n".join(line for line in client.splitlines() if not line.lstrip().startswith(("//", "*", "/**")))
    for literal in ("4404", "4400", "512 * 1024", '"sandgate.v1.json"', '["data", "stdin"]'):
        assert literal not in code, f"{literal} belongs in the schema, not in the JS client"


def test_sdk_retries_exactly_the_idempotent_ops() -> None:
    assert {name for name, op in OPS.items() if op.idempotent} == IDEMPOTENT_OPS
    assert "exec.start" not in IDEMPOTENT_OPS and "fs.write" not in IDEMPOTENT_OPS


def test_agent_handles_every_agent_leg_op_and_no_other() -> None:
    from guest_agent.agent import Agent
    from guest_agent.channel import Channel

    ours, theirs = socket.socketpair()
    with ours, theirs:
        agent = Agent(".", Channel(theirs.fileno(), theirs.fileno()), install_std_streams=False)
        try:
            handled = set(agent._handlers)
        finally:
            agent.shutdown()
    agent_leg = {name for name, op in OPS.items() if op.leg != CLIENT}
    # guest.setup is registered only in a VM (--vm); everything else always.
    assert handled | {"guest.setup"} == agent_leg


def test_the_websocket_session_answers_every_client_leg_op_and_no_other() -> None:
    from gateway.web.ws import Session

    assert set(Session.HANDLERS) == {name for name, op in OPS.items() if op.leg != AGENT}
    for name, method in Session.HANDLERS.items():
        assert method is None or callable(getattr(Session, method)), name
        if method is None:  # forwarded as a plain request: never a stream, never client-only
            assert not OPS[name].stream and OPS[name].leg == schema.BOTH, name


def test_binary_fields_are_the_schemas_bin_fields() -> None:
    assert set(BINARY_FIELDS) == {"data", "stdin", "entropy", "ca_pem"}
    assert describe()["binary_fields"] == list(BINARY_FIELDS)


# -- parse -----------------------------------------------------------------------------------------


def test_unknown_fields_are_dropped_and_defaults_applied() -> None:
    request = parse({"id": 3, "op": "fs.list", "path": "a", "future_field": 1}, CLIENT)
    assert request.id == 3 and request.op.name == "fs.list"
    assert request.args == {"path": "a", "depth": 1}


def test_types_and_bounds_are_checked_once_for_every_leg() -> None:
    assert _error({"id": 1, "op": "fs.list", "path": "a", "depth": True}).message == "field 'depth' must be int"
    assert "1..16" in _error({"id": 1, "op": "fs.list", "path": "a", "depth": 17}).message
    assert _error({"id": 1, "op": "fs.stat"}).message == "missing field 'path'"
    assert _error({"id": 1, "op": "fs.write", "path": "a", "data": b"x" * (schema.MAX_WRITE_CHUNK + 1)}).code \
        == "frame_too_large"
    # PTY bounds are one rule on both legs (they used to be 999 in the gateway, 65535 in the agent).
    for leg in (CLIENT, AGENT):
        ok = parse({"id": 1, "op": "exec.resize", "exec_id": "e1", "rows": 2000, "cols": 65535}, leg)
        assert ok.args["rows"] == 2000
        assert "1..65535" in _error({"id": 1, "op": "exec.resize", "exec_id": "e1", "rows": 0, "cols": 1}, leg).message


def test_a_float_field_takes_an_int_and_keeps_bool_out() -> None:
    request = parse({"id": 1, "op": "exec.start", "code": "1", "timeout": 5}, CLIENT)
    assert request.args["timeout"] == 5.0 and isinstance(request.args["timeout"], float)
    assert _error({"id": 1, "op": "exec.start", "code": "1", "timeout": True}).code == "bad_request"
    assert "must be >= 0.001" in _error({"id": 1, "op": "exec.start", "code": "1", "timeout": 0}).message


def test_exec_start_rules() -> None:
    python = parse({"id": 1, "op": "exec.start", "code": "print(1)"}, CLIENT)
    assert python.args == {"code": "print(1)", "language": "python", "stdin_open": False}
    # stdin_open: one default everywhere (open with a terminal, closed otherwise).
    pty = parse({"id": 1, "op": "exec.start", "command": "bash", "pty": {}}, AGENT)
    assert pty.args["pty"] == {"rows": 24, "cols": 80} and pty.args["stdin_open"] is True
    closed = parse({"id": 1, "op": "exec.start", "command": "bash", "pty": {"rows": 5, "cols": 9},
                    "stdin_open": False}, AGENT)
    assert closed.args["stdin_open"] is False
    assert "exactly one" in _error({"id": 1, "op": "exec.start"}).message
    assert "exactly one" in _error({"id": 1, "op": "exec.start", "code": "1", "command": "ls"}).message
    assert "process execs" in _error({"id": 1, "op": "exec.start", "code": "1", "pty": {}}).message
    assert "list of strings" in _error({"id": 1, "op": "exec.start", "command": ["ls", 1]}).message
    assert "NUL" in _error({"id": 1, "op": "exec.start", "command": ["ls\0"]}).message
    assert "env" in _error({"id": 1, "op": "exec.start", "command": "ls", "env": {"A": 1}}).message
    assert schema.exec_capability(python.args) == "exec.python"
    assert schema.exec_capability(pty.args) == "exec.process"


def test_control_ops_need_an_exec_and_tags_are_client_leg_only() -> None:
    assert "exec_id" in _error({"id": 1, "op": "exec.close_stdin"}).message
    assert parse({"id": 1, "op": "exec.close_stdin", "tag": "t"}, CLIENT).args == {"tag": "t"}
    assert _error({"id": 1, "op": "exec.close_stdin", "tag": "t"}, AGENT).code == "bad_request"


def test_ops_of_one_leg_are_unknown_on_the_other() -> None:
    assert _error({"id": 1, "op": "guest.setup"}, CLIENT).code == "unknown_op"
    assert _error({"id": 1, "op": "sandbox.destroy"}, AGENT).code == "unknown_op"
    assert _error({"id": 1, "op": "nope"}, AGENT).code == "unknown_op"
    assert _error({"id": True, "op": "ping"}).code == "bad_request"
    assert _error({"id": 2**31, "op": "ping"}).code == "bad_request"


def test_flags() -> None:
    control = {name for name, op in OPS.items() if op.control}
    assert control == {"exec.input", "exec.close_stdin", "exec.signal", "exec.resize"}
    assert {name for name, op in OPS.items() if op.liveness} == {"hello", "ping", "sandbox.info"}
    assert all(op.nested for op in OPS.values() if op.control or (op.leg == schema.BOTH and op.liveness))
    assert {name for name, op in OPS.items() if op.stream} == {"exec.start", "exec.attach", "fs.read", "fs.watch",
                                                                   "net.connect"}
