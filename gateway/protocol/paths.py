"""The gateway's check of sandbox paths, before anything reaches an agent (sans-I/O).

The agent checks again against the real file system (symlinks); this check refuses what no file
system lookup should even see: `..` segments, NUL and control characters, and on REST any absolute
path (REST paths are relative to the sandbox's root).
"""

from __future__ import annotations

from guest_agent.wire import ProtocolError

MAX_PATH = 4096
#: The longest name of one path component, in bytes (Linux NAME_MAX): longer is no file name at all.
MAX_NAME = 255


def check_path(path: str, *, allow_absolute: bool) -> str:
    """`path` if it is acceptable, else ProtocolError('path_escape' or 'bad_request')."""
    if not path or len(path) > MAX_PATH:
        raise ProtocolError("bad_request", f"a path must be 1..{MAX_PATH} characters")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise ProtocolError("path_escape", "control characters are not allowed in paths")
    if path.startswith("/") and not allow_absolute:
        raise ProtocolError("path_escape", "paths are relative to the sandbox's root")
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        raise ProtocolError("path_escape", "'..' is not allowed in paths")
    try:
        longest = max(len(part.encode("utf-8")) for part in parts)
    except UnicodeEncodeError:  # a lone surrogate (from a percent-escaped URL, say)
        raise ProtocolError("bad_request", "a path must be valid Unicode text") from None
    if longest > MAX_NAME:
        raise ProtocolError("bad_request", f"a path component is at most {MAX_NAME} bytes")
    return path
