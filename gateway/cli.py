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

from gateway import __version__
from gateway.cli_client import add_parsers as add_client_parsers
from gateway.config import ConfigError

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


def _images_build(args: argparse.Namespace) -> int:
    from gateway.config import load_settings
    from gateway.plugins import collect_runtimes, get_plugin_manager
    from plugins.common import TerminalProgress

    settings = load_settings(args.config)
    registry = collect_runtimes(get_plugin_manager(blocked=settings.blocked_plugins))
    if args.runtime not in registry:
        print(f"unknown runtime {args.runtime!r}; installed: {', '.join(registry.ids())}", file=sys.stderr)
        return 2
    runtime = registry.get(args.runtime)
    try:
        lines = runtime.build_images(settings.runtimes.get(args.runtime, {}), args.template, TerminalProgress())
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"sandgate images build {args.runtime}: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line, flush=True)
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

    images = sub.add_parser("images", help="build runtime images")
    images_sub = images.add_subparsers(dest="images_command", required=True)
    build = images_sub.add_parser("build", help="build (and cache) what a runtime needs")
    build.add_argument("runtime", help="the runtime id (wasm, microvm, ...)")
    build.add_argument("--template", default=None, help="one template of the runtime (default: all it declares)")
    build.add_argument("--config", default=None, help="a TOML settings file (README: Configuration)")
    build.set_defaults(func=_images_build)

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
