"""fs.* ops, confined to the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guest_agent.fsops import MAX_LIST_ENTRIES
from guest_agent.wire import CHUNK_SIZE, MAX_WRITE_CHUNK
from tests.guest_agent.agent_harness import AgentClient


def read(client: AgentClient, path: str, **fields: object) -> tuple[list[dict[str, object]], bytes]:
    rid = client.send("fs.read", path=path, **fields)
    events = [client.event(rid)]
    while events[-1]["ev"] != "end":
        events.append(client.event(rid))
    assert [e["seq"] for e in events] == list(range(len(events)))
    return events, b"".join(e["data"] for e in events if e["ev"] == "data")  # type: ignore[misc]


def test_write_then_stat(client: AgentClient, root: Path) -> None:
    assert client.request("fs.write", path="a.txt", data=b"hello") == {"bytes": 5, "size": 5}
    assert (root / "a.txt").read_bytes() == b"hello"
    st = client.request("fs.stat", path="a.txt")
    assert st["name"] == "a.txt" and st["path"] == "a.txt" and st["type"] == "file"
    assert st["size"] == 5 and st["mode"] == 0o644 & ~_umask()
    assert abs(st["mtime"] - (root / "a.txt").stat().st_mtime) < 1e-3
    assert client.request("fs.stat", path=str(root / "a.txt"))["path"] == "a.txt"  # absolute
    assert client.request("fs.stat", path="")["type"] == "dir"
    assert client.request("fs.stat", path="/")["type"] if str(root) == "/" else True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_offset_and_truncate(client: AgentClient, root: Path) -> None:
    client.request("fs.write", path="f", data=b"0123456789")
    assert client.request("fs.write", path="f", data=b"ab", offset=3) == {"bytes": 2, "size": 10}
    assert (root / "f").read_bytes() == b"012ab56789"
    assert client.request("fs.write", path="f", data=b"xy", truncate=True)["size"] == 2
    assert client.request("fs.write", path="f", data=b"z", offset=4)["size"] == 5
    assert (root / "f").read_bytes() == b"xy\0\0z"


def test_write_chunk_limit(client: AgentClient) -> None:
    error = client.error("fs.write", path="big", data=b"x" * (MAX_WRITE_CHUNK + 1))
    assert error["code"] == "frame_too_large"
    assert client.request("fs.write", path="big", data=b"x" * MAX_WRITE_CHUNK)["size"] == MAX_WRITE_CHUNK


def test_write_errors(client: AgentClient) -> None:
    assert client.error("fs.write", path="no/such/dir/f", data=b"")["code"] == "not_found"
    client.request("fs.mkdir", path="d")
    assert client.error("fs.write", path="d", data=b"")["code"] == "is_a_directory"
    assert client.error("fs.write", path="f", data=b"", offset=-1)["code"] == "bad_request"


def test_read_streams_chunks(client: AgentClient, root: Path) -> None:
    payload = os.urandom(3 * CHUNK_SIZE + 10)
    (root / "blob").write_bytes(payload)
    events, data = read(client, "blob")
    assert events[0] == {"id": events[0]["id"], "ev": "start", "seq": 0, "size": len(payload)}
    assert data == payload
    assert all(len(e["data"]) <= CHUNK_SIZE for e in events if e["ev"] == "data")  # type: ignore[arg-type]
    assert len(events) == 2 + 4
    assert events[-1]["bytes"] == len(payload) and "error" not in events[-1]


def test_read_offset_and_length(client: AgentClient, root: Path) -> None:
    (root / "r").write_bytes(b"0123456789")
    assert read(client, "r", offset=2, length=3)[1] == b"234"
    assert read(client, "r", offset=8)[1] == b"89"
    assert read(client, "r", offset=20)[1] == b""
    events, data = read(client, "r", length=0)
    assert data == b"" and events[-1]["bytes"] == 0


def test_read_errors_are_replies(client: AgentClient, root: Path) -> None:
    (root / "d").mkdir()
    assert client.error("fs.read", path="missing")["code"] == "not_found"
    assert client.error("fs.read", path="d")["code"] == "is_a_directory"


def test_list_depth(client: AgentClient, root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.txt").write_text("x")
    (root / "a" / "f.txt").write_text("y")
    (root / "z.txt").write_text("z")
    top = client.request("fs.list", path=".")
    assert [(e["path"], e["type"]) for e in top["entries"]] == [("a", "dir"), ("z.txt", "file")]
    assert top["truncated"] is False
    two = client.request("fs.list", path="", depth=2)
    assert [e["path"] for e in two["entries"]] == ["a", "z.txt", "a/b", "a/f.txt"]
    sub = client.request("fs.list", path="a", depth=16)
    assert [e["path"] for e in sub["entries"]] == ["b", "f.txt", "b/deep.txt"]
    assert sub["entries"][2]["name"] == "deep.txt"
    assert client.error("fs.list", path="z.txt")["code"] == "not_a_directory"
    assert client.error("fs.list", path="nope")["code"] == "not_found"
    assert client.error("fs.list", path=".", depth=17)["code"] == "bad_request"


def test_list_is_capped(client: AgentClient, root: Path) -> None:
    many = root / "many"
    many.mkdir()
    for i in range(MAX_LIST_ENTRIES + 5):
        os.close(os.open(many / f"f{i:05}", os.O_CREAT | os.O_WRONLY))
    result = client.request("fs.list", path="many")
    assert result["truncated"] is True
    assert len(result["entries"]) == MAX_LIST_ENTRIES


def test_mkdir(client: AgentClient, root: Path) -> None:
    assert client.request("fs.mkdir", path="p/q/r") == {}
    assert (root / "p" / "q" / "r").is_dir()
    assert client.request("fs.mkdir", path="p/q/r") == {}  # parents: like mkdir -p
    assert client.error("fs.mkdir", path="p/q/r", parents=False)["code"] == "exists"
    assert client.error("fs.mkdir", path="x/y", parents=False)["code"] == "not_found"
    client.request("fs.write", path="file", data=b"")
    assert client.error("fs.mkdir", path="file")["code"] == "exists"


def test_move(client: AgentClient, root: Path) -> None:
    client.request("fs.write", path="src", data=b"s")
    assert client.request("fs.move", src="src", dst="dst") == {}
    assert not (root / "src").exists() and (root / "dst").read_bytes() == b"s"
    client.request("fs.mkdir", path="dir")
    assert client.request("fs.move", src="dir", dst="dir2") == {}
    assert (root / "dir2").is_dir()
    assert client.error("fs.move", src="missing", dst="x")["code"] == "not_found"
    assert client.error("fs.move", src=".", dst="x")["code"] == "bad_request"


def test_remove(client: AgentClient, root: Path) -> None:
    (root / "t" / "u").mkdir(parents=True)
    (root / "t" / "u" / "f").write_text("f")
    (root / "g").write_text("g")
    assert client.request("fs.remove", path="g") == {}
    assert not (root / "g").exists()
    error = client.error("fs.remove", path="t")
    assert error["code"] == "io_error" and "not empty" in error["message"]
    assert client.request("fs.remove", path="t", recursive=True) == {}
    assert not (root / "t").exists()
    assert client.error("fs.remove", path="t")["code"] == "not_found"
    assert client.error("fs.remove", path="")["code"] == "bad_request"
    assert root.is_dir()


def test_symlinks_inside_the_root_are_followed(client: AgentClient, root: Path) -> None:
    (root / "real").mkdir()
    (root / "real" / "f").write_text("inside")
    (root / "link").symlink_to("real")
    assert client.request("fs.stat", path="link")["type"] == "symlink"
    assert read(client, "link/f")[1] == b"inside"
    assert [e["name"] for e in client.request("fs.list", path="link")["entries"]] == ["f"]


@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", "a/..", "/etc/passwd", "/", "x\0y"])
def test_paths_that_leave_the_root_are_refused(client: AgentClient, path: str) -> None:
    for op, fields in [
        ("fs.stat", {"path": path}),
        ("fs.read", {"path": path}),
        ("fs.write", {"path": path, "data": b"x"}),
        ("fs.list", {"path": path}),
        ("fs.mkdir", {"path": path}),
        ("fs.remove", {"path": path}),
        ("fs.move", {"src": path, "dst": "x"}),
        ("fs.move", {"src": "x", "dst": path}),
    ]:
        assert client.error(op, **fields)["code"] == "path_escape", (op, fields)


def test_symlinks_out_of_the_root_are_refused(client: AgentClient, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (root / "out").symlink_to(outside)
    (root / "secret-link").symlink_to(outside / "secret")
    (root / "dangling").symlink_to(outside / "new-file")
    for op, fields in [
        ("fs.read", {"path": "out/secret"}),
        ("fs.read", {"path": "secret-link"}),
        ("fs.write", {"path": "secret-link", "data": b"pwned"}),
        ("fs.write", {"path": "dangling", "data": b"pwned"}),
        ("fs.write", {"path": "out/new", "data": b"pwned"}),
        ("fs.list", {"path": "out"}),
        ("fs.stat", {"path": "out/secret"}),
        ("fs.mkdir", {"path": "out/sub"}),
        ("fs.remove", {"path": "out/secret"}),
        ("fs.move", {"src": "out/secret", "dst": "stolen"}),
        ("fs.move", {"src": "secret-link", "dst": "out/moved"}),
    ]:
        error = client.error(op, **fields)
        assert error["code"] == "path_escape", (op, fields)
        assert str(outside) not in error["message"]
    assert (outside / "secret").read_text() == "secret"
    assert not (outside / "new-file").exists() and not (outside / "new").exists()
    # The link itself lives in the root: it can be seen and removed, its target stays.
    assert client.request("fs.stat", path="secret-link")["type"] == "symlink"
    assert client.request("fs.remove", path="secret-link") == {}
    assert (outside / "secret").exists()


def test_errors_never_show_host_paths(client: AgentClient, root: Path) -> None:
    error = client.error("fs.read", path="nope/x")
    assert error["code"] == "not_found"
    assert str(root) not in error["message"]


def test_names_that_are_not_utf8_are_listed(client: AgentClient, root: Path) -> None:
    os.close(os.open(os.path.join(os.fsencode(root), b"bad-\xff-name"), os.O_CREAT | os.O_WRONLY))
    entries = client.request("fs.list", path=".")["entries"]
    assert [e["name"] for e in entries] == ["bad-\ufffd-name"]


def test_fifos_are_refused_without_blocking(client: AgentClient, root: Path) -> None:
    os.mkfifo(root / "fifo")
    assert client.error("fs.read", path="fifo")["code"] == "io_error"
    assert client.error("fs.write", path="fifo", data=b"x")["code"] == "io_error"
    assert client.request("fs.stat", path="fifo")["type"] == "other"


def test_patch_actions_in_order(client: AgentClient, root: Path) -> None:
    client.request("fs.patch", path="etc/app", action="mkdir", mode=0o750)
    assert (root / "etc/app").is_dir() and (root / "etc/app").stat().st_mode & 0o777 == 0o750
    client.request("fs.patch", path="etc/app/a.ini", action="text", text="[a]\n")
    client.request("fs.patch", path="etc/app/a.ini", action="append", data=b"x = 1\n")
    client.request("fs.patch", path="deep/new/b.txt", action="text", text="parents made", mode=0o600)
    assert (root / "deep/new/b.txt").stat().st_mode & 0o777 == 0o600
    client.request("fs.patch", path="copy", action="copy", src="etc/app")
    client.request("fs.patch", path="link", action="symlink", target="copy/a.ini")
    client.request("fs.patch", path="link", action="symlink", target="etc/app/a.ini")  # replaces
    assert (root / "copy/a.ini").read_text() == "[a]\nx = 1\n" and os.readlink(root / "link") == "etc/app/a.ini"
    client.request("fs.patch", path="copy", action="remove")
    client.request("fs.patch", path="copy", action="remove")  # already gone: still fine
    client.request("fs.patch", path="etc/app", action="mkdir")  # exists: still fine
    assert not (root / "copy").exists()
    for fields, code in (({"action": "chmod"}, "bad_request"), ({"action": "copy"}, "bad_request"),
                         ({"action": "text"}, "bad_request"), ({"action": "text", "text": "a", "data": b"a"},
                                                               "bad_request"),
                         ({"action": "copy", "src": "missing"}, "not_found"),
                         ({"action": "remove", "path": ""}, "bad_request"),
                         ({"action": "text", "text": "x", "path": "../x"}, "path_escape")):
        error = client.error("fs.patch", **{"path": "p", **fields})
        assert error["code"] == code, (fields, error)
