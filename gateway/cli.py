"""`sandgate`: serve the gateway, build runtime images, serve MCP, call a running gateway (invoke,
test, functions, executions, cache: gateway/cli_client.py), print the version."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.cli_client import add_parsers as add_client_parsers
from gateway.config import ConfigError

if TYPE_CHECKING:
    from gateway.runtime.base import Runtime

#: What binding the configured host and port can fail with: the setting's fault, not the gateway's.
BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


def _serve(args: argparse.Namespace) -> int:
    from gateway.config import check_runtime_tables, load_settings
    from gateway.web.app import MANAGER, create_app
    from gateway.web.connections import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.config, host=args.host, port=args.port).with_generated_key_if_needed()
    # The [runtimes.<id>] tables come from the file only, so their errors name it.
    where = f"{args.config}: " if args.config else ""
    try:
        app = create_app(settings)
    except ValueError as exc:  # a runtime refusing its table in its constructor
        raise ConfigError(f"{where}{exc}") from None
    try:
        check_runtime_tables(settings, app[MANAGER].runtimes)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None

    def ready(text: str) -> None:
        # Called once listening: a gateway that cannot listen never shows a key it will not honour.
        if settings.generated_key is not None:
            print(
                f"sandgate {__version__}: no API keys configured, serving on loopback only.\n"
                f"  API key for this run (tenant 'default'): {settings.generated_key}\n"
                f"  try: curl -H 'Authorization: Bearer {settings.generated_key}' "
                f"http://{settings.host}:{settings.port}/v1/runtimes",
            )
        print(text.strip(), flush=True)

    # SIGINT/SIGTERM are a graceful shutdown: sessions closed, every sandbox destroyed. Served through
    # the connection guard (gateway/web/connections.py): head and idle timeouts, a bound per address.
    try:
        asyncio.run(serve(app, settings, ready, shutdown_timeout=30.0))
    except OSError as exc:
        if isinstance(exc, socket.gaierror):
            reason = exc.strerror
        elif exc.errno in BIND_ERRORS:
            reason = os.strerror(exc.errno)
        else:
            raise
        raise ConfigError(f"cannot listen on {settings.host} port {settings.port}: {reason}") from None
    return 0


def _runtimes_for_images(args: argparse.Namespace) -> list[tuple[type[Runtime], dict[str, Any]]] | None:
    """The runtime classes `sandgate images <command>` works on (args.runtime, or every installed
    one), each with its `[runtimes.<id>]` table and `--templates` as its templates_file; None
    (after saying why) for an unknown runtime, or --templates without one."""
    from gateway.config import load_settings
    from gateway.plugins import collect_runtimes, get_plugin_manager

    if args.runtime is None and args.templates is not None:
        print(f"sandgate images {args.images_command}: --templates needs a runtime (microvm)", file=sys.stderr)
        return None
    settings = load_settings(args.config)
    registry = collect_runtimes(get_plugin_manager(blocked=settings.blocked_plugins))
    ids = registry.ids() if args.runtime is None else [args.runtime]
    if args.runtime is not None and args.runtime not in registry:
        print(f"unknown runtime {args.runtime!r}; installed: {', '.join(registry.ids())}", file=sys.stderr)
        return None
    out = []
    for runtime_id in ids:
        config = dict(settings.runtimes.get(runtime_id, {}))
        if args.templates is not None:
            config["templates_file"] = args.templates
        out.append((registry.get(runtime_id), config))
    return out


def _images_build(args: argparse.Namespace) -> int:
    from plugins.common import TerminalProgress

    found = _runtimes_for_images(args)
    if found is None:
        return 2
    [(runtime, config)] = found
    try:
        lines = runtime.build_images(config, args.template, TerminalProgress())
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"sandgate images build {args.runtime}: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line, flush=True)
    return 0


def _megabytes(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"


def _images_ls(args: argparse.Namespace) -> int:
    found = _runtimes_for_images(args)
    if found is None:
        return 2
    rows = [("RUNTIME", "NAME", "STATE", "IMAGE", "SNAPSHOT", "TOTAL", "PATH")]
    for runtime, config in found:
        try:
            entries = runtime.cached_images(config)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"sandgate images ls {runtime.id}: {exc}", file=sys.stderr)
            return 1
        for entry in entries:
            other = {k: v for k, v in entry.sizes.items() if k not in ("image", "snapshot")}
            rows.append((runtime.id, entry.name, "current" if entry.current else "unused",
                         _megabytes(entry.sizes.get("image", 0) + sum(other.values())),
                         _megabytes(entry.sizes.get("snapshot", 0)), _megabytes(entry.total), str(entry.path)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def _images_prune(args: argparse.Namespace) -> int:
    found = _runtimes_for_images(args)
    if found is None:
        return 2
    total = 0
    for runtime, config in found:
        try:
            gone, freed = runtime.prune_images(config)
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"sandgate images prune {runtime.id}: {exc}", file=sys.stderr)
            return 1
        for entry in gone:
            print(f"{runtime.id}: removed {entry.name} {entry.path}")
        print(f"{runtime.id}: freed {_megabytes(freed)}")
        total += freed
    if len(found) > 1:
        print(f"freed {_megabytes(total)} in all")
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"sandgate {__version__}")
    return 0


def _mcp(args: argparse.Namespace) -> int:
    try:
        from gateway.mcp import main
    except ImportError as exc:  # the `mcp` extra is not installed
        print(f"sandgate mcp needs the MCP SDK: pip install 'sandgate[mcp]' ({exc})", file=sys.stderr)
        return 2
    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandgate", description="A gateway for running untrusted code.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8080)")
    serve.add_argument("--config", default=None, help="a TOML settings file (README: Configuration)")
    serve.set_defaults(func=_serve)

    images = sub.add_parser("images", help="build, list and prune runtime images")
    images_sub = images.add_subparsers(dest="images_command", required=True)
    templates_help = ("a templates file of your own, on top of the runtime's (as [runtimes.<id>] templates_file; "
                      "microvm)")
    build = images_sub.add_parser("build", help="build (and cache) what a runtime needs")
    build.add_argument("runtime", help="the runtime id (wasm, microvm, ...)")
    build.add_argument("--template", default=None, help="one template of the runtime (default: all it declares)")
    build.add_argument("--templates", default=None, metavar="FILE", help=templates_help)
    build.add_argument("--config", default=None, help="a TOML settings file (README: Configuration)")
    build.set_defaults(func=_images_build)
    for name, func, what in (("ls", _images_ls, "list the cached images, their sizes and whether they are current"),
                             ("prune", _images_prune, "remove the cached images no current template uses")):
        command = images_sub.add_parser(name, help=what)
        command.add_argument("runtime", nargs="?", default=None, help="one runtime id (default: every installed one)")
        command.add_argument("--templates", default=None, metavar="FILE", help=templates_help)
        command.add_argument("--config", default=None, help="a TOML settings file (README: Configuration)")
        command.set_defaults(func=func)

    mcp = sub.add_parser("mcp", help="serve the Model Context Protocol (stdio, or --http) as a gateway client")
    mcp.add_argument("--url", default=None, help="the gateway (default $SANDGATE_URL, then http://127.0.0.1:8080)")
    mcp.add_argument("--api-key", default=None, help="the gateway API key (default $SANDGATE_API_KEY, preferred: "
                                                     "a flag shows in the process list)")
    mcp.add_argument("--runtime", default=None, help="runtime for create_sandbox when the agent names none")
    mcp.add_argument("--http", action="store_true", help="streamable HTTP at http://HOST:PORT/mcp instead of stdio")
    mcp.add_argument("--host", default="127.0.0.1", help="--http: address (loopback only; default 127.0.0.1)")
    mcp.add_argument("--port", type=int, default=8000, help="--http: port (default 8000)")
    mcp.set_defaults(func=_mcp)

    add_client_parsers(sub)  # invoke, test, functions, executions, cache: calls on a running gateway

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status. A bad setting is one line on stderr and status 2, the
    status argparse gives a bad argument, and never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"sandgate {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
