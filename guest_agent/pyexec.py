"""In-interpreter Python execs (`exec.start` with `language: "python"`).

Code runs in the agent's own interpreter, REPL style: the last statement, if it is an
expression, has its repr printed (unless it is None), or, when its value has rich representations,
is displayed (a `display` event: guest_agent/display.py, which also shows matplotlib's figures
left open at the end). Namespaces persist by name between execs.

`sys.stdout`, `sys.stderr` and `sys.stdin` are replaced once, for the agent's life, by proxies
that forward to the streams of the exec running on the current thread (threads that user code
starts fall back to the most recently started exec). This module is platform-neutral: where
output goes (`sink`) and how a stdin read waits (`pump`, on a platform without threads) are
given by the agent.
"""

from __future__ import annotations

import ast
import builtins
import io
import linecache
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from types import CodeType
from typing import Any, TextIO

from . import display
from .schema import MAX_EXEC_DISPLAY_BYTES, bundle_size
from .wire import CHUNK_SIZE, ProtocolError

#: exec.input beyond this much unread stdin is answered `busy` (retryable).
STDIN_LIMIT = 1 << 20
MAX_NAMESPACES = 64
#: Sources kept in linecache for tracebacks of functions defined by earlier execs.
_LINECACHE_KEEP = 256


class ExecTerminated(BaseException):
    """Raised in an exec's thread by exec.signal SIGTERM/SIGKILL/SIGHUP/SIGQUIT.

    A BaseException, so `except Exception` in user code does not swallow it.
    """


class ExecTimeoutError(TimeoutError):
    """Raised in an exec's thread when it runs past its timeout.

    A TimeoutError, as user code expects; a class of its own, so code that catches every test's
    exceptions (pytest in guest_agent/testrun.py) can tell the agent's stop from the test's own.
    """


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None
    signal: str | None = None


Sink = Callable[[str, bytes], None]
#: Where an exec's display bundles go (guest_agent/display.py).
DisplaySink = Callable[[dict[str, str]], None]


# ---------------------------------------------------------------------------------------------
# Compiling and running a cell
# ---------------------------------------------------------------------------------------------


def compile_cell(source: str, filename: str) -> tuple[CodeType | None, CodeType | None]:
    """(the statements, the trailing expression or None), REPL style.

    Raises:
        SyntaxError: the source does not parse.
    """
    tree = ast.parse(source, filename, "exec")
    last: ast.Expression | None = None
    if tree.body and isinstance(tail := tree.body[-1], ast.Expr):
        tree.body.pop()
        last = ast.Expression(tail.value)
    body = compile(tree, filename, "exec") if tree.body else None
    expr = compile(last, filename, "eval") if last is not None else None
    return body, expr


class Namespaces:
    """Persistent namespaces by name; "fresh" is a new one every time."""

    def __init__(self, limit: int = MAX_NAMESPACES) -> None:
        self._spaces: dict[str, dict[str, Any]] = {}
        self._limit = limit

    def get(self, name: str) -> dict[str, Any]:
        if name == "fresh":
            return _new_namespace()
        space = self._spaces.get(name)
        if space is None:
            if len(self._spaces) >= self._limit:
                raise ProtocolError("bad_request", f"at most {self._limit} named namespaces")
            space = self._spaces[name] = _new_namespace()
        return space


def _new_namespace() -> dict[str, Any]:
    return {"__name__": "__main__", "__builtins__": builtins, "__doc__": None}


_kept_sources: deque[str] = deque()


def _remember_source(filename: str, source: str) -> None:
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    _kept_sources.append(filename)
    while len(_kept_sources) > _LINECACHE_KEEP:
        linecache.cache.pop(_kept_sources.popleft(), None)


def format_user_exception(exc: BaseException, filename: str) -> str:
    """The traceback as Python's REPL prints it: the agent's own frames are left out."""
    import traceback  # imported when first needed: ~20 ms of every WASM sandbox start otherwise

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def run_cell(source: str, namespace: dict[str, Any], filename: str, streams: ExecStreams) -> Outcome:
    """Run `source` on the calling thread; every outcome of user code becomes an `Outcome`."""
    _remember_source(filename, source)
    try:
        try:
            body, expr = compile_cell(source, filename)
        except (SyntaxError, ValueError) as exc:  # ValueError: NUL bytes, before 3.12
            import traceback

            streams.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
            return Outcome(1)
        if body is not None:
            exec(body, namespace)
        if expr is not None:
            value = eval(expr, namespace)
            if value is not None and not display.show_result(value, streams):
                streams.stdout.write(repr(value) + "\n")
        display.flush_figures(streams)
        return Outcome(0)
    except SystemExit as exc:
        display.flush_figures(streams)
        code = exc.code
        if code is None:
            return Outcome(0)
        if isinstance(code, int):
            return Outcome(code & 0xFF)
        streams.stderr.write(f"{code}\n")
        return Outcome(1)
    except KeyboardInterrupt as exc:
        streams.stderr.write(format_user_exception(exc, filename))
        return Outcome(None, "SIGINT")
    except ExecTerminated:
        return Outcome(None, streams.terminated_by or "SIGTERM")
    except BaseException as exc:
        streams.stderr.write(format_user_exception(exc, filename))
        if isinstance(exc, Exception) and not isinstance(exc, ExecTimeoutError):
            display.flush_figures(streams)  # as Jupyter's inline backend does after a cell that raised
        return Outcome(1)


# ---------------------------------------------------------------------------------------------
# An exec's streams
# ---------------------------------------------------------------------------------------------


class ExecOutput:
    """stdout and stderr of one exec, coalesced: bytes are handed to `sink` on a newline, when a
    chunk's worth is buffered, on flush(), and when the other fd is written (keeping order)."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._fd = "stdout"
        self._buffer = bytearray()
        self._lock = threading.Lock()

    def write(self, fd: str, data: bytes) -> None:
        with self._lock:
            if fd != self._fd and self._buffer:
                self._flush_locked()
            self._fd = fd
            self._buffer += data
            if b"\n" in data or len(self._buffer) >= CHUNK_SIZE:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        data = bytes(self._buffer)
        self._buffer.clear()
        for start in range(0, len(data), CHUNK_SIZE):
            self._sink(self._fd, data[start : start + CHUNK_SIZE])


class _BinaryWriter(io.RawIOBase):
    """`sys.stdout.buffer` of an exec."""

    def __init__(self, output: ExecOutput, fd: str) -> None:
        super().__init__()
        self._output = output
        self._fd = fd

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._output.write(self._fd, chunk)
        return len(chunk)

    def flush(self) -> None:
        self._output.flush()


class TextWriter(io.TextIOBase):
    """`sys.stdout` / `sys.stderr` of an exec: text in, UTF-8 out."""

    def __init__(self, output: ExecOutput, fd: str) -> None:
        super().__init__()
        self._output = output
        self._fd = fd
        self._binary = _BinaryWriter(output, fd)
        #: The exec whose stream this is (stdout only): how display() finds it (display.py).
        self.sandgate_exec: ExecStreams | None = None

    @property
    def buffer(self) -> _BinaryWriter:
        return self._binary

    # Properties: io.TextIOBase's own attributes are read-only descriptors.
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._output.write(self._fd, text.encode("utf-8", "backslashreplace"))
        return len(text)

    def flush(self) -> None:
        self._output.flush()


class StdinBuffer(io.RawIOBase):
    """An exec's stdin: bytes from the `stdin` field and exec.input, until closed.

    A read with nothing buffered waits: on a condition (another thread feeds it), or, where
    there are no threads, by calling `pump`, which reads and handles one frame from the channel.
    """

    def __init__(self, pump: Callable[[], None] | None = None, limit: int = STDIN_LIMIT) -> None:
        super().__init__()
        self._data = bytearray()
        self._eof = False
        self._cond = threading.Condition(threading.Lock())
        self._pump = pump
        self._limit = limit
        #: Checked on every wait: raises to end a read (a deadline on a single thread).
        self.check: Callable[[], None] | None = None

    @property
    def closed_for_input(self) -> bool:
        return self._eof

    def feed(self, data: bytes, *, force: bool = False) -> None:
        """Append input. Raises ProtocolError `busy` past the limit, `bad_request` after close."""
        with self._cond:
            if self._eof:
                raise ProtocolError("bad_request", "stdin of this exec is closed")
            if not force and len(self._data) + len(data) > self._limit:
                raise ProtocolError("busy", f"the exec has {len(self._data)} bytes of unread stdin; retry later")
            self._data += data
            self._cond.notify_all()

    def close_input(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake a waiting reader so an exception injected into its thread is raised."""
        with self._cond:
            self._cond.notify_all()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pump is not None:
            while not self._data and not self._eof:
                if self.check is not None:
                    self.check()
                self._pump()
        with self._cond:
            while not self._data and not self._eof:
                if self.check is not None:
                    self.check()
                self._cond.wait()
            count = min(len(view), len(self._data))
            view[:count] = self._data[:count]
            del self._data[:count]
            return count


@dataclass
class ExecStreams:
    """The three text streams user code sees, plus what the agent needs to finish them."""

    output: ExecOutput
    stdout: TextWriter
    stderr: TextWriter
    stdin_buffer: StdinBuffer
    stdin: TextIO
    #: The signal name an injected ExecTerminated stands for.
    terminated_by: str | None = None
    #: Where display bundles go (None: their text/plain is printed).
    display_sink: DisplaySink | None = None
    #: What its display bundles took so far (`schema.bundle_size`), and whether it was told that
    #: it displayed all it may.
    display_bytes: int = 0
    display_refused: bool = False
    #: The ids of matplotlib figures this exec displayed explicitly (display.flush_figures).
    shown_figures: set[int] = dc_field(default_factory=set)

    @classmethod
    def create(cls, sink: Sink, pump: Callable[[], None] | None = None,
               display_sink: DisplaySink | None = None) -> ExecStreams:
        output = ExecOutput(sink)
        raw = StdinBuffer(pump)
        text = io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="replace")
        streams = cls(output, TextWriter(output, "stdout"), TextWriter(output, "stderr"), raw, text,
                      display_sink=display_sink)
        streams.stdout.sandgate_exec = streams  # how display() finds its exec (display.py)
        return streams

    def display(self, bundle: dict[str, str]) -> None:
        """Send one bundle (display.py made it, within a bundle's bound) after the output
        written before it; past the exec's display bound it is dropped, once said on stderr."""
        size = bundle_size(bundle)
        if self.display_bytes + size > MAX_EXEC_DISPLAY_BYTES:
            if not self.display_refused:
                self.display_refused = True
                self.stderr.write(f"display: this exec displayed its {MAX_EXEC_DISPLAY_BYTES} bytes; further "
                                  "output to display is dropped\n")
            return
        self.display_bytes += size
        self.output.flush()
        if self.display_sink is None:
            self.stdout.write(bundle.get("text/plain", "") + "\n")
        else:
            self.display_sink(bundle)


# ---------------------------------------------------------------------------------------------
# sys.stdout & co.
# ---------------------------------------------------------------------------------------------


class StreamRouter:
    """Which exec's streams the current thread's `sys.stdout` & co. mean."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._recent: list[ExecStreams] = []  # running execs, latest last
        self._lock = threading.Lock()

    def bind(self, streams: ExecStreams | None) -> None:
        """Make `streams` the current thread's (None: unbind)."""
        self._local.streams = streams

    def started(self, streams: ExecStreams) -> None:
        with self._lock:
            self._recent.append(streams)

    def finished(self, streams: ExecStreams) -> None:
        with self._lock:
            if streams in self._recent:
                self._recent.remove(streams)

    def current(self) -> ExecStreams | None:
        streams: ExecStreams | None = getattr(self._local, "streams", None)
        if streams is None and self._recent:
            streams = self._recent[-1]
        return streams


class _Proxy:
    """Stands in for sys.stdout, sys.stderr or sys.stdin."""

    def __init__(self, router: StreamRouter, which: str, fallback: Any) -> None:
        self._router = router
        self._which = which
        self._fallback = fallback

    def _target(self) -> Any:
        streams = self._router.current()
        return self._fallback if streams is None else getattr(streams, self._which)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)

    def write(self, text: str) -> int:
        return self._target().write(text)  # type: ignore[no-any-return]

    def flush(self) -> None:
        self._target().flush()

    def read(self, size: int = -1) -> str:
        return self._target().read(size)  # type: ignore[no-any-return]

    def readline(self, size: int = -1) -> str:
        return self._target().readline(size)  # type: ignore[no-any-return]

    def isatty(self) -> bool:
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._target())

    def __next__(self) -> str:
        return next(self._target())  # type: ignore[no-any-return]


class StdStreams:
    """Installs the proxies into `sys`, and puts back what was there."""

    def __init__(self, router: StreamRouter, *, replace_dunder: bool) -> None:
        self.router = router
        self._replace_dunder = replace_dunder
        self._saved: dict[str, Any] = {}
        self._proxies: dict[str, _Proxy] = {}

    def install(self) -> None:
        """Install (again, if user code replaced one); outside an exec, output goes to stderr."""
        stderr = self._saved.get("stderr", sys.stderr)
        fallbacks = {"stdout": stderr, "stderr": stderr, "stdin": io.StringIO("")}
        for name, fallback in fallbacks.items():
            proxy = self._proxies.get(name)
            if proxy is None:
                self._saved[name] = getattr(sys, name)
                proxy = self._proxies[name] = _Proxy(self.router, name, fallback)
            if getattr(sys, name) is not proxy:
                setattr(sys, name, proxy)
            if self._replace_dunder:
                # On WASI the original sys.__stdout__/__stdin__ are the channel itself.
                setattr(sys, f"__{name}__", proxy)

    def uninstall(self) -> None:
        for name, proxy in self._proxies.items():
            if getattr(sys, name) is proxy:
                setattr(sys, name, self._saved[name])
        self._proxies.clear()
