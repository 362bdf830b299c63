"""The client-leg codecs and subprotocol negotiation (sans-I/O)."""

from __future__ import annotations

import pytest

from gateway.protocol.client import (
    JSON,
    MSGPACK,
    ClientCodec,
    bearer_from_subprotocols,
    bearer_subprotocol,
    choose_subprotocol,
)
from gateway.protocol.paths import check_path
from guest_agent.wire import ProtocolError, pack


def test_json_base64_for_binary_fields() -> None:
    codec = ClientCodec(JSON)
    encoded = codec.encode({"id": 1, "ev": "data", "seq": 0, "fd": "stdout", "data": b"hi\x00"})
    assert encoded == '{"id":1,"ev":"data","seq":0,"fd":"stdout","data":"aGkA"}'
    decoded = codec.decode('{"id":2,"op":"exec.input","exec_id":"e1","data":"aGkA"}')
    assert decoded["data"] == b"hi\x00"


def test_msgpack_codec_round_trip() -> None:
    codec = ClientCodec(MSGPACK)
    message = {"id": 3, "op": "fs.write", "path": "a", "data": b"\xff"}
    assert codec.decode(codec.encode(message)) == message


@pytest.mark.parametrize(
    ("subprotocol", "payload", "code"),
    [
        (JSON, "{nope", "bad_frame"),
        (JSON, "[1, 2]", "bad_frame"),
        (JSON, b"{}", "bad_frame"),
        (JSON, '{"id": 1, "op": "exec.input", "data": "!!!"}', "bad_request"),
        (MSGPACK, "text", "bad_frame"),
        (MSGPACK, b"\xc1", "bad_frame"),
        (MSGPACK, pack({"x": b"y" * (1 << 20)}), "frame_too_large"),
    ],
)
def test_malformed_client_messages(subprotocol: str, payload: str | bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        ClientCodec(subprotocol).decode(payload)
    assert exc.value.code == code


def test_subprotocol_choice_and_browser_bearer() -> None:
    key = "sg_secret/with+odd=chars"
    offered = [bearer_subprotocol(key), MSGPACK]
    assert choose_subprotocol(offered) == MSGPACK
    assert bearer_from_subprotocols(offered) == key
    assert choose_subprotocol([]) == JSON
    assert choose_subprotocol([bearer_subprotocol(key)]) == JSON
    with pytest.raises(ProtocolError):
        choose_subprotocol(["graphql-ws"])
    assert bearer_from_subprotocols(["sandgate.bearer.%%%"]) is None


@pytest.mark.parametrize("path", ["../x", "a/../../b", "a/..", "..", "a\\..\\b", "x\x00y", "a\nb", ""])
def test_paths_refused(path: str) -> None:
    with pytest.raises(ProtocolError):
        check_path(path, allow_absolute=True)


def test_absolute_paths_only_where_allowed() -> None:
    assert check_path("/work/a.txt", allow_absolute=True) == "/work/a.txt"
    with pytest.raises(ProtocolError) as exc:
        check_path("/etc/passwd", allow_absolute=False)
    assert exc.value.code == "path_escape"
    assert check_path("dir/..file", allow_absolute=False) == "dir/..file"
