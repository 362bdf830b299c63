"""The agent-leg codec, byte by byte, with no event loop."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import pytest

from guest_agent.wire import (
    ERRORS,
    FrameDecoder,
    ProtocolError,
    encode_frame,
    field,
    message_kind,
    pack,
    unpack_message,
)

PING = b"\x00\x00\x00\x0d" + b"\x82\xa2id\x01\xa2op\xa4ping"


def test_encode_frame_is_length_prefixed_msgpack() -> None:
    assert encode_frame({"id": 1, "op": "ping"}) == PING


def test_decoder_fed_one_byte_at_a_time() -> None:
    decoder = FrameDecoder()
    messages = []
    for byte in PING * 3:
        decoder.receive_data(bytes([byte]))
        messages.extend(decoder.messages_received())
    assert messages == [{"id": 1, "op": "ping"}] * 3
    assert decoder.buffered == 0


def test_decoder_keeps_partial_frame() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(PING + PING[:5])
    assert list(decoder.messages_received()) == [{"id": 1, "op": "ping"}]
    assert decoder.buffered == 5
    decoder.receive_data(PING[5:])
    assert list(decoder.messages_received()) == [{"id": 1, "op": "ping"}]


def test_binary_fields_stay_bytes() -> None:
    frame = encode_frame({"id": 2, "ev": "data", "seq": 0, "data": b"\x00\xff"})
    decoder = FrameDecoder()
    decoder.receive_data(frame)
    (message,) = decoder.messages_received()
    assert message["data"] == b"\x00\xff"


def test_oversized_header_fails_before_buffering_the_body() -> None:
    decoder = FrameDecoder(max_frame=16)
    decoder.receive_data(b"\x00\x00\x00\x11")  # announces 17 bytes
    with pytest.raises(ProtocolError) as exc:
        list(decoder.messages_received())
    assert exc.value.code == "frame_too_large"
    with pytest.raises(ProtocolError):  # the stream cannot be resynchronised
        decoder.receive_data(PING)


def test_encode_refuses_oversized_frame() -> None:
    with pytest.raises(ProtocolError) as exc:
        encode_frame({"data": b"x" * 100}, max_frame=50)
    assert exc.value.code == "frame_too_large"


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x93\x01\x02\x03",  # an array, not a map
        b"\x81\x01\x02",  # integer key
        b"\x81\xa1a\x01\x00",  # trailing byte
        b"\x81\xa1a",  # truncated
        b"\xa3ab",  # truncated string
    ],
)
def test_malformed_bodies_are_bad_frame(body: bytes) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(len(body).to_bytes(4, "big") + body)
    with pytest.raises(ProtocolError) as exc:
        list(decoder.messages_received())
    assert exc.value.code == "bad_frame"


def test_message_kinds() -> None:
    assert message_kind({"id": 1, "op": "ping"}) == "request"
    assert message_kind({"id": 1, "result": {}}) == "reply"
    assert message_kind({"id": 1, "error": {"code": "internal"}}) == "reply"
    assert message_kind({"id": 1, "ev": "data", "seq": 3}) == "event"
    for bad in ({"op": "x"}, {"id": True, "op": "x"}, {"id": -1, "op": "x"}, {"id": 1, "ev": "nope", "seq": 0},
                {"id": 1, "ev": "data", "seq": -1}, {"id": 1}, {"id": 1, "result": {}, "error": {}},
                {"id": 1, "op": 5}, {"id": 2**31, "op": "x"}):
        with pytest.raises(ProtocolError) as exc:
            message_kind(bad)
        assert exc.value.code == "bad_request", bad


def test_field_types() -> None:
    message = {"n": 3, "flag": True, "s": "x", "none": None}
    assert field(message, "n", int) == 3
    assert field(message, "missing", int, 7) == 7
    assert field(message, "none", str, "d") == "d"
    with pytest.raises(ProtocolError, match="missing field"):
        field(message, "missing", int)
    with pytest.raises(ProtocolError, match="must be an integer"):
        field(message, "flag", int)  # bool is not an int on the wire
    with pytest.raises(ProtocolError):
        field(message, "s", int)


def test_error_from_wire_tolerates_garbage() -> None:
    assert ProtocolError.from_wire({"code": "busy", "message": "x"}).code == "busy"
    for garbage in (None, "x", {"code": "no-such-code", "message": "m"}, {"code": "busy"}):
        assert ProtocolError.from_wire(garbage).code == "guest_protocol"
    with pytest.raises(ValueError):
        ProtocolError("not-a-code", "x")


def test_pure_python_msgpack_decodes_the_same() -> None:
    from msgpack import fallback

    message = {"id": 1, "ev": "data", "seq": 0, "fd": "stdout", "data": b"\x00" * 70000}
    assert fallback.unpackb(pack(message), raw=False) == message
    assert unpack_message(fallback.Packer(use_bin_type=True).pack(message)) == message
    assert msgpack.unpackb(pack(message), raw=False) == message


def test_error_table_matches_protocol_doc() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| (yes|no) \| (\d{3}) \| (.+) \|$", doc, re.MULTILINE)
    documented = {code: (retry == "yes", int(status), meaning) for code, retry, status, meaning in rows}
    table = {code: (k.retryable, k.http_status, k.meaning) for code, k in ERRORS.items()}
    assert documented == table
