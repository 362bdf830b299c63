"""`python -m gateway.protocol`: regenerate what is derived from the op schema.

Writes gateway/web/js/protocol.js (the JavaScript client's copy of the schema) and the op table
in docs/protocol.md. tests/protocol/test_schema.py fails when they are stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from gateway.protocol.client import protocol_js
from guest_agent.schema import markdown_tables

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "gateway" / "web" / "js" / "protocol.js"
DOC = ROOT / "docs" / "protocol.md"
#: The op table in docs/protocol.md sits between these markers.
BEGIN, END = "<!-- op-table: begin -->", "<!-- op-table: end -->"


def docs_with_table(doc: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    return pattern.sub(lambda _: f"{BEGIN}\n{markdown_tables()}\n{END}", doc)


def main() -> None:
    JS.write_text(protocol_js())
    DOC.write_text(docs_with_table(DOC.read_text()))
    print(f"wrote {JS.relative_to(ROOT)} and the op table in {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
