"""fs.watch against the real agent: inotify (threads) and polling (`--single-thread`, as on WASI).

Each test does one change at a time through the agent's own fs ops and waits for its event: the
events a watch sends are a function of what happened, not of timing, one change at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent import watch as watch_mod
from tests.guest_agent.agent_harness import AgentClient, SubprocessAgent


@pytest.fixture(params=["inotify", "poll"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "inotify" and not watch_mod.inotify_available():
        pytest.skip(f"no inotify here: {watch_mod._libc_error}")
    return str(request.param)


@pytest.fixture
def wagent(root: Path, backend: str) -> Iterator[AgentClient]:
    agent = SubprocessAgent(root, *(["--single-thread"] if backend == "poll" else []))
    yield agent.client
    agent.stop()


def start(client: AgentClient, path: str = "", **fields: Any) -> tuple[int, dict[str, Any]]:
    fields.setdefault("watch_id", "w1")
    fields.setdefault("recursive", False)
    fields.setdefault("poll_interval", 0.05)
    rid = client.send("fs.watch", path=path, **fields)
    first = client.event(rid)
    assert first["ev"] == "start" and first["seq"] == 0, first
    return rid, first


def change(client: AgentClient, rid: int) -> tuple[str, str, bool, str | None]:
    ev = client.event(rid)
    assert ev["ev"] == "change", ev
    return ev["change"], ev["path"], ev["dir"], ev.get("src")


def test_create_modify_move_delete(wagent: AgentClient, root: Path, backend: str) -> None:
    (root / "old.txt").write_bytes(b"x")
    rid, first = start(wagent)
    assert first["backend"] == backend and first["entries"] == 1 and first["watch_id"] == "w1"
    wagent.request("fs.write", path="a.txt", data=b"hello")
    assert change(wagent, rid) == ("created", "a.txt", False, None)
    wagent.request("fs.write", path="a.txt", data=b"hello world", truncate=True)
    assert change(wagent, rid) == ("modified", "a.txt", False, None)
    wagent.request("fs.move", src="a.txt", dst="b.txt")
    assert change(wagent, rid) == ("moved", "b.txt", False, "a.txt")
    wagent.request("fs.remove", path="b.txt")
    assert change(wagent, rid) == ("deleted", "b.txt", False, None)
    wagent.request("fs.mkdir", path="sub")
    assert change(wagent, rid) == ("created", "sub", True, None)
    assert wagent.request("fs.unwatch", watch_id="w1") == {}
    end = wagent.event(rid)
    assert end["ev"] == "end" and "error" not in end


def test_recursive_sees_nested_changes_and_plain_does_not(wagent: AgentClient, root: Path) -> None:
    (root / "sub").mkdir()
    deep, _ = start(wagent, recursive=True, watch_id="deep")
    flat, _ = start(wagent, recursive=False, watch_id="flat")
    wagent.request("fs.write", path="sub/inner.txt", data=b"1")
    assert change(wagent, deep) == ("created", "sub/inner.txt", False, None)
    wagent.request("fs.write", path="top.txt", data=b"1")
    assert change(wagent, deep) == ("created", "top.txt", False, None)
    # The flat watch's first event is the top-level file: the nested one never reached it.
    assert change(wagent, flat) == ("created", "top.txt", False, None)
    # A new directory is watched too, with what arrived in it before its watch did.
    wagent.request("fs.mkdir", path="new/deeper")
    assert change(wagent, deep) == ("created", "new", True, None)
    assert change(wagent, deep) == ("created", "new/deeper", True, None)
    wagent.request("fs.write", path="new/deeper/f", data=b"1")
    assert change(wagent, deep) == ("created", "new/deeper/f", False, None)
    wagent.request("fs.move", src="new", dst="moved")
    assert change(wagent, deep) == ("moved", "moved", True, "new")
    wagent.request("fs.write", path="moved/deeper/f", data=b"22", truncate=True)
    assert change(wagent, deep) == ("modified", "moved/deeper/f", False, None)


def test_editor_save_is_one_modification(wagent: AgentClient, root: Path) -> None:
    (root / "doc.txt").write_bytes(b"v1")
    rid, _ = start(wagent)
    # What an editor does: write a temporary file, rename it over the original, in one go.
    wagent.python("open('.doc.txt.swp', 'w').write('v2 longer'); import os; os.replace('.doc.txt.swp', 'doc.txt')")
    assert change(wagent, rid) == ("modified", "doc.txt", False, None)
    wagent.request("fs.write", path="marker", data=b"")
    assert change(wagent, rid) == ("created", "marker", False, None)


def test_watched_directory_removed_ends_the_stream(wagent: AgentClient, root: Path) -> None:
    (root / "gone").mkdir()
    rid, _ = start(wagent, "gone")
    wagent.request("fs.remove", path="gone", recursive=True)
    events = wagent.events(rid)
    assert events[-2]["ev"] == "change" and events[-2]["change"] == "deleted" and events[-2]["path"] == ""
    assert events[-1]["error"]["code"] == "not_found"


def test_refusals(wagent: AgentClient, root: Path) -> None:
    (root / "file").write_bytes(b"")
    assert wagent.error("fs.watch", path="file", watch_id="a")["code"] == "not_a_directory"
    assert wagent.error("fs.watch", path="missing", watch_id="a")["code"] == "not_found"
    assert wagent.error("fs.watch", path="../..", watch_id="a")["code"] == "path_escape"
    assert wagent.error("fs.watch", path="")["code"] == "bad_request"  # the agent leg names it
    assert wagent.error("fs.unwatch", watch_id="nope")["code"] == "not_found"
    for n in range(watch_mod.MAX_WATCHES):
        start(wagent, watch_id=f"w{n}")
    assert wagent.error("fs.watch", path="", watch_id="one-more")["code"] == "busy"
    assert wagent.error("fs.watch", path="", watch_id="w0")["code"] == "exists"


def test_too_many_entries_is_refused(wagent: AgentClient, root: Path) -> None:
    big = root / "big"
    big.mkdir()
    for n in range(watch_mod.MAX_WATCH_ENTRIES + 1):
        os.close(os.open(big / str(n), os.O_CREAT | os.O_WRONLY))
    error = wagent.error("fs.watch", path="big", watch_id="b", recursive=True)
    assert error["code"] == "bad_request" and str(watch_mod.MAX_WATCH_ENTRIES) in error["message"]


# -- the sans-I/O parts ----------------------------------------------------------------------------


def test_coalescing_rules() -> None:
    existed = {"old", "kept"}
    batch = watch_mod.Coalescer(existed.__contains__)
    batch.created("new", False)
    batch.modified("new")  # created then modified: created
    batch.created("tmp", False)
    batch.deleted("tmp", False)  # came and went: nothing
    batch.modified("kept")
    batch.modified("kept")  # one modification
    batch.created(".swp", False)
    batch.moved(".swp", "old", False)  # written and renamed over an existing file: modified
    batch.created(".swp2", False)
    batch.moved(".swp2", "fresh", False)  # ... over no file: created
    assert [(c.kind, c.path) for c in batch.changes()] == [
        ("created", "new"), ("modified", "kept"), ("modified", "old"), ("created", "fresh")]
    batch = watch_mod.Coalescer({"a", "d"}.__contains__)
    batch.moved("a", "b", False)
    batch.moved("b", "c", False)  # a -> b -> c: one move from a
    batch.deleted("d", False)
    batch.created("d", False)  # replaced: modified
    batch.overflow()
    assert [(c.kind, c.path, c.src) for c in batch.changes()] == [
        ("moved", "c", "a"), ("modified", "d", None), ("overflow", "", None)]


def test_queue_overflow_is_an_event_and_the_tree_is_learnt_again(root: Path) -> None:
    if not watch_mod.inotify_available():
        pytest.skip(f"no inotify here: {watch_mod._libc_error}")
    (root / "sub").mkdir()
    tree = watch_mod.InotifyTree(str(root), True, 100)
    try:
        (root / "sub" / "f").write_bytes(b"")  # a change the overflow made the watch miss
        batch = watch_mod.Coalescer(tree.existed)
        tree.apply([watch_mod.RawEvent(-1, watch_mod.IN_Q_OVERFLOW, 0, "")], batch)
        assert [c.kind for c in batch.changes()] == ["overflow"]
        assert tree.existed("sub/f")  # learnt again, and still watched:
        (root / "sub" / "g").write_bytes(b"")
        batch = watch_mod.Coalescer(tree.existed)
        tree.apply(tree.read(), batch)
        assert ("created", "sub/g") in [(c.kind, c.path) for c in batch.changes()]
    finally:
        tree.close()


def test_treediff_reports_moves_once_and_replacements_as_modifications(root: Path) -> None:
    from guest_agent import treediff

    (root / "d").mkdir()
    (root / "d" / "inner").write_bytes(b"1")
    (root / "f").write_bytes(b"1")
    (root / "g").write_bytes(b"1")
    before = treediff.snapshot(str(root))
    os.rename(root / "d", root / "e")
    (root / "tmp").write_bytes(b"22")
    os.replace(root / "tmp", root / "f")
    os.remove(root / "g")
    (root / "h").mkdir()
    after = treediff.snapshot(str(root))
    assert [(c.kind, c.path, c.src) for c in treediff.diff(before, after, moves=True)] == [
        ("moved", "e", "d"), ("deleted", "g", None), ("created", "h", None), ("modified", "f", None)]
    plain = treediff.diff(before, after)
    assert ("deleted", "d/inner") in [(c.kind, c.path) for c in plain]
    assert treediff.snapshot(str(root), max_entries=2).truncated
    assert treediff.snapshot(str(root / "nope")).missing
