"""guest_agent.invoke's cache of compiled sources (sans-I/O: plain calls of `compiled`)."""

from __future__ import annotations

import linecache

import pytest

from guest_agent import invoke


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invoke, "_COMPILED", type(invoke._COMPILED)())
    monkeypatch.setattr(invoke, "_compiled_chars", 0)


def test_same_source_is_compiled_once_and_keeps_its_lines_for_tracebacks() -> None:
    source = "def f():\n    return 1 / 0\n"
    first = invoke.compiled(source, "<function a>")
    linecache.cache.pop("<function a>")
    assert invoke.compiled(source, "<function a>") is first
    assert linecache.getline("<function a>", 2) == "    return 1 / 0\n"
    # Another filename or another text is another entry.
    assert invoke.compiled(source, "<function b>") is not first
    assert invoke.compiled(source + "\n", "<function a>") is not first


def test_bounded_in_entries_and_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invoke, "_COMPILED_KEEP_CHARS", 100)
    small = [f"x = {i}\n" for i in range(3)]
    for source in small:
        invoke.compiled(source, "<s>")
    big = "y = 1\n" * 15  # 90 characters: the small ones go, oldest first
    invoke.compiled(big, "<s>")
    assert [source for _, source in invoke._COMPILED] == [small[2], big]
    assert invoke._compiled_chars == len(small[2]) + len(big)
    invoke.compiled("z = 1\n" * 20, "<s>")  # larger than the whole budget: run, not kept
    assert [source for _, source in invoke._COMPILED] == [small[2], big]
    monkeypatch.setattr(invoke, "_COMPILED_KEEP", 2)
    invoke.compiled(small[0], "<s>")
    assert [source for _, source in invoke._COMPILED] == [big, small[0]]
