"""The agent's own diagnostics: to the stderr it was started with, never to an exec's streams."""

from __future__ import annotations

import sys
from typing import TextIO

# Taken at import, before the agent swaps sys.stderr (and, on WASI, sys.__stderr__) for proxies.
_stream: TextIO | None = sys.__stderr__ or sys.stderr


def log(text: str) -> None:
    if _stream is None:
        return
    try:
        _stream.write(f"sandgate-agent: {text}\n")
        _stream.flush()
    except (OSError, ValueError):
        pass


def log_exception(context: str) -> None:
    import traceback  # only when something failed; it costs every WASM sandbox start otherwise

    log(f"{context}\n{traceback.format_exc().rstrip()}")
