"""One WASM sandbox per process: `python -m plugins.wasm.launcher [options] -- argv...`.

python mode runs CPython-for-WASI with the given argv; its stdin/stdout are this process's fd 0/1
(wasmtime reads and writes them directly, so the guest agent talks to the gateway over the pipes
with no copy here). javascript mode evaluates one JS source with QuickJS and exits. ruby and php
modes run one program (plugins.wasm.interpreters) with a fresh instance of the interpreter. program
mode runs one WASI command (a C/C++ program plugins.wasm.cprograms compiled) and exits.

Options:
  --work DIR          host folder preopened read-write at /work (the only writable place)
  --agent-dir DIR     host folder preopened read-only at /sandgate (python: PYTHONPATH=/sandgate)
  --memory-bytes N    cap on the guest's linear memory (CPython starts with 40 MiB: below that
                      it cannot start, reason "memory"; above, a failed allocation is a
                      MemoryError inside the guest)
  --cpu-seconds S     CPU the guest thread may consume over the sandbox's whole life
  --mode python|javascript|ruby|php|program
  --code SRC / --code-file PATH   the JS source (javascript mode)
  --module PATH       ruby/php: the compiled module (the runtime found and checked it at start);
                      program mode: the compiled program (a .cwasm made for this engine: trusted)
  --code-dir DIR      ruby/php: the run's folder (its program and prelude), preopened read-only
                      at /sandgate in place of the agent's folder
  --env K=V           guest environment (repeatable; overrides the defaults)
  --env-file PATH     guest environment from a JSON object of strings (after --env; the gateway
                      passes a JS exec's env this way, never on the command line, which /proc shows)
  --status-fd N       write the exit report (below) to fd N instead of stderr, always (also for a
                      normal exit), with the process's CPU seconds: the guest cannot write there
  --parent-pid PID    die with SIGKILL when the parent dies (prctl PDEATHSIG); exit at once if the
                      parent is not PID any more (it died before the prctl)
  --handoff-fd N      python mode: the sandbox's handoff socket (a Unix datagram socket the gateway
                      serves): `sandgate.fetch` and urllib in the guest send each request through
                      it (plugins/wasm/fetch.py); without it they are refused (no network)
  --fetch-max-bytes N the largest response body a fetch may read (default 64 MiB)

The python argv's first item is ignored (the guest runs `python.wasm`): `-- python -m guest_agent`,
`-- python -c CODE`, `-- python /work/script.py`, or `-- python` for a REPL on stdin. The guest
sees /usr/local/lib (the stdlib zip, read-only), /work and /sandgate, nothing else; its
sys.setrecursionlimit is capped (see MAX_RECURSION_LIMIT).

Exit status: the guest's exit code, or when the guest stopped abnormally one of the EXIT_*
codes below (110 error, 111 trap, 112 cpu_limit, 113 memory, 114 stack_overflow), and then the
last line on stderr (or the one line on --status-fd) is one JSON object:
  {"sandgate_launcher": "exit", "reason": "trap"|"cpu_limit"|"memory"|"stack_overflow"|"error",
   "message": "..."}
With --status-fd the line is written for every exit (reason null for the guest's own exit), with
"cpu_s": the process's CPU seconds (the sandbox's budget is charged with them).

Startup time matters (cold create -> ready), so module level imports only what every start
needs; the compiled module is mapped with `deserialize_file`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from plugins.common import TerminalProgress
from plugins.wasm import artifacts, interpreters

if TYPE_CHECKING:
    import argparse

    import wasmtime

# Exit codes for abnormal ends (a guest may exit with these too: the JSON line tells them apart).
EXIT_ERROR = 110  # the launcher failed (bad options, missing artifacts, instantiation error)
EXIT_TRAP = 111  # the guest trapped (unreachable, out-of-bounds access, abort(), ...)
EXIT_CPU_LIMIT = 112  # --cpu-seconds consumed
EXIT_MEMORY = 113  # the memory cap stopped the guest outright (not a MemoryError it handled)
EXIT_STACK_OVERFLOW = 114  # the wasm stack (artifacts.MAX_WASM_STACK) overflowed

EXIT_CODES = {
    "error": EXIT_ERROR,
    "trap": EXIT_TRAP,
    "cpu_limit": EXIT_CPU_LIMIT,
    "memory": EXIT_MEMORY,
    "stack_overflow": EXIT_STACK_OVERFLOW,
}

TICK_SECONDS = 0.01  # one epoch tick per 10 ms of guest CPU
IDLE_POLL_MAX = 0.2  # the CPU ticker backs off to this while the guest is idle
NO_DEADLINE = 1 << 62
WASI_EPERM = 63
HOST_CALL_UNAVAILABLE = -1  # what `host.call` answers outside python mode: no host calls there
DEFAULT_FETCH_MAX_BYTES = 64 << 20

PYTHON_ARGV0_DEFAULT = ("python",)
ZIP_GUEST = "/usr/local/lib"
WORK_GUEST = "/work"
AGENT_GUEST = "/sandgate"


class Outcome:
    """How the guest ended: an exit code, plus a reason when it ended abnormally. (A plain
    class: importing dataclasses costs ~10 ms at every sandbox start.)"""

    __slots__ = ("exit_code", "message", "reason")

    def __init__(self, exit_code: int, reason: str | None = None, message: str = "") -> None:
        self.exit_code = exit_code
        self.reason = reason
        self.message = message


class LauncherError(Exception):
    """A problem to report with reason "error" (bad options, missing artifacts)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m plugins.wasm.launcher",
        description="Run one WASM sandbox (CPython-for-WASI or QuickJS) with wasmtime.",
    )
    p.add_argument("--mode", choices=("python", "javascript", *interpreters.LANGUAGES, "program"), default="python")
    p.add_argument("--work", help="host folder preopened read-write at /work")
    p.add_argument("--agent-dir", help="host folder preopened read-only at /sandgate")
    p.add_argument("--preopen", action="append", default=[], metavar="HOST:GUEST[:ro]",
                   help="another host folder preopened at an absolute guest path (a volume), read-only with :ro")
    p.add_argument("--memory-bytes", type=int, help="cap on the guest's linear memory")
    p.add_argument("--cpu-seconds", type=float, help="guest CPU allowed over the sandbox's life")
    p.add_argument("--code", help="javascript mode: the JS source")
    p.add_argument("--code-file", help="javascript mode: a host file holding the JS source")
    p.add_argument("--module", help="ruby/php mode: the compiled (serialized) module; program mode: the "
                   "compiled WASI command (.cwasm)")
    p.add_argument("--code-dir", help="ruby/php mode: the run's folder, preopened read-only at /sandgate")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="guest env")
    p.add_argument("--env-file", help="guest env: a host file holding a JSON object of strings")
    p.add_argument("--status-fd", type=int, help="fd for the exit report (not the guest's stderr)")
    p.add_argument("--parent-pid", type=int, help="die with the parent (parent-death signal)")
    p.add_argument("--handoff-fd", type=int, help="python mode: the handoff socket fetches go through")
    p.add_argument("--fetch-max-bytes", type=int, default=DEFAULT_FETCH_MAX_BYTES,
                   help="the largest response body a fetch reads")
    p.add_argument("argv", nargs="*", help="python mode: the guest argv, after --")
    args = p.parse_args(argv)
    if args.mode == "javascript" and (args.code is None) == (args.code_file is None):
        p.error("javascript mode needs exactly one of --code and --code-file")
    if args.mode in interpreters.LANGUAGES and not (args.module and args.code_dir):
        p.error(f"{args.mode} mode needs --module and --code-dir")
    if args.mode == "program" and args.module is None:
        p.error("program mode needs --module")
    if args.mode == "python" and not args.argv:
        args.argv = list(PYTHON_ARGV0_DEFAULT)
    for item in args.env:
        if "=" not in item:
            p.error(f"--env wants K=V, got {item!r}")
    for item in args.preopen:
        host, _, rest = item.partition(":")
        guest, _, mode = rest.partition(":")
        if not host or not guest.startswith("/") or mode not in ("", "ro"):
            p.error(f"--preopen wants HOST:GUEST or HOST:GUEST:ro, got {item!r}")
    if args.memory_bytes is not None and args.memory_bytes <= 0:
        p.error("--memory-bytes must be positive")
    if args.cpu_seconds is not None and args.cpu_seconds <= 0:
        p.error("--cpu-seconds must be positive")
    if args.fetch_max_bytes <= 0:
        p.error("--fetch-max-bytes must be positive")
    return args


def guest_env(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The guest's environment: defaults that make CPython-for-WASI usable in the sandbox, then
    the caller's --env entries, which win."""
    env: dict[str, str] = {}
    if args.mode == "python":
        env["MSGPACK_PUREPYTHON"] = "1"  # no C extensions in the guest
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ litter in /work
        if args.agent_dir:
            env["PYTHONPATH"] = AGENT_GUEST
    if args.work:
        env["HOME"] = WORK_GUEST
        env["TMPDIR"] = WORK_GUEST  # the only writable place
    for item in args.env:
        key, _, value = item.partition("=")
        env[key] = value
    if args.env_file:
        import json

        with open(args.env_file, encoding="utf-8") as f:
            extra = json.load(f)
        if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
            raise LauncherError("--env-file must hold a JSON object of strings")
        env.update(extra)
    return sorted(env.items())


# The guest thread and the CPU deadline.


class CpuTicker:
    """Advances the engine's epoch by one per TICK_SECONDS of CPU the guest thread has used, so
    a store deadline of N ticks is N * TICK_SECONDS of guest CPU; time the guest spends blocked
    (on stdin, say) costs nothing. It polls the guest thread's CPU clock every tick while the
    guest runs and backs off while it idles, never sleeping past the remaining budget."""

    def __init__(self, engine: wasmtime.Engine, budget_ticks: int | None) -> None:
        self.engine = engine
        self.budget_ticks = budget_ticks
        self.ticks = 0
        self.stop = threading.Event()
        self.clock: int | None = None
        self.thread = threading.Thread(target=self._run, name="cpu-ticker", daemon=True)

    def attach(self, guest_ident: int) -> None:
        """Start measuring the guest thread (called on the guest thread as it starts); without
        a budget there is nothing to measure, and no thread."""
        if self.budget_ticks is None:
            return
        self.clock = time.pthread_getcpuclockid(guest_ident)
        self.thread.start()

    def _run(self) -> None:
        assert self.clock is not None
        interval = TICK_SECONDS
        while not self.stop.is_set():
            try:
                used = int(time.clock_gettime(self.clock) / TICK_SECONDS)
            except OSError:  # the guest thread has ended
                return
            if used > self.ticks:
                for _ in range(used - self.ticks):
                    self.engine.increment_epoch()
                self.ticks = used
                interval = TICK_SECONDS
            else:
                interval = min(interval * 2, IDLE_POLL_MAX)
            wait = interval
            if self.budget_ticks is not None:
                wait = min(wait, max(TICK_SECONDS, (self.budget_ticks - self.ticks) * TICK_SECONDS))
            self.stop.wait(wait)


def run_on_guest_thread(body: Callable[[], Outcome], ticker: CpuTicker) -> Outcome:
    """Run `body()` on a thread with room for the 8 MiB wasm stack (wasm runs on the calling
    native thread's stack; the main thread's may be smaller) and return its Outcome."""
    result: list[Outcome] = []

    def guest() -> None:
        ticker.attach(threading.get_ident())
        try:
            result.append(body())
        except BaseException as e:  # reported, never lost on this thread
            result.append(classify(e))
        finally:
            ticker.stop.set()

    old = threading.stack_size(artifacts.MAX_WASM_STACK + artifacts.HOST_STACK_ROOM)
    try:
        thread = threading.Thread(target=guest, name="guest", daemon=True)
        thread.start()
    finally:
        threading.stack_size(old)
    thread.join()
    return result[0] if result else Outcome(EXIT_ERROR, "error", "the guest thread vanished")


def classify(e: BaseException) -> Outcome:
    """An exception from wasmtime (or the launcher) as an Outcome."""
    import wasmtime

    if isinstance(e, wasmtime.ExitTrap):
        return Outcome(e.code & 0xFF)
    if isinstance(e, wasmtime.Trap):
        code = e.trap_code
        message = _first_line(e.message)
        where = _top_frame(e.message)
        at = f" (in {where})" if where else ""
        if code == wasmtime.TrapCode.INTERRUPT:
            return _abnormal("cpu_limit", "the guest used up its CPU time (--cpu-seconds)")
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            limit = artifacts.MAX_WASM_STACK >> 20
            return _abnormal("stack_overflow", f"the guest overflowed its {limit} MiB stack{at}")
        if code is not None:
            return _abnormal("trap", f"wasm trap: {code.name.lower().replace('_', ' ')}{at}")
        return _abnormal("trap", message)
    if isinstance(e, wasmtime.WasmtimeError):
        message = _first_line(str(e))
        if "memory" in message and ("limit" in message or "exceeds" in message):
            import re

            pages = re.search(r"minimum size of (\d+) pages", message)
            if pages:  # instantiation: the cap is below the guest's initial memory
                message += f" (the guest starts with {int(pages[1]) * 65536} bytes; raise --memory-bytes)"
            return _abnormal("memory", message)
        return _abnormal("error", message)
    if isinstance(e, LauncherError | OSError):
        return _abnormal("error", str(e))
    return _abnormal("error", f"{type(e).__name__}: {e}")


def _abnormal(reason: str, message: str) -> Outcome:
    return Outcome(EXIT_CODES[reason], reason, message)


def _top_frame(trap_message: str) -> str:
    """The innermost function of a trap's backtrace ("python.wasm!tb_dealloc"), or ""."""
    lines = trap_message.splitlines()
    for i, line in enumerate(lines):
        if line.rstrip().endswith("wasm backtrace:") and i + 1 < len(lines):
            return lines[i + 1].split(" - ")[-1].split(": ", 1)[-1].strip()
    return ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# Building the store and linker.


def _linker(engine: wasmtime.Engine, door: Callable[..., int] | None = None) -> wasmtime.Linker:
    """WASI, plus refusals that close holes in wasmtime's WASI, plus `host.call`: `door` (python
    mode's fetch, plugins/wasm/fetch.py), else a stub that answers "no host"."""
    import wasmtime

    i32 = wasmtime.ValType.i32()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.allow_shadowing = True

    def refuse(*_args: int) -> int:
        return WASI_EPERM

    # wasmtime lets a guest create a relative symlink that points out of a preopen, and a hard
    # link could make a read-only file (the shared agent folder, the stdlib zip) writable
    # through /work: both are refused.
    linker.define_func("wasi_snapshot_preview1", "path_symlink", _ft([i32] * 5, [i32]), refuse)
    linker.define_func("wasi_snapshot_preview1", "path_link", _ft([i32] * 7, [i32]), refuse)
    if door is None:
        linker.define_func("host", "call", _ft([i32] * 4, [i32]), lambda *_a: HOST_CALL_UNAVAILABLE)
    else:
        linker.define_func("host", "call", _ft([i32] * 4, [i32]), door, access_caller=True)
    return linker


def fetch_door(args: argparse.Namespace) -> Callable[..., int]:
    """Python mode's `host.call`: plugins/wasm/fetch.py's Door, made (and imported) on the first
    call, so a sandbox that never fetches never pays for it."""
    made: list[Callable[..., int]] = []

    def call(caller: object, *frame: int) -> int:
        if not made:
            import socket

            from plugins.wasm.fetch import HOST_FAULT, Door

            try:
                handoff = socket.socket(fileno=args.handoff_fd) if args.handoff_fd is not None else None
            except OSError:  # not a socket: the guest's call fails (an OSError there), never a trap
                return HOST_FAULT
            made.append(Door(handoff, args.fetch_max_bytes))
        return made[0](caller, *frame)

    return call


def _ft(params: list[wasmtime.ValType], results: list[wasmtime.ValType]) -> wasmtime.FuncType:
    import wasmtime

    return wasmtime.FuncType(params, results)


def _store(engine: wasmtime.Engine, args: argparse.Namespace, wasi_argv: list[str]) -> wasmtime.Store:
    import wasmtime

    wasi = wasmtime.WasiConfig()
    wasi.argv = wasi_argv
    wasi.env = guest_env(args)
    wasi.inherit_stdin()
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    if args.mode == "python":
        wasi.preopen_dir(str(artifacts.stdlib_dir()), ZIP_GUEST, False)
    if args.work:
        if not os.path.isdir(args.work):
            raise LauncherError(f"--work {args.work!r} is not a folder")
        wasi.preopen_dir(os.path.abspath(args.work), WORK_GUEST, True)
    for item in args.preopen:
        host, _, rest = item.partition(":")
        guest, _, mode = rest.partition(":")
        if not os.path.isdir(host):
            raise LauncherError(f"--preopen {host!r} is not a folder")
        wasi.preopen_dir(os.path.abspath(host), guest, mode != "ro")
    shared = args.code_dir if args.mode in interpreters.LANGUAGES else args.agent_dir
    if shared:
        if not os.path.isdir(shared):
            raise LauncherError(f"{shared!r} (--agent-dir or --code-dir) is not a folder")
        wasi.preopen_dir(os.path.abspath(shared), AGENT_GUEST, False)
    store = wasmtime.Store(engine)
    store.set_wasi(wasi)
    if args.memory_bytes is not None:
        store.set_limits(memory_size=args.memory_bytes)
    budget = _budget_ticks(args)
    # With epoch interruption on, a store without a deadline would trap at once.
    store.set_epoch_deadline(NO_DEADLINE if budget is None else budget)
    return store


def _budget_ticks(args: argparse.Namespace) -> int | None:
    if args.cpu_seconds is None:
        return None
    return max(1, round(float(args.cpu_seconds) / TICK_SECONDS))


# The two modes.


# The snapshot's CPython runs isolated (-I: PYTHONPATH is ignored and sys.path was fixed when
# the snapshot was made), so a `-c` prelude appends $PYTHONPATH's entries to sys.path and hands
# the caller's argv to the reactor's own command-line handling (`_reactor.run(argv, environ)`,
# which runs it in a fresh __main__ and returns the exit status). Its own source is dropped from
# linecache so tracebacks and inspect never show it.
#
# It also caps sys.setrecursionlimit at MAX_RECURSION_LIMIT. Python-to-Python calls use no C
# stack, but freeing a traceback recurses once per level (tb_dealloc), and the 8 MiB wasm stack
# holds about 40,000 of those (measured): with a higher limit, a deep recursion's RecursionError
# is raised cleanly and then freeing its traceback kills the whole sandbox (stack_overflow).
# Capped, the guest (and the agent serving it) survives with a RecursionError.
MAX_RECURSION_LIMIT = 25_000
PYTHON_PRELUDE = (
    "import sys as _s, os as _o, linecache as _l; "
    "getattr(_l, '_interactive_cache', {}).clear(); "
    "_s.path.extend(p for p in _o.environ.get('PYTHONPATH', '').split(':') if p); "
    "_s.setrecursionlimit = lambda limit, _set=_s.setrecursionlimit: "
    f"_set(limit if limit < {MAX_RECURSION_LIMIT} else {MAX_RECURSION_LIMIT}); "
    "_s.exit(__import__('_reactor').run([_s.executable, *_s.argv[1:]], dict(_o.environ)))"
)


#: Added to the prelude when the guest can fetch (a handoff socket and the agent's folder, where
#: the `sandgate` module is): urllib.request then fetches through the door (sandgate.install).
FETCH_PRELUDE = "__import__('sandgate').install(); "


def python_argv(argv: list[str], fetch: bool = False) -> list[str]:
    """The WASI argv for the caller's `python ...` command line (argv[0] is ignored)."""
    prelude = PYTHON_PRELUDE
    if fetch:
        run = "_s.exit(__import__('_reactor')"
        prelude = prelude.replace(run, FETCH_PRELUDE + run)
    return [argv[0], "-c", prelude, *argv[1:]]


def run_python(args: argparse.Namespace) -> Outcome:
    """CPython-for-WASI: the snapshot is a reactor; `_initialize`, then `run` runs CPython with
    the WASI argv and returns its exit status (sys.exit may also end it through proc_exit)."""
    engine = artifacts.new_engine()
    module = artifacts.load_module(engine, "python", TerminalProgress())
    fetch = args.handoff_fd is not None and args.agent_dir is not None
    store = _store(engine, args, python_argv(args.argv, fetch))
    linker = _linker(engine, fetch_door(args))
    ticker = CpuTicker(engine, _budget_ticks(args))

    def body() -> Outcome:
        instance = linker.instantiate(store, module)
        exports = instance.exports(store)
        if "_initialize" in exports:
            exports["_initialize"](store)  # type: ignore[operator]
        status = exports["run"](store)  # type: ignore[operator]
        return Outcome(int(status) & 0xFF)

    return run_on_guest_thread(body, ticker)


def run_javascript(args: argparse.Namespace) -> Outcome:
    """QuickJS one-shot: the reactor exports `qjs_init_argv(argc, argv)`, which parses a qjs
    command line, makes the runtime and evaluates `-e SOURCE` there (returning 0, or -1 after
    printing the exception). There is no event-loop export, so pending jobs and timers do not
    run after the script's synchronous part."""
    if args.code_file is not None:
        with open(args.code_file, encoding="utf-8") as f:
            code = f.read()
    else:
        code = args.code
    if "\0" in code:
        raise LauncherError("the JS source contains a NUL character")
    engine = artifacts.new_engine()
    module = artifacts.load_module(engine, "javascript", TerminalProgress())
    store = _store(engine, args, ["qjs"])
    linker = _linker(engine)
    ticker = CpuTicker(engine, _budget_ticks(args))
    qjs_argv = ["qjs", "--std", "-e", _flushing(code)]

    def body() -> Outcome:
        import wasmtime

        instance = linker.instantiate(store, module)
        exports = instance.exports(store)
        exports["_initialize"](store)  # type: ignore[operator]
        memory = exports["memory"]
        malloc = exports["malloc"]
        assert isinstance(memory, wasmtime.Memory) and isinstance(malloc, wasmtime.Func)
        pointers = []
        for arg in qjs_argv:
            data = arg.encode() + b"\0"
            ptr = malloc(store, len(data))
            if not ptr:
                return _abnormal("memory", "no guest memory for the JS source")
            memory.write(store, data, ptr)
            pointers.append(ptr)
        table = b"".join(p.to_bytes(4, "little") for p in [*pointers, 0])
        argv_ptr = malloc(store, len(table))
        if not argv_ptr:
            return _abnormal("memory", "no guest memory for the JS source")
        memory.write(store, table, argv_ptr)
        status = exports["qjs_init_argv"](store, len(qjs_argv), argv_ptr)  # type: ignore[operator]
        return Outcome(0 if status == 0 else 1)

    return run_on_guest_thread(body, ticker)


class GuestExit(Exception):
    """Raised by the proc_exit below, out of the guest, with its exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _exit_anywhere(status: int) -> None:
    raise GuestExit(status)


#: A C/C++ program's argv[0] (its source is main.c or main.cpp).
PROGRAM_ARGV0 = "main"


def run_command(args: argparse.Namespace) -> Outcome:
    """A WASI command module, a fresh instance run to its exit (`_start`): Ruby's or PHP's
    interpreter running the program in --code-dir, or a C/C++ program (program mode). wasmtime's
    own proc_exit traps on a status of 126 or more, which PHP uses for every fatal error (255) and
    a C program may pass to exit(): this proc_exit takes any status."""
    import wasmtime

    engine = artifacts.new_engine()
    module = wasmtime.Module.deserialize_file(engine, args.module)
    argv = [PROGRAM_ARGV0] if args.mode == "program" else interpreters.argv(args.mode)
    store = _store(engine, args, argv)
    linker = _linker(engine)
    linker.define_func("wasi_snapshot_preview1", "proc_exit", _ft([wasmtime.ValType.i32()], []), _exit_anywhere)
    ticker = CpuTicker(engine, _budget_ticks(args))

    def body() -> Outcome:
        instance = linker.instantiate(store, module)
        try:
            instance.exports(store)["_start"](store)  # type: ignore[operator]
        except GuestExit as e:
            return Outcome(e.status & 0xFF)
        return Outcome(0)

    return run_on_guest_thread(body, ticker)


def _flushing(code: str) -> str:
    """The source wrapped so the guest's stdio buffers are flushed however it ends: qjs_init_argv
    returns without exiting, so nothing else would flush what `std.out.puts` buffered. An indirect
    eval runs the source as a global script, as `qjs -e` would."""
    import json

    return (
        "(function (s) { try { (0, eval)(" + json.dumps(code) + "); }"
        " finally { s.out.flush(); s.err.flush(); } })(std);"
    )


def report(outcome: Outcome, status_fd: int | None = None) -> None:
    """The JSON exit report: on `status_fd` always (one line the guest cannot forge: the guest
    sees only its stdio and preopens, never this fd), else on stderr after an abnormal end."""
    if outcome.reason is None and status_fd is None:
        return
    import json

    info: dict[str, object] = {"sandgate_launcher": "exit", "reason": outcome.reason, "message": outcome.message}
    try:
        if status_fd is not None:
            times = os.times()
            info["cpu_s"] = round(times.user + times.system, 3)
            os.write(status_fd, (json.dumps(info) + "\n").encode())
        else:
            sys.stderr.write("\n" + json.dumps(info) + "\n")
            sys.stderr.flush()
    except OSError:
        pass


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent (the gateway) dies, so a gateway killed outright
    leaves no guest spinning. The prctl only covers deaths after it: a parent already gone has
    made this process an orphan (another parent pid), and then it exits now."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise LauncherError(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent_pid:
        os._exit(EXIT_ERROR)


#: Guests yield the CPU to the gateway: its event loop serves every tenant, so a spinning guest must
#: not slow down everyone else's requests (bench/soak.py). Guests share what is left equally.
GUEST_NICENESS = 10


def yield_cpu_to_the_gateway() -> None:
    """Lower this process's CPU weight. With autogroup scheduling (the default on desktop and many
    server kernels) every session is its own group and a process's nice value counts only inside
    it; the launcher leads its own session, so its group's niceness is set too."""
    os.nice(GUEST_NICENESS)
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(GUEST_NICENESS))
    except OSError:
        pass  # no autogroup scheduling: the process's own nice value is what counts


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    try:
        if args.parent_pid is not None:
            die_with_parent(args.parent_pid)
        yield_cpu_to_the_gateway()
        if args.mode == "python":
            outcome = run_python(args)
        elif args.mode == "javascript":
            outcome = run_javascript(args)
        else:
            outcome = run_command(args)
    except KeyboardInterrupt:  # never unwind normally while a guest thread may be inside wasm
        outcome = _abnormal("error", "interrupted")
    except Exception as e:  # any failure before the guest ran is still one JSON line
        outcome = classify(e)
    report(outcome, args.status_fd)
    # os._exit: nothing is left to flush (wasmtime wrote the guest's output straight to the
    # fds) and tearing down the store and engine would only cost time.
    os._exit(outcome.exit_code)


if __name__ == "__main__":
    main()
