"""Run every benchmark, then print one table of the figures against their targets.

    .venv/bin/python bench/run_all.py [--quick] [--only name,name] [--skip name,name]

Each benchmark runs as its own process (`.venv/bin/python bench/<name>.py`) and writes
bench/results/<name>.json; the table below is read back from those files. `--quick` uses
smaller sample counts (a smoke run, not the published figures).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from _common import BENCH, PYTHON, RESULTS, ROOT, machine_info, verdict

BENCHES: dict[str, tuple[list[str], list[str]]] = {
    # name: (full args, quick args)
    "create_latency": ([], ["--n", "10"]),
    "exec_latency": ([], ["--n", "300", "--warmup", "50"]),
    "stream_throughput": ([], ["--mb", "50", "--runs", "1"]),
    "idle_memory": ([], ["--n", "5"]),
    "concurrency": ([], ["--n", "20"]),
    "profile_cold": ([], ["--n", "5"]),
    "exec_breakdown": ([], ["--n", "300"]),
    "functions": ([], ["--n", "200", "--cold", "5", "--bursts", "5", "--cold-bursts", "1", "--ephemeral", "10",
                       "--code-n", "40", "--stages-n", "100", "--microvm-n", "20"]),
}


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table() -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    c = load("create_latency")
    if c:
        w, k = c["warm"], c["cold"]
        rows.append(("create->ready, warm (pool hit)", f"p50 {w['p50_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms",
                     "p50 <= 10 ms", w["verdict"]))
        rows.append(("create->ready, cold (pool 0)", f"p50 {k['p50_ms']:.1f} ms, p99 {k['p99_ms']:.1f} ms",
                     "p50 <= 200 ms", k["verdict"]))
    e = load("exec_latency")
    if e:
        r, v = e["results"], e["verdicts"]
        for name, label in (("ws_msgpack_exec", "exec '1' via gateway, WS msgpack"),
                            ("ws_json_exec", "exec '1' via gateway, WS JSON")):
            rows.append((label, f"p50 {r[name]['p50_ms']:.3f} ms, p99 {r[name]['p99_ms']:.3f} ms",
                         "p50 <= 1.5 ms", v[name]["p50_verdict"]))
            rows.append((f"  ratio to the agent's own ({r['direct_exec']['p50_ms']:.3f} ms)",
                         f"{v[name]['ratio_to_agent']:.2f}x", "<= 1.5x", v[name]["ratio_verdict"]))
        rows.append(("ping via gateway, WS msgpack", f"p50 {r['ws_msgpack_ping']['p50_ms']:.3f} ms, "
                     f"p99 {r['ws_msgpack_ping']['p99_ms']:.3f} ms", "-", "-"))
        rows.append(("ping, agent direct", f"p50 {r['direct_ping']['p50_ms']:.3f} ms", "-", "-"))
    s = load("stream_throughput")
    if s:
        rows.append(("output streaming, WS msgpack", f"median {s['ws_msgpack_bytes']['median_mb_per_s']:.0f} MB/s",
                     ">= 100 MB/s", s["verdict"]["verdict"]))
    m = load("idle_memory")
    if m:
        rows.append((f"idle sandbox memory (n={m['n']})", f"private {m['idle']['mean_private_mb']:.1f} MB, "
                     f"PSS {m['idle']['mean_pss_mb']:.1f} MB", "private <= 25 MB", m["verdict"]["verdict"]))
    k = load("concurrency")
    if k:
        lat, mem = k["create_latency"], k["memory"]
        rows.append((f"{k['n']} concurrent creates", f"{k['creates_ok']} ok in {k['create_burst_total_s']:.1f} s; "
                     f"p50 {lat['p50_ms'] / 1000:.2f} s, p99 {lat['p99_ms'] / 1000:.2f} s", "-", "-"))
        rows.append(("  then one exec in each, concurrently", f"{k['execs_ok']} ok in {k['exec_burst_total_s']:.2f} s",
                     "-", "-"))
        rows.append(("  gateway + launchers memory", f"PSS {mem['gateway_plus_launchers_pss_mb']:.0f} MB "
                     f"(launchers private {mem['launchers_private_total_mb']:.0f} MB)", "-", "-"))
        left = k["after_destroy"]["sandbox_launchers_still_running"] + len(
            k["after_gateway_stop"]["orphaned_launchers_from_this_run"])
        rows.append(("  launchers left after destroy", str(left), "0", "met" if left == 0 else "NOT met"))
    f = load("functions")
    if f:
        if "warm" in f:
            w = f["warm"]
            rows.append(("warm deployed invoke, REST (WASM)", f"p50 {w['p50_ms']:.2f} ms, p99 {w['p99_ms']:.2f} ms",
                         "<= 3 ms", f"p50 {f['verdicts']['warm_p50']}, p99 {f['verdicts']['warm_p99']}"))
        for key, label in (("pool_2", "pool hit"), ("pool_4", "pool hit"), ("pool_0", "pool_size 0")):
            c = f.get("cold", {}).get(key)
            if c:
                rows.append((f"cold first call of a new function, {label}",
                             f"p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms", "p50 <= 250 ms",
                             verdict(c["p50_ms"], 250.0)))
        if "burst" in f:
            b = f["burst"]
            rows.append(("10 invokes at once, max_instances 10, warm",
                         f"p50 {b['warm_bursts']['call_latency']['p50_ms']:.1f} ms per call, "
                         f"{b['instances_at_end']} instances", "-", "-"))
        if "ephemeral" in f:
            e = f["ephemeral"]
            rows.append(("ephemeral POST /v1/invoke, pool hit", f"p50 {e['p50_ms']:.1f} ms, p99 {e['p99_ms']:.1f} ms",
                         "-", "-"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="")
    p.add_argument("--skip", default="")
    args = p.parse_args()
    only = {x for x in args.only.split(",") if x}
    skip = {x for x in args.skip.split(",") if x}
    info = machine_info()
    print(f"machine: {info['cpu_model']}, {info['nproc']} CPUs, {info['mem_total_gib']} GiB, Linux {info['kernel']}, "
          f"Python {info['python']}, wasmtime {info['wasmtime']}", flush=True)
    failed = []
    for name, (full, quick) in BENCHES.items():
        if (only and name not in only) or name in skip:
            continue
        argv = [PYTHON, str(BENCH / f"{name}.py"), *(quick if args.quick else full)]
        print(f"\n$ {' '.join([sys.executable.replace(str(ROOT) + '/', ''), *argv[1:]]).replace(str(ROOT) + '/', '')}",
              flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(argv, cwd=ROOT, check=False).returncode
        print(f"   ({name}: exit {rc}, {time.monotonic() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(name)
    print("\n| figure | measured | target | verdict |\n|---|---|---|---|")
    for row in table():
        print("| " + " | ".join(row) + " |")
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
