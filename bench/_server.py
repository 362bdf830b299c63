"""The gateway under test, in its own process: `python bench/_server.py '<settings json>'`.

It builds the app with `gateway.web.app.create_app(Settings(...))`, serves it with aiohttp's
AppRunner/TCPSite on 127.0.0.1 and a free port, prints `READY <port> <pid>`, and stops gracefully
(every sandbox destroyed) on SIGTERM/SIGINT or when its stdin closes.

The bench adds one read-only route, `GET /_bench/state`: this process's pid and memory, the WASM
warm pool's fill (`app[MANAGER].runtimes["wasm"].pool.ready`, and every runtime's under `pools`),
each sandbox's launcher pid (`app[MANAGER].get(tenant, id).backend.launcher.proc.pid`) and a
microVM's QEMU memory. Nothing in the gateway is changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

from _common import smaps_rollup

KEY = "bench-key"
TENANT = "bench"


def build_settings(raw: Mapping[str, Any]) -> Any:
    from gateway.config import Limits, NetworkAccess, Quotas, Settings, Storage

    wasm: dict[str, Any] = {"pool_size": int(raw.get("pool_size", 0)),
                            "pool_refill_per_s": float(raw.get("refill_per_s", 4.0))}
    limits = Limits(**raw.get("limits", {}))
    return Settings(
        api_keys={KEY: TENANT, **raw.get("api_keys_extra", {})},  # more tenants (bench/soak.py)
        quotas=Quotas(max_sandboxes=int(raw.get("max_sandboxes", 200)),
                      creates_per_minute=int(raw.get("creates_per_minute", 100_000))),
        limits=limits,
        runtimes={"wasm": wasm, **raw.get("runtimes", {})},
        # Only the runtimes a bench names: another's warm pool would share the CPU being measured.
        blocked_plugins=tuple(raw.get("blocked", ("microvm", "pod"))),
        client_send_timeout_s=float(raw.get("client_send_timeout_s", 30.0)),
        storage=Storage(**raw.get("storage", {})),
        network=NetworkAccess(**raw.get("network", {})),  # name servers and CA of a test upstream
        **raw.get("settings", {}),  # any other Settings field, as is (bench/soak.py)
    )


def _memory(pid: int) -> dict[str, int]:
    try:
        return smaps_rollup(pid)
    except OSError:
        return {}


async def main() -> None:
    from aiohttp import web

    from gateway.web.app import MANAGER, create_app

    if os.environ.get("BENCH_PATCH"):  # bench-only instrumentation (bench/_patches.py)
        from _patches import apply

        print(f"server: patched {apply(os.environ['BENCH_PATCH'])}", file=sys.stderr, flush=True)

    settings = build_settings(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
    app = create_app(settings)

    async def state(request: web.Request) -> web.Response:
        manager = request.app[MANAGER]
        wasm = manager.runtimes.get("wasm")
        pool = getattr(wasm, "pool", None)
        sandboxes = []
        for sandbox in manager.all():
            launcher = getattr(sandbox.backend, "launcher", None)
            pid = launcher.proc.pid if launcher is not None and launcher.proc.returncode is None else None
            vm = getattr(sandbox.backend, "vm", None)  # a microVM's QEMU: its RSS and PSS
            sandboxes.append({"id": sandbox.id, "state": sandbox.state, "launcher_pid": pid,
                              "memory": dict(vm.memory()) if vm is not None else None})
        pool_pids = [b.launcher.proc.pid for b in (pool.ready if pool is not None else []) if b.launcher]
        kb = _memory(os.getpid())
        return web.json_response({
            "pid": os.getpid(),
            "pool_ready": len(pool.ready) if pool is not None else 0,
            "pool_pids": pool_pids,
            "pools": {rid: len(rt.pool.ready) for rid, rt in manager.runtimes.items() if hasattr(rt, "pool")},
            "sandboxes": sandboxes,
            "gateway_rss_kb": kb.get("Rss", 0),
            "gateway_pss_kb": kb.get("Pss", 0),
            "gateway_private_kb": kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0),
        })

    async def trace(request: web.Request) -> web.Response:
        import _patches

        marks = list(_patches.TRACE)
        _patches.TRACE.clear()
        return web.json_response({"marks": marks})

    app.router.add_get("/_bench/state", state)
    app.router.add_get("/_bench/trace", trace)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"READY {port} {os.getpid()}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def stdin_closed() -> None:
        sys.stdin.buffer.read()  # blocks until EOF
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(stop.set)

    # A daemon thread, not the loop's executor: asyncio.run would wait for it at exit.
    threading.Thread(target=stdin_closed, name="stdin-watch", daemon=True).start()
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="server %(levelname)s %(name)s: %(message)s")
    profile_to = os.environ.get("BENCH_PROFILE")  # bench/profile_gateway.py: cProfile the gateway
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            asyncio.run(main())
        finally:
            profiler.disable()
            profiler.dump_stats(profile_to)
    elif os.environ.get("BENCH_UVLOOP"):  # opt-in: the same gateway on uvloop's loop (not a dependency)
        import uvloop  # type: ignore[import-not-found]  # not a dependency: an isolated install

        uvloop.run(main())
    else:
        asyncio.run(main())
    os._exit(0)  # the stdin-watching thread may still block
