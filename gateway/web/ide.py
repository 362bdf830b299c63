"""The browser IDE page at `/` and the static files it needs, among them the JavaScript client.

The page and the client are plain files in this package; xterm.js and msgpack come from the npm
registry (`npm ci` in gateway/web, run by .ci/setup) and are served from node_modules, never copied
into the repository. A missing node_modules is not an error for the page: it says that the terminal
needs `npm ci` and works without it.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from guest_agent.wire import ProtocolError

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
#: The JavaScript client and its generated protocol module, served beside the page's files.
CLIENT = {name: HERE / "js" / name for name in ("sandgate.js", "protocol.js")}
NODE_MODULES = HERE / "node_modules"
#: URL folder under /static/vendor/ -> (package folder under node_modules, files served from it).
VENDOR = {
    "xterm": ("@xterm/xterm", {"xterm.mjs": "lib/xterm.mjs", "xterm.css": "css/xterm.css"}),
    "xterm-fit": ("@xterm/addon-fit", {"addon-fit.mjs": "lib/addon-fit.mjs"}),
    # msgpack's ES build is a tree of modules importing each other by relative path: the folder is served.
    "msgpack": ("@msgpack/msgpack/dist.esm", None),
}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
                 ".png": "image/png", ".svg": "image/svg+xml"}

#: The page runs only its own scripts and talks only to its own origin (REST and WebSocket). Styles
#: allow 'unsafe-inline' because xterm.js sets its theme through a <style> element it creates. Frames:
#: its own origin only, for the preview of a published port (a sandboxed iframe: gateway/ports).
CSP = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self' 'unsafe-inline'", "img-src 'self' data: blob:",
    "connect-src 'self'", "font-src 'self'", "frame-src 'self'", "base-uri 'none'", "form-action 'none'",
    "frame-ancestors 'none'",
])
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _file(path: Path) -> web.FileResponse:
    content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    return web.FileResponse(path, headers={"Content-Type": f"{content_type}; charset=utf-8"
                                           if content_type.startswith("text/") else content_type,
                                           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


async def page(request: web.Request) -> web.StreamResponse:
    response = _file(STATIC / "index.html")
    response.headers.update(PAGE_HEADERS)
    return response


async def static(request: web.Request) -> web.StreamResponse:
    """The page's own files (one folder, no subfolders) and the JavaScript client."""
    name = request.match_info["name"]
    if name in CLIENT:
        return _file(CLIENT[name])
    path = STATIC / name
    if "/" in name or name.startswith(".") or name == "index.html" or not path.is_file():
        raise ProtocolError("not_found", f"no static file {name!r}")
    return _file(path)


async def vendor(request: web.Request) -> web.StreamResponse:
    """A file of an npm package from node_modules, from an allowlist."""
    package, path = request.match_info["package"], request.match_info["path"]
    if package not in VENDOR:
        raise ProtocolError("not_found", f"no vendored package {package!r}")
    folder, files = VENDOR[package]
    root = (NODE_MODULES / folder).resolve()
    if files is not None:
        if path not in files:
            raise ProtocolError("not_found", f"{package} has no file {path!r} here")
        target = (root / files[path]).resolve()
    else:
        target = (root / path).resolve()
        if not target.is_relative_to(root) or target.suffix not in (".mjs", ".map"):
            raise ProtocolError("not_found", f"{package} has no file {path!r} here")
    if not target.is_file():
        raise ProtocolError("not_found", f"{folder} is not installed: run `npm ci` in gateway/web (bash .ci/setup)")
    return _file(target)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", page)
    app.router.add_get("/static/vendor/{package}/{path:.+}", vendor)
    app.router.add_get("/static/{name}", static)
