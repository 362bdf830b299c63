"""`sandgate`: serve the gateway, build runtime images, serve MCP, print the version."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway import __version__


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.config import load_settings
    from gateway.web.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.config, host=args.host, port=args.port).with_generated_key_if_needed()
    if settings.generated_key is not None:
        print(
            f"sandgate {__version__}: no API keys configured, serving on loopback only.\n"
            f"  API key for this run (tenant 'default'): {settings.generated_key}\n"
            f"  try: curl -H 'Authorization: Bearer {settings.generated_key}' "
            f"http://{settings.host}:{settings.port}/v1/runtimes",
            flush=True,
        )
    # run_app turns SIGINT/SIGTERM into a graceful shutdown: sessions closed, every sandbox destroyed.
    web.run_app(create_app(settings), host=settings.host, port=settings.port, print=_ready_line,
                shutdown_timeout=30.0)
    return 0


def _ready_line(text: str) -> None:
    print(text.strip(), flush=True)


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

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
