"""Rich output of Python execs (guest_agent/display.py): display events with MIME bundles."""

from __future__ import annotations

import base64
import json
from typing import Any

from guest_agent.schema import MAX_DISPLAY_BYTES, MAX_EXEC_DISPLAY_BYTES, check_display
from tests.guest_agent.agent_harness import AgentClient, Result

RICH = '''
class Rich:
    def __repr__(self):
        return "Rich()"
    def _repr_html_(self):
        return "<b>rich</b>"
    def _repr_png_(self):
        return b"\\x89PNG\\r\\n\\x1a\\n-not-really"
    def _repr_json_(self):
        return {"a": [1, 2]}
'''


def displays(result: Result) -> list[dict[str, Any]]:
    """The bundles of a finished exec, each checked as the gateway checks them."""
    bundles = [e["bundle"] for e in result.events if e["ev"] == "display"]
    for bundle in bundles:
        check_display(bundle)
    return bundles


def test_last_expression_with_rich_reprs_is_displayed_not_printed(client: AgentClient) -> None:
    result = client.python(RICH + "print('before')\nRich()")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "before\n"
    [bundle] = displays(result)
    assert bundle["text/plain"] == "Rich()"
    assert bundle["text/html"] == "<b>rich</b>"
    assert base64.b64decode(bundle["image/png"]) == b"\x89PNG\r\n\x1a\n-not-really"
    assert json.loads(bundle["application/json"]) == {"a": [1, 2]}
    kinds = [(e["ev"], e.get("fd")) for e in result.events]
    assert kinds.index(("data", "stdout")) < kinds.index(("display", None)), "output keeps its order"


def test_plain_values_and_classes_are_printed_as_before(client: AgentClient) -> None:
    result = client.python(RICH + "Rich")  # a class: its _repr_html_ wants an instance
    assert (result.stdout, displays(result)) == ("<class '__main__.Rich'>\n", [])
    assert displays(client.python("[1, 2]")) == []


def test_display_builtin_in_order_with_print(client: AgentClient) -> None:
    result = client.python(RICH + "print('a')\ndisplay(Rich(), 42)\nprint('b')\n"
                           "display({'text/html': '<i>x</i>', 'image/png': b'\\x89PNG'}, raw=True)")
    assert result.exit_code == 0, result.stderr
    assert [e["ev"] for e in result.events] == ["start", "data", "display", "display", "data", "display", "end"]
    rich, plain, raw = displays(result)
    assert rich["text/html"] == "<b>rich</b>"
    assert plain == {"text/plain": "42"}
    assert raw == {"text/html": "<i>x</i>", "image/png": base64.b64encode(b"\x89PNG").decode(), "text/plain": ""}


def test_mimebundle_and_a_failing_repr(client: AgentClient) -> None:
    code = '''
class M:
    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/markdown": "# hi", "application/vnd.custom+json": {"k": 1}}, {}
    def _repr_html_(self):
        raise ValueError("no html today")
M()
'''
    result = client.python(code)
    [bundle] = displays(result)
    assert bundle["text/markdown"] == "# hi"
    assert json.loads(bundle["application/vnd.custom+json"]) == {"k": 1}
    assert "text/html" not in bundle
    assert "M._repr_html_() raised ValueError: no html today" in result.stderr


def test_a_bundle_too_large_keeps_its_text(client: AgentClient) -> None:
    code = f"display({{'text/html': 'x' * {MAX_DISPLAY_BYTES}, 'text/plain': 'big'}}, raw=True)"
    result = client.python(code)
    assert displays(result) == [{"text/plain": "big"}]
    assert "only its text/plain is sent" in result.stderr


def test_an_exec_displays_a_bounded_total(client: AgentClient) -> None:
    count = MAX_EXEC_DISPLAY_BYTES // (MAX_DISPLAY_BYTES // 2) + 2
    code = f"for i in range({count}):\n    display({{'text/html': 'x' * {MAX_DISPLAY_BYTES // 2}}}, raw=True)"
    result = client.python(code)
    shown = displays(result)
    assert 0 < len(shown) < count
    assert sum(len(b["text/html"]) for b in shown) <= MAX_EXEC_DISPLAY_BYTES
    assert result.stderr.count("further output to display is dropped") == 1
