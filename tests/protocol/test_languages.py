"""The one language table (guest_agent/languages.py) and how the gateway uses it: aliases mean the
same everywhere, and a language a sandbox lacks is refused naming what it runs."""

from __future__ import annotations

from typing import Any

import pytest
import sandgate_example_runtime
from aiohttp.test_utils import TestClient

from gateway.config import Settings
from gateway.web.app import create_app
from guest_agent import languages, schema

KEY = "languages-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(("name", "canonical"), [
    ("py", "python"), ("Python3", "python"), ("js", "javascript"), ("node", "javascript"), ("c++", "cpp"),
    ("golang", "go"), ("rs", "rust"), ("cobol", "cobol"),
])
def test_aliases_are_canonicalised_where_a_request_enters(name: str, canonical: str) -> None:
    for op, extra in (("exec.start", {}), ("invoke", {"function": "f"}), ("test", {"tests": ""})):
        args = schema.parse({"id": 1, "op": op, "code": "x", "language": name, **extra}, schema.CLIENT).args
        assert args["language"] == canonical


def test_every_language_has_a_recipe_and_distinct_names() -> None:
    names = [n for lang in languages.LANGUAGES for n in (lang.id, *lang.aliases)]
    assert len(names) == len(set(names))
    for lang in languages.LANGUAGES:
        assert lang.run and lang.programs, lang.id
        assert ("{out}" in lang.run) == (lang.compile is not None and "{out}" in lang.compile), lang.id


def test_java_main_class_is_found() -> None:
    assert languages.java_main_class("public class Hello { public static void main(String[] a) {} }") == "Hello"
    assert languages.java_main_class("class A {}\nclass B {\n  public static void main(String[] a) {}\n}") == "B"
    assert languages.java_main_class("interface X {}") == "Main"


def test_offered_by_programs_needs_every_program() -> None:
    on_path = {"python3", "gcc", "javac"}
    offered = languages.offered_by_programs(lambda p: f"/usr/bin/{p}" if p in on_path else None)
    assert offered == ["python", "c"]  # java needs java too; cpp needs g++


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient[Any, Any]:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("wasm", "microvm", "pod"),
                        default_runtime="example-local", reap_interval_s=3600.0)
    return await aiohttp_client(create_app(settings, plugins=[sandgate_example_runtime]))  # type: ignore[no-any-return]


async def test_a_language_the_sandbox_lacks_names_what_it_runs(client: TestClient[Any, Any]) -> None:
    sandbox = await (await client.post("/v1/sandboxes", json={}, headers=AUTH)).json()
    assert "python" in sandbox["languages"]
    resp = await client.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"code": "puts 1", "language": "rb"},
                             headers=AUTH)
    error = (await resp.json())["error"]
    assert error["code"] == "unsupported" and "'ruby'" in error["message"]
    assert "it runs: " in error["message"] and "python" in error["message"]
    done = await (await client.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"code": "print(7)", "language": "py"},
                                    headers=AUTH)).json()
    assert done["stdout"] == "7\n"


async def test_runtimes_list_their_languages(client: TestClient[Any, Any]) -> None:
    runtimes = (await (await client.get("/v1/runtimes", headers=AUTH)).json())["runtimes"]
    assert all(isinstance(r["languages"], dict) for r in runtimes)
