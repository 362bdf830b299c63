"""Soak: many well-behaved WebSocket sessions beside hostile tenants, for minutes.

    .venv/bin/python bench/soak.py [--sessions 200] [--minutes 5] [--hostile 3]

A real gateway (bench/_server.py, WASM) serves the polite tenant alone for `--baseline` minutes, then
both kinds of tenant for `--minutes`:
- `--sessions` polite sessions (tenant "bench"), one sandbox each, over msgpack WebSockets. Each
  loops: a small exec (timed), a file round trip (`PUT` then `GET` of 4 KiB over REST, timed), and
  every `--reconnect-every` rounds it drops its WebSocket and reconnects, re-attaching its last
  exec from sequence 0 (a replay).
- `--hostile` hostile tenants (tenant "hostile"), each one sandbox per attack, restarted whenever
  an attack ends: a flood of tiny frames (`print('x')` in a loop) read by a client; 60 kB lines to a
  client that never reads; a memory bomb; a one-shot JavaScript `while(true){}`; disk filled to its
  quota by guest code.
It prints and writes (bench/results/soak.json): errors by kind (the target is none), the polite
exec and file round trips' p50/p99, replays and lost ranges, the gateway's memory at the start, its
peak, and at the end, and the machine's load. Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections import Counter
from typing import Any

import aiohttp
import msgpack
from _common import AUTH, Gateway, LoadMonitor, banner, fmt_stats, stats_ms, write_results

HOSTILE_KEY = "bench-hostile-key"
HOSTILE_AUTH = {"Authorization": f"Bearer {HOSTILE_KEY}"}
SUBPROTOCOL = ("sandgate.v1.msgpack",)
DISK_MB = 64

#: Each hostile attack: the exec request, and whether its client reads what comes back.
ATTACKS: dict[str, tuple[dict[str, Any], bool]] = {
    "tiny_frames": ({"op": "exec.start", "language": "python",
                     "code": "while True:\n    print('x', flush=True)\n"}, True),
    "stalled_reader": ({"op": "exec.start", "language": "python",
                        "code": "import sys\nwhile True:\n    sys.stdout.write('y' * 60000 + '\\n')\n"}, False),
    "memory_bomb": ({"op": "exec.start", "language": "python",
                     "code": "hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))\n"}, True),
    "js_spin": ({"op": "exec.start", "language": "javascript", "code": "while (true) {}"}, True),
    "disk_fill": ({"op": "exec.start", "language": "python",
                   "code": "import os\nwith open('/work/fill', 'wb') as f:\n"
                           "    while True:\n        f.write(os.urandom(1 << 20))\n"}, True),
}


class Ws:
    """A msgpack WebSocket session to one sandbox."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, message: dict[str, Any]) -> int:
        self.next_id += 1
        await self.ws.send_bytes(msgpack.packb({"id": self.next_id, **message}, use_bin_type=True))
        return self.next_id

    async def receive(self) -> dict[str, Any]:
        msg = await self.ws.receive()
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise ConnectionError(f"websocket {msg.type.name}: {msg.data!r} {msg.extra!r}")
        return dict(msgpack.unpackb(msg.data, raw=False))

    async def until_end(self, rid: int) -> dict[str, Any]:
        """Events of request `rid` until its end (or its error reply); the end, with the exec id
        the first reply named under `exec_id`."""
        exec_id = None
        while True:
            m = await self.receive()
            if m.get("id") != rid:
                continue
            if isinstance(m.get("result"), dict):  # exec.attach's answer
                exec_id = m["result"].get("exec_id", exec_id)
            if m.get("ev") == "start":  # exec.start's first event
                exec_id = m.get("exec_id", exec_id)
            if m.get("ev") == "end" or ("error" in m and "ev" not in m):
                return {**m, "exec_id": exec_id}


class Tally:
    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}
        self.exec_s: list[float] = []
        self.file_s: list[float] = []
        self.rounds = 0
        self.reconnects = 0
        self.replays_lost = 0
        self.hostile_restarts: Counter[str] = Counter()

    def error(self, kind: str, detail: Any) -> None:
        self.errors[kind] += 1
        self.error_examples.setdefault(kind, str(detail)[:300])


async def polite(s: aiohttp.ClientSession, url: str, sid: str, index: int, deadline: float,
                 reconnect_every: int, tally: Tally) -> None:
    """One polite session until `deadline`."""
    body = os.urandom(4096)
    last_exec: str | None = None
    rounds = 0
    while time.monotonic() < deadline:
        try:
            async with s.ws_connect(f"{url}/v1/sandboxes/{sid}/ws", protocols=SUBPROTOCOL, headers=AUTH,
                                    heartbeat=None) as raw:
                ws = Ws(raw)
                if rounds:  # a reconnect: replay the last exec from its start
                    tally.reconnects += 1
                    if last_exec is None:
                        tally.error("no exec id", "exec.start's start event named no exec_id")
                    else:
                        rid = await ws.send({"op": "exec.attach", "exec_id": last_exec, "from_seq": 0})
                        end = await ws.until_end(rid)
                        if "error" in end and "ev" not in end:
                            tally.error("attach", end)
                for _ in range(reconnect_every):
                    if time.monotonic() >= deadline:
                        return
                    t0 = time.perf_counter()
                    code = f"print({index} + {rounds})"
                    rid = await ws.send({"op": "exec.start", "language": "python", "code": code})
                    end = await ws.until_end(rid)
                    if end.get("ev") != "end" or end.get("exit_code") != 0:
                        tally.error("exec", end)
                    else:
                        tally.exec_s.append(time.perf_counter() - t0)
                    last_exec = end["exec_id"] or last_exec
                    t0 = time.perf_counter()
                    async with s.put(f"{url}/v1/sandboxes/{sid}/files/round.bin", data=body, headers=AUTH) as r:
                        if r.status != 201:
                            tally.error(f"put {r.status}", await r.text())
                            continue
                    async with s.get(f"{url}/v1/sandboxes/{sid}/files/round.bin", headers=AUTH) as r:
                        got = await r.read()
                        if r.status != 200 or got != body:
                            tally.error(f"get {r.status}", got[:200])
                            continue
                    tally.file_s.append(time.perf_counter() - t0)
                    rounds += 1
                    tally.rounds += 1
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            tally.error(type(exc).__name__, exc)


async def hostile(s: aiohttp.ClientSession, url: str, name: str, deadline: float, tally: Tally) -> None:
    """One attack, run again in a fresh sandbox whenever it ends, until `deadline`."""
    request, reads = ATTACKS[name]
    while time.monotonic() < deadline:
        async with s.post(f"{url}/v1/sandboxes", json={"runtime": "wasm", "cpu_seconds": 60, "disk_mb": 16},
                          headers=HOSTILE_AUTH) as r:
            if r.status != 201:
                tally.error(f"hostile create {r.status}", await r.text())
                return
            sid = (await r.json())["id"]
        try:
            async with s.ws_connect(f"{url}/v1/sandboxes/{sid}/ws", protocols=SUBPROTOCOL,
                                    headers=HOSTILE_AUTH, heartbeat=None) as raw:
                ws = Ws(raw)
                rid = await ws.send(request)
                if reads:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                            await ws.until_end(rid)
                else:
                    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        except (aiohttp.ClientError, ConnectionError) as exc:
            tally.error(f"hostile {name} {type(exc).__name__}", exc)
        finally:
            async with s.delete(f"{url}/v1/sandboxes/{sid}", headers=HOSTILE_AUTH):
                pass
        tally.hostile_restarts[name] += 1


async def memory_sampler(gw: Gateway, s: aiohttp.ClientSession, stop: asyncio.Event, peaks: list[int]) -> None:
    while not stop.is_set():
        state = await gw.state(s)
        peaks.append(int(state["gateway_rss_kb"]))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)


async def run(sessions: int, minutes: float, baseline: float, hostile_n: int, reconnect_every: int) -> dict[str, Any]:
    attacks = list(ATTACKS)[:hostile_n] if hostile_n <= len(ATTACKS) else list(ATTACKS)
    # Every session and its REST calls come from 127.0.0.1: no per-address bound. /work is memory
    # (a tmpfs) on WASM, and 200 sandboxes at the default 512 MB would promise more than the host has.
    settings = {"max_sandboxes": sessions + 10, "creates_per_minute": 100_000,
                "api_keys_extra": {HOSTILE_KEY: "hostile"}, "limits": {"disk_mb": DISK_MB},
                "runtimes": {"wasm": {"pool_size": 2, "pool_refill_per_s": 4.0, "disk_mb": DISK_MB}},
                "settings": {"max_connections_per_address": 0}}
    out: dict[str, Any] = {"sessions": sessions, "minutes": minutes, "attacks": attacks,
                           "reconnect_every": reconnect_every}
    async with Gateway(settings) as gw:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
            sem = asyncio.Semaphore(8)

            async def create() -> str:
                async with sem, s.post(f"{gw.url}/v1/sandboxes", json={"runtime": "wasm"}, headers=AUTH) as r:
                    assert r.status == 201, await r.text()
                    return str((await r.json())["id"])

            t0 = time.monotonic()
            sids = await asyncio.gather(*(create() for _ in range(sessions)))
            out["create_all_s"] = round(time.monotonic() - t0, 1)
            start = await gw.state(s)
            out["gateway_rss_mb_start"] = round(start["gateway_rss_kb"] / 1024, 1)
            print(f"   {sessions} sandboxes ready in {out['create_all_s']} s; gateway RSS "
                  f"{out['gateway_rss_mb_start']} MB; soaking {minutes:g} min beside {attacks}")
            # Phase 1, the polite sessions alone: the figures to compare with. Phase 2, the same
            # beside the hostile tenants.
            for phase, phase_minutes, phase_attacks in (("idle", baseline, []), ("attacked", minutes, attacks)):
                tally = Tally()
                deadline = time.monotonic() + phase_minutes * 60
                stop = asyncio.Event()
                peaks: list[int] = []
                sampler = asyncio.create_task(memory_sampler(gw, s, stop, peaks))
                load = LoadMonitor()
                await asyncio.gather(
                    *(polite(s, gw.url, sid, i, deadline, reconnect_every, tally) for i, sid in enumerate(sids)),
                    *(hostile(s, gw.url, name, deadline, tally) for name in phase_attacks),
                )
                stop.set()
                await sampler
                out[phase] = {"minutes": phase_minutes, "load": load.read(), "errors": dict(tally.errors),
                              "error_examples": tally.error_examples, "rounds": tally.rounds,
                              "reconnects": tally.reconnects, "hostile_restarts": dict(tally.hostile_restarts),
                              "exec": stats_ms(tally.exec_s), "file_round_trip": stats_ms(tally.file_s),
                              "gateway_rss_mb_peak": round(max(peaks, default=0) / 1024, 1)}
            end = await gw.state(s)
            out["gateway_rss_mb_end"] = round(end["gateway_rss_kb"] / 1024, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--baseline", type=float, default=1.0, help="minutes of polite sessions alone first")
    p.add_argument("--hostile", type=int, default=len(ATTACKS), help=f"how many of the {len(ATTACKS)} attacks")
    p.add_argument("--reconnect-every", type=int, default=20, help="rounds between reconnects")
    args = p.parse_args()
    banner("soak: polite sessions beside hostile tenants")
    result = asyncio.run(run(args.sessions, args.minutes, args.baseline, args.hostile, args.reconnect_every))
    for phase in ("idle", "attacked"):
        r = result[phase]
        print(f"-- {phase} ({r['minutes']:g} min)")
        print(fmt_stats("polite exec round trip", r["exec"]))
        print(fmt_stats("polite file round trip (4 KiB PUT+GET)", r["file_round_trip"]))
        print(f"   rounds {r['rounds']}, reconnects {r['reconnects']}, hostile restarts {r['hostile_restarts']}")
        print(f"   errors {r['errors'] or 'none'}")
        for kind, example in r["error_examples"].items():
            print(f"     {kind}: {example}")
        print(f"   gateway RSS peak {r['gateway_rss_mb_peak']} MB; load {r['load']}")
    print(f"   gateway RSS at start {result['gateway_rss_mb_start']} MB, at end {result['gateway_rss_mb_end']} MB")
    write_results("soak", result)


if __name__ == "__main__":
    main()
