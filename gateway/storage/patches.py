"""`"patches"` and `"files"` of a create request: checked at admission, applied before hand-out.

Both are applied through the sandbox's agent (`fs.patch`, `fs.write`), after its hello and before
the create answers, so the first exec sees them and a sandbox from a warm pool can have them too:
patches first, in order (on a microVM or pod they may touch the whole root file system, on WASM
its preopens), then the files. A patch or file that fails fails the create, and the sandbox is
destroyed: a half-patched sandbox is never handed out.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gateway.protocol.paths import check_path
from guest_agent import schema
from guest_agent.wire import MAX_WRITE_CHUNK, ProtocolError

MAX_PATCHES = 256
MAX_FILES = 256
#: A patch in the create body names its action `op` (the REST contract); fs.patch calls it `action`.
_PATCH_FIELDS = {"op", "path", "text", "base64", "src", "target", "mode"}

#: `request(op, args)`: one agent request of the sandbox being created.
Request = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def _decode(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError("bad_request", f"{where}: 'base64' is a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_request", f"{where}: 'base64' is not valid base64") from None


def parse_patches(value: Any) -> tuple[dict[str, Any], ...]:
    """The create body's `patches` as checked fs.patch arguments."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PATCHES:
        raise ProtocolError("bad_request", f"'patches' is a list of at most {MAX_PATCHES} patches")
    patches = []
    for i, item in enumerate(value):
        where = f"patches[{i}]"
        if not isinstance(item, Mapping) or set(item) - _PATCH_FIELDS:
            raise ProtocolError("bad_request", f"{where}: a patch has the fields {sorted(_PATCH_FIELDS)}")
        message: dict[str, Any] = {k: v for k, v in item.items() if k not in ("op", "base64")}
        message["action"] = item.get("op")
        if "base64" in item:
            message["data"] = _decode(item["base64"], where)
        try:
            args = schema.parse({**message, "id": 0, "op": "fs.patch"}, schema.CLIENT).args
            for name in ("path", "src"):
                if name in args:
                    check_path(args[name], allow_absolute=True)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"{where}: {exc.message}") from None
        patches.append(args)
    return tuple(patches)


def parse_files(value: Any) -> tuple[tuple[str, bytes], ...]:
    """The create body's `files` ({path: text | {"base64": ...}}) as (path, bytes) pairs."""
    if value is None:
        return ()
    if not isinstance(value, Mapping) or len(value) > MAX_FILES:
        raise ProtocolError("bad_request", f"'files' maps at most {MAX_FILES} paths to their text or {{\"base64\"}}")
    files = []
    for path, content in value.items():
        where = f"files[{path!r:.100}]"
        try:
            check_path(path, allow_absolute=True)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"{where}: {exc.message}") from None
        if path.endswith("/"):
            raise ProtocolError("bad_request", f"{where}: a file's path does not end with '/'")
        if isinstance(content, str):
            data = content.encode("utf-8")
        elif isinstance(content, Mapping) and set(content) == {"base64"}:
            data = _decode(content["base64"], where)
        else:
            raise ProtocolError("bad_request", f"{where}: a file is its text, or {{\"base64\": ...}}")
        files.append((path, data))
    return tuple(files)


async def apply(request: Request, patches: tuple[dict[str, Any], ...], files: tuple[tuple[str, bytes], ...]) -> None:
    """Apply the patches, then write the files, through the new sandbox's agent. The error of the
    first that fails names it."""
    for i, patch in enumerate(patches):
        try:
            await request("fs.patch", dict(patch))
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"patches[{i}] ({patch['action']} {patch['path']!r:.100}): "
                                          f"{exc.message}") from None
    for path, data in files:
        try:
            head = path.rpartition("/")[0]
            if head:
                await request("fs.mkdir", {"path": head, "parents": True})
            offset = 0
            await request("fs.write", {"path": path, "data": data[:MAX_WRITE_CHUNK], "truncate": True})
            offset = MAX_WRITE_CHUNK
            while offset < len(data):
                await request("fs.write", {"path": path, "data": data[offset:offset + MAX_WRITE_CHUNK],
                                           "offset": offset})
                offset += MAX_WRITE_CHUNK
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"files[{path!r:.100}]: {exc.message}") from None
