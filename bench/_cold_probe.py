"""A timed copy of `python -m plugins.wasm.launcher` (python mode), for bench/profile_cold.py.

    python bench/_cold_probe.py [launcher options] -- python -m guest_agent --root /work

It runs the launcher's own functions in the launcher's order (parse_args, new_engine,
load_module, _store, _linker, CpuTicker, instantiate, _initialize, run) and writes one line
`PROBE {"step": wall-clock time, ...}` to stderr just before the guest's `run` export is called
(which only returns when the agent exits). Wall-clock (time.time) stamps, so the parent and the
guest (whose time.time is the host's realtime clock too) share a timeline.
"""

import time

T = {"probe_main": time.time()}  # the interpreter is up and site has run

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T["imports_stdlib"] = time.time()

from plugins.wasm import artifacts, launcher  # noqa: E402

T["import_launcher_module"] = time.time()


def main() -> None:
    args = launcher.parse_args(sys.argv[1:])
    T["parse_args"] = time.time()
    import wasmtime

    T["import_wasmtime"] = time.time()
    engine = artifacts.new_engine()
    T["new_engine"] = time.time()
    module = artifacts.load_module(engine, "python")
    T["deserialize_module"] = time.time()
    store = launcher._store(engine, args, launcher.python_argv(args.argv))
    T["store_and_wasi"] = time.time()
    linker = launcher._linker(engine)
    T["linker"] = time.time()
    ticker = launcher.CpuTicker(engine, launcher._budget_ticks(args))

    def body() -> launcher.Outcome:
        T["guest_thread_started"] = time.time()
        instance = linker.instantiate(store, module)
        T["instantiate"] = time.time()
        exports = instance.exports(store)
        if "_initialize" in exports:
            exports["_initialize"](store)  # type: ignore[operator]
        T["initialize_export"] = time.time()
        sys.stderr.write("PROBE " + json.dumps(T) + "\n")
        sys.stderr.flush()
        status = exports["run"](store)  # type: ignore[operator]
        return launcher.Outcome(int(status) & 0xFF)

    assert isinstance(module, wasmtime.Module)
    outcome = launcher.run_on_guest_thread(body, ticker)
    launcher.report(outcome)
    os._exit(outcome.exit_code)


main()
