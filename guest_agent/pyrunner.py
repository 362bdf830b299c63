"""The Python exec engine: where and when an in-interpreter exec runs, and how it is stopped.

`pyexec` runs one cell and gives it its streams; this module runs `exec.start` with
`language: "python"` for the agent: it starts the exec, moves its output to its stream, enforces
its timeout, delivers exec.signal and ends the stream. The `Agent` owns one `PythonRunner` and
stays the registry: the runner calls back `register` as an exec starts and `ended` as it ends
(before its `end` event), starts its threads with the agent's `spawn_thread`, and hands a
request read while an exec waits for stdin to the agent's `handle`.

Threads (host): each Python exec runs on a thread of its own, several at once. That thread never
writes a frame itself: an exception injected into it (timeout, SIGINT) could land between two
writes of one frame and corrupt the channel. It hands its output to one output thread, through a
C-level queue, with a bounded window of unsent bytes for backpressure. The agent's timer thread
(`Scheduler`) runs each exec's deadline, and after a timeout or SIGKILL the grace after which its
stream is ended without it.

One thread (WASI): a Python exec runs inside `Agent.handle`, so requests that arrive meanwhile
wait in the channel (no `exec.concurrent`), except when the exec reads stdin with nothing
buffered: then the read itself pulls frames from the channel, handles exec.input /
exec.close_stdin and the ops the schema marks `nested` (ping, metrics, exec.list, ...) and answers
every other request `busy` (retryable). There are no keepalives and no hard timeout on that
platform: a deadline is checked whenever the exec writes output or reads stdin, and the runtime
enforces its own.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from . import display
from ._log import log_exception
from .channel import Channel
from .features import Features
from .pyexec import (
    ExecStreams,
    ExecTerminated,
    ExecTimeoutError,
    Namespaces,
    Outcome,
    StdStreams,
    StreamRouter,
    run_cell,
)
from .records import ExecRecord
from .schema import Request, bundle_size
from .timers import Scheduler, Timer
from .wire import ProtocolError

#: After a timeout or SIGKILL, how long a Python exec gets to unwind before its stream is ended
#: without it (its thread is then abandoned: its later output is dropped).
PYTHON_KILL_GRACE = 1.0
#: Unsent output bytes a Python exec may have queued before its writes block.
PYTHON_OUTPUT_WINDOW = 1 << 20
_TERMINATING = ("SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT")
_THREAD_PREFIX = "python-"


@dataclass
class PythonRun:
    """The agent's handle on a Python exec."""

    source: str
    namespace: dict[str, Any]
    filename: str
    streams: ExecStreams
    lock: threading.Lock = dc_field(default_factory=threading.Lock)
    thread_id: int | None = None
    #: True while user code may run on the thread: only then is anything injected into it.
    interruptible: bool = False
    timed_out: bool = False
    #: The signal an injected exception stands for ("SIGINT", "SIGTERM", ...).
    signalled: str | None = None
    unsent: int = 0
    credit: threading.Condition = dc_field(default_factory=threading.Condition)
    timers: list[Timer] = dc_field(default_factory=list)

    def write_input(self, data: bytes) -> None:
        """exec.input. Raises ProtocolError `busy` past the stdin limit, `bad_request` after close."""
        self.streams.stdin_buffer.feed(data)

    def close_stdin(self) -> None:
        self.streams.stdin_buffer.close_input()


def is_exec_thread(thread: threading.Thread) -> bool:
    """Whether `thread` runs a Python exec (one stuck in a C call cannot be stopped)."""
    return thread.name.startswith(_THREAD_PREFIX)


class PythonRunner:
    """Runs the agent's Python execs (module doc).

    Args:
        channel: the agent leg: events out, and on a single-threaded platform requests in while
            an exec waits for stdin.
        features: the platform's abilities: `threads` (an exec on its own thread, or inline) and
            `async_exc` (whether exec.signal can reach an exec).
        scheduler: the agent's timer thread (None without threads): deadlines and kill graces.
        register: puts a starting exec in the agent's registry.
        ended: marks an exec ended in the registry (exit code, signal), before its `end` event.
        spawn_thread: starts a daemon thread the agent keeps, to join at shutdown.
        handle: the agent's dispatcher, for a nested request a single-threaded exec read.
        install_std_streams: replace sys.stdout/stderr/stdin with per-exec proxies.
        replace_dunder: also replace sys.__stdout__ & co. (when they are the channel).
    """

    def __init__(
        self,
        channel: Channel,
        features: Features,
        *,
        scheduler: Scheduler | None,
        register: Callable[[ExecRecord], None],
        ended: Callable[[ExecRecord, int | None, str | None], None],
        spawn_thread: Callable[[str, Callable[[], None]], None],
        handle: Callable[[Request], None],
        install_std_streams: bool = True,
        replace_dunder: bool = False,
    ) -> None:
        self._channel = channel
        self._features = features
        self._scheduler = scheduler
        self._register = register
        self._ended = ended
        self._spawn_thread = spawn_thread
        self._handle = handle
        self._namespaces = Namespaces()
        self._router = StreamRouter()
        self._std = StdStreams(self._router, replace_dunder=replace_dunder)
        if install_std_streams:
            self._std.install()
        self._install_std_streams = install_std_streams
        display.install()  # the display() builtin, and matplotlib's backend (display.py)
        self._outq: queue.SimpleQueue[tuple[ExecRecord, str, Any] | None] = queue.SimpleQueue()
        self._output_thread: threading.Thread | None = None
        if features.threads:
            self._output_thread = threading.Thread(target=self._output_loop, name="agent-python-output", daemon=True)
            self._output_thread.start()

    # -----------------------------------------------------------------------------------------
    # What the agent calls
    # -----------------------------------------------------------------------------------------

    def start(
        self,
        record: ExecRecord,
        source: str,
        namespace_name: str,
        stdin: bytes,
        stdin_open: bool,
        env: dict[str, str],
        cwd: str | None,
    ) -> None:
        """Start the exec of `record` (not yet registered): on its thread, or (no threads) run it
        here to its end.

        Raises:
            ProtocolError: before anything started (too many named namespaces).
        """
        namespace = self._namespaces.get(namespace_name)
        threaded = self._features.threads
        if threaded:
            streams = ExecStreams.create(lambda fd, data: self._sink(record, fd, data),
                                         display_sink=lambda bundle: self._display(record, bundle))
        else:
            streams = ExecStreams.create(
                lambda fd, data: self._sink_inline(record, fd, data),
                pump=lambda: self._pump_for(record),
                display_sink=lambda bundle: self._display_inline(record, bundle),
            )
            streams.stdin_buffer.check = lambda: self._check_deadline(record)
        streams.stdin_buffer.feed(stdin, force=True)
        if not stdin_open:
            streams.stdin_buffer.close_input()
        run = PythonRun(source, namespace, f"<exec {record.exec_id}>", streams)
        record.python = run
        # Process-wide, like os.chdir and os.environ in user code: concurrent execs share them,
        # and they persist, as in a REPL (the agent starts in the root).
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update(env)
        self._register(record)
        if self._install_std_streams:
            self._std.install()  # again, in case user code replaced sys.stdout for good
        self._router.started(streams)
        record.stream.emit("start", exec_id=record.exec_id, pid=None)
        if threaded:
            if record.timeout is not None and self._scheduler is not None:
                run.timers.append(self._scheduler.call_later(record.timeout, lambda: self._timeout(record)))
            self._spawn_thread(f"{_THREAD_PREFIX}{record.exec_id}", lambda: self._thread(record))
            return
        self._router.bind(streams)
        try:
            outcome = run_cell(source, namespace, run.filename, streams)
            streams.output.flush()
        finally:
            self._router.bind(None)
        self._finish(record, outcome)

    def signal(self, record: ExecRecord, name: str) -> None:
        """exec.signal for a running Python exec: `name` as an exception raised in its thread.

        Raises:
            ProtocolError: `unsupported` where exceptions cannot be injected, or for a signal
                that means nothing to Python.
        """
        run = record.python
        assert run is not None
        if not self._features.async_exc:
            raise ProtocolError("unsupported", "in-interpreter execs cannot be signalled here")
        if name == "SIGINT":
            self._inject(record, KeyboardInterrupt, name)
        elif name in _TERMINATING:
            run.streams.terminated_by = name
            self._inject(record, ExecTerminated, name)
            if name == "SIGKILL":
                self._schedule_abandon(record)
        else:
            raise ProtocolError(
                "unsupported", f"{name} means nothing to in-interpreter Python (SIGINT, SIGTERM, SIGKILL do)"
            )

    def kill(self, record: ExecRecord) -> None:
        """At shutdown: SIGKILL a running exec, with no grace timer (the channel is gone)."""
        run = record.python
        assert run is not None
        run.streams.terminated_by = "SIGKILL"
        self._inject(record, ExecTerminated, "SIGKILL")

    def close(self, deadline: float) -> None:
        """At shutdown, after the exec threads: stop the output thread (waiting for it until
        `deadline`) and put back what sys.stdout & co. were."""
        if self._output_thread is not None:
            self._outq.put(None)
            self._output_thread.join(max(0.0, deadline - time.monotonic()))
        if self._install_std_streams:
            self._std.uninstall()

    # -----------------------------------------------------------------------------------------
    # Threads (host)
    # -----------------------------------------------------------------------------------------

    def _thread(self, record: ExecRecord) -> None:
        run = record.python
        assert run is not None
        outcome: Outcome | None = None
        try:
            try:
                self._router.bind(run.streams)
                with run.lock:
                    run.thread_id = threading.get_ident()
                    run.interruptible = True
                outcome = run_cell(run.source, run.namespace, run.filename, run.streams)
            finally:
                with run.lock:
                    run.interruptible = False
                    _set_async_exc(run.thread_id, None)  # drop one injected but not yet raised
                run.streams.output.flush()
        except BaseException:  # an injected exception that landed after the user code
            pass
        self._outq.put((record, "exit", outcome))

    def _sink(self, record: ExecRecord, fd: str, data: bytes) -> None:
        """Output of a threaded Python exec: queued for the output thread, within a window."""
        self._queue_output(record, "data", (fd, data), len(data))

    def _queue_output(self, record: ExecRecord, kind: str, payload: Any, size: int) -> None:
        run = record.python
        assert run is not None
        if record.stream.ended:
            return
        self._outq.put((record, kind, payload))
        with run.credit:
            run.unsent += size
            while run.unsent > PYTHON_OUTPUT_WINDOW and not record.stream.ended:
                run.credit.wait(0.5)

    def _display(self, record: ExecRecord, bundle: dict[str, str]) -> None:
        """A display bundle of a threaded Python exec: queued behind its output, in the window."""
        self._queue_output(record, "display", bundle, bundle_size(bundle))

    def _output_loop(self) -> None:
        while True:
            item = self._outq.get()
            if item is None:
                return
            record, kind, payload = item
            try:
                if kind == "data":
                    fd, data = payload
                    record.stream.emit("data", fd=fd, data=data)
                    self._credit(record, len(data))
                elif kind == "display":
                    record.stream.emit("display", bundle=payload)
                    self._credit(record, bundle_size(payload))
                elif kind == "exit":
                    self._finish(record, payload)
                elif kind == "abandon":
                    self._finish(record, None)
            except Exception:
                log_exception(f"python exec {record.exec_id}: output failed")

    @staticmethod
    def _credit(record: ExecRecord, sent: int) -> None:
        run = record.python
        assert run is not None
        with run.credit:
            run.unsent -= sent
            run.credit.notify_all()

    def _inject(self, record: ExecRecord, exc_type: type[BaseException], name: str) -> None:
        run = record.python
        assert run is not None
        with run.lock:
            if not run.interruptible or run.thread_id is None:
                return
            run.signalled = name
            _set_async_exc(run.thread_id, exc_type)
        run.streams.stdin_buffer.wake()

    def _timeout(self, record: ExecRecord) -> None:
        run = record.python
        assert run is not None
        if record.stream.ended:
            return
        run.timed_out = True
        self._inject(record, ExecTimeoutError, "TIMEOUT")
        self._schedule_abandon(record)

    def _schedule_abandon(self, record: ExecRecord) -> None:
        run = record.python
        if run is not None and self._scheduler is not None:
            run.timers.append(
                self._scheduler.call_later(PYTHON_KILL_GRACE, lambda: self._outq.put((record, "abandon", None)))
            )

    # -----------------------------------------------------------------------------------------
    # One thread (WASI)
    # -----------------------------------------------------------------------------------------

    def _sink_inline(self, record: ExecRecord, fd: str, data: bytes) -> None:
        record.stream.emit("data", fd=fd, data=data)
        self._check_deadline(record)

    def _display_inline(self, record: ExecRecord, bundle: dict[str, str]) -> None:
        record.stream.emit("display", bundle=bundle)
        self._check_deadline(record)

    def _check_deadline(self, record: ExecRecord) -> None:
        """Single thread: the exec's deadline is enforced where it does I/O (module doc)."""
        run = record.python
        if run is None or record.deadline is None or run.timed_out:
            return
        if time.monotonic() >= record.deadline:
            run.timed_out = True
            raise ExecTimeoutError(f"the exec ran past its timeout of {record.timeout:g} s")

    def _pump_for(self, record: ExecRecord) -> None:
        """Single thread: the exec waits for stdin, so read and handle one frame (module doc)."""
        run = record.python
        assert run is not None
        stdin = run.streams.stdin_buffer
        try:
            request = self._channel.receive()
        except ProtocolError:
            request = None  # the channel is broken: the request loop reports it afterwards
        if request is None:
            stdin.close_input()
            return
        if not request.op.nested:
            busy = ProtocolError(
                "busy",
                f"exec {record.exec_id!r:.80} is running and this agent runs one request at a "
                "time (no exec.concurrent); retry when it ends",
            )
            self._channel.error(request.id, busy)
            return
        self._handle(request)

    # -----------------------------------------------------------------------------------------
    # Both
    # -----------------------------------------------------------------------------------------

    def _finish(self, record: ExecRecord, outcome: Outcome | None) -> None:
        """End a Python exec's stream (once). `outcome` None: the thread was interrupted
        outside user code, or abandoned after a timeout or SIGKILL."""
        run = record.python
        assert run is not None
        if outcome is None:
            outcome = Outcome(None, run.signalled if run.signalled != "TIMEOUT" else None)
        fields: dict[str, Any] = {
            "exit_code": outcome.exit_code,
            "signal": outcome.signal,
            "duration_ms": round((time.monotonic() - record.started) * 1000, 3),
        }
        if run.timed_out:
            fields["error"] = ProtocolError(
                "timeout", f"the exec ran past its timeout of {record.timeout:g} s"
            ).to_wire()
        for timer in run.timers:
            timer.cancel()
        if not record.stream.ended:  # only this thread ends python streams
            self._ended(record, outcome.exit_code, outcome.signal)
            self._router.finished(run.streams)
            record.stream.emit("end", **fields)
        with run.credit:
            run.credit.notify_all()  # an abandoned thread waiting for credit: it is dropped now


def _set_async_exc(thread_id: int | None, exc_type: type[BaseException] | None) -> None:
    """Raise `exc_type` in the thread at its next bytecode (None: cancel a pending one)."""
    if thread_id is None:
        return
    try:
        import ctypes
    except ImportError:
        return
    arg = ctypes.py_object(exc_type) if exc_type is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), arg)
