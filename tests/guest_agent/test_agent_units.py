"""Pieces of the agent on their own: path confinement, REPL compilation, streams, the channel."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from guest_agent.channel import Channel
from guest_agent.features import detect
from guest_agent.fsops import Root
from guest_agent.pyexec import compile_cell
from guest_agent.records import Stream
from guest_agent.timers import Scheduler
from guest_agent.wire import FrameDecoder, ProtocolError, encode_frame


def test_root_resolve(tmp_path: Path) -> None:
    root = Root(str(tmp_path))
    real = os.path.realpath(tmp_path)
    assert root.resolve("").rel == "." and root.resolve("").real == real
    assert root.resolve("./a//b/").rel == "a/b"
    assert root.resolve(f"{tmp_path}/a").real == f"{real}/a"
    for bad in ["..", "a/../..", "/etc", "a\0"]:
        with pytest.raises(ProtocolError) as info:
            root.resolve(bad)
        assert info.value.code == "path_escape"


def test_root_reached_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    root = Root(str(tmp_path / "alias"))
    # Absolute paths may name the root as given or as it really is.
    assert root.resolve(f"{tmp_path}/alias/x").rel == "x"
    assert root.resolve(f"{os.path.realpath(tmp_path)}/real/x").rel == "x"


def test_fs_roots_take_absolute_paths_outside_the_working_directory(tmp_path: Path) -> None:
    work, data, other = tmp_path / "work", tmp_path / "data", tmp_path / "other"
    for folder in (work, data, other):
        folder.mkdir()
    (data / "out").symlink_to(other)
    (work / "to-data").symlink_to(data)
    root = Root(str(work), (str(data),))
    assert root.resolve(f"{data}/x").real == f"{os.path.realpath(data)}/x"
    assert root.resolve(f"{data}/x").rel == f"{data}/x"  # outside /work: shown absolute
    assert root.resolve(f"{work}/x").rel == "x"
    assert root.resolve("to-data/x").real == f"{os.path.realpath(data)}/x"  # a link between roots
    assert root.resolve(str(data)).is_root and root.resolve("").is_root
    for bad in [f"{other}/x", f"{data}/out/x", f"{data}/../other"]:
        with pytest.raises(ProtocolError) as info:
            root.resolve(bad)
        assert info.value.code == "path_escape"
    whole = Root(str(work), ("/",))
    assert whole.resolve("/etc/hostname").real == os.path.realpath("/etc/hostname")
    assert whole.resolve("/").is_root


def test_compile_cell_splits_off_the_last_expression() -> None:
    body, expr = compile_cell("x = 1\nx + 1", "<t>")
    assert body is not None and expr is not None
    namespace: dict[str, Any] = {}
    exec(body, namespace)
    assert eval(expr, namespace) == 2
    assert compile_cell("x = 1", "<t>")[1] is None
    assert compile_cell("1", "<t>")[0] is None
    with pytest.raises(SyntaxError):
        compile_cell("(", "<t>")


def test_channel_receives_split_frames_and_stops_at_a_bad_one() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = Channel(theirs.fileno(), theirs.fileno())
        frames = encode_frame({"id": 1, "op": "ping"}) + encode_frame({"id": 2, "op": "exec.list"})
        ours.sendall(frames[:3])
        ours.sendall(frames[3:] + b"\x00\x00\x00\x01\xc1")
        first, second = channel.receive(), channel.receive()
        assert first is not None and (first.id, first.op.name) == (1, "ping")
        assert second is not None and (second.id, second.op.name) == (2, "exec.list")
        with pytest.raises(ProtocolError) as info:
            channel.receive()
        assert info.value.code == "bad_frame"


def test_channel_answers_a_malformed_request_itself() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = Channel(theirs.fileno(), theirs.fileno())
        ours.sendall(encode_frame({"id": 4, "op": "fs.stat"}) + encode_frame({"id": 5, "op": "ping"}))
        request = channel.receive()
        assert request is not None and request.id == 5, "the bad request never reaches a handler"
        decoder = FrameDecoder()
        decoder.receive_data(ours.recv(1000))
        (answer,) = decoder.messages_received()
        assert answer["id"] == 4 and answer["error"]["code"] == "bad_request"


def test_channel_eof_and_reply() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = Channel(theirs.fileno(), theirs.fileno())
        channel.reply(3, {})
        assert ours.recv(100) == encode_frame({"id": 3, "result": {}})
        ours.shutdown(socket.SHUT_WR)
        assert channel.receive() is None
        assert channel.receive() is None


def test_detect_single_thread() -> None:
    features = detect(single_thread=True)
    assert features.capabilities == ["exec.python", "exec.stdin", "fs", "fs.watch", "metrics"]
    assert "exec.pty" in detect().capabilities


def test_stream_numbers_events_and_keepalives_repeat_the_last_seq() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = Channel(theirs.fileno(), theirs.fileno())
        stream = Stream(channel, 7)
        channel.leg.keepalives(1e9)  # nothing before start
        assert stream.emit("start", exec_id="e", pid=None)
        assert stream.emit("data", fd="stdout", data=b"x")
        channel.leg.keepalives(1e9)
        channel.keepalives()  # not idle that long: nothing
        assert stream.emit("end", exit_code=0, signal=None, duration_ms=1.0)
        assert not stream.emit("data", fd="stdout", data=b"late")
        channel.leg.keepalives(2e9)
        channel._write(channel.leg.data_to_send())
        decoder = FrameDecoder()
        decoder.receive_data(ours.recv(10000))
        assert [(m["ev"], m["seq"]) for m in decoder.messages_received()] == [
            ("start", 0),
            ("data", 1),
            ("keepalive", 1),
            ("end", 2),
        ]


def test_scheduler_stop_does_not_wait_on_a_blocked_callback() -> None:
    # A keepalive blocked writing to a gone peer must not hold the agent's shutdown.
    release, entered = threading.Event(), threading.Event()
    scheduler = Scheduler(stop_timeout=0.05)
    scheduler.start()
    scheduler.call_later(0, lambda: (entered.set(), release.wait()))
    assert entered.wait(10)
    scheduler.stop()  # returns although the callback is still blocked
    assert scheduler._thread is not None and scheduler._thread.is_alive()
    release.set()
    scheduler._thread.join(10)
