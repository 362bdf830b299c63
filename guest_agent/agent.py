"""The agent's protocol handling: decoded requests in, replies and stream events out.

`Agent.handle(message)` dispatches one decoded request; everything the agent says goes through
the `send` callable it was given. No bytes, fds or frames here (see `channel` and `serve`), so
tests can drive it directly.

Threads (host): requests are handled on the caller's thread (the request loop). Streams run
elsewhere: a pump thread per process exec (`procexec`), a thread per Python exec, a thread per
fs.read. A Python exec's thread never writes a frame itself: an exception injected into it
(timeout, SIGINT) could land between two writes of one frame and corrupt the channel. It hands
its output to one output thread, through a C-level queue, with a bounded window of unsent bytes
for backpressure. One timer thread runs Python exec deadlines and stream keepalives.

One thread (WASI): a Python exec runs inside `handle`, so requests that arrive meanwhile wait
in the channel (no `exec.concurrent`), except when the exec reads stdin with nothing buffered:
then the read itself pulls frames from the channel, handles exec.input / exec.close_stdin and
the harmless ops in `NESTED_OPS` (ping, metrics, exec.list, ...) and answers every other request
`busy` (retryable). There are no keepalives and no hard timeout on that platform: a deadline is
checked whenever the exec writes output or reads stdin, and the runtime enforces its own.
"""

from __future__ import annotations

import os
import queue
import signal as signal_mod
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any

from . import __version__
from ._log import log, log_exception
from .channel import Channel
from .features import Features, detect
from .fsops import FileOps, Root, os_error, read_chunks
from .pyexec import (
    ExecStreams,
    ExecTerminated,
    Namespaces,
    Outcome,
    StdStreams,
    StreamRouter,
    run_cell,
)
from .signals import signal_name, signal_number
from .timers import Scheduler, Timer

if TYPE_CHECKING:
    from .system import SandboxCgroup

from . import protocol
from .schema import PYTHON_NAMESPACE_DEFAULT, Request
from .wire import PROTOCOL_VERSION, ProtocolError, field

AGENT = f"sandgate-guest/{__version__}"
MAX_RUNNING_EXECS = 256
#: Finished execs kept for exec.list.
EXEC_HISTORY = 64
MAX_FS_READS = 64
#: After a timeout or SIGKILL, how long a Python exec gets to unwind before its stream is ended
#: without it (its thread is then abandoned: its later output is dropped).
PYTHON_KILL_GRACE = 1.0
#: Unsent output bytes a Python exec may have queued before its writes block.
PYTHON_OUTPUT_WINDOW = 1 << 20
_TERMINATING = ("SIGTERM", "SIGKILL", "SIGHUP", "SIGQUIT")

class Stream:
    """The agent's handle on one stream: the channel's leg numbers its events and ends it once."""

    def __init__(self, channel: Channel, request_id: int) -> None:
        self._channel = channel
        self.request_id = request_id
        self.ended = False

    def emit(self, ev: str, **fields: Any) -> bool:
        """Send one event; False (and nothing sent) once the stream has ended."""
        if self.ended:
            return False
        if ev == "end":
            self.ended = True
        return self._channel.event(self.request_id, ev, **fields)


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


@dataclass
class ExecRecord:
    exec_id: str
    tag: str | None
    stream: Stream
    started: float
    deadline: float | None
    timeout: float | None
    pid: int | None = None
    running: bool = True
    exit_code: int | None = None
    signal: str | None = None
    process: Any = None  # procexec.ProcessExec, imported only where processes exist
    python: PythonRun | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "exec_id": self.exec_id,
            "tag": self.tag,
            "pid": self.pid,
            "running": self.running,
            "exit_code": self.exit_code,
        }


class Agent:
    """The guest agent's protocol state: exec registry, namespaces, the root.

    Args:
        root: the sandbox root: fs ops are confined to it, execs start in it.
        channel: the agent leg to the gateway: requests in (read by a single-threaded platform's
            Python exec too, while it waits for stdin), replies and events out (thread-safe).
        features: the platform's abilities (detected if not given).
        install_std_streams: replace sys.stdout/stderr/stdin with per-exec proxies.
        replace_dunder: also replace sys.__stdout__ & co. (when they are the channel).
        cgroup: where started processes are kept (a microVM's sandbox cgroup), if anywhere.
    """

    def __init__(
        self,
        root: str,
        channel: Channel,
        *,
        features: Features | None = None,
        install_std_streams: bool = True,
        replace_dunder: bool = False,
        cgroup: SandboxCgroup | None = None,
    ) -> None:
        self.features = features or detect()
        self._cgroup = cgroup
        self.root = Root(root)
        self.files = FileOps(self.root)
        self.channel = channel
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._execs: OrderedDict[str, ExecRecord] = OrderedDict()
        self._pgids: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._fs_reads = 0
        self._namespaces = Namespaces()
        self._exec_count = 0
        self._router = StreamRouter()
        self._std = StdStreams(self._router, replace_dunder=replace_dunder)
        if install_std_streams:
            self._std.install()
        self._install_std_streams = install_std_streams
        self._closed = False
        # One handler per agent-leg op of the schema (a test checks they match).
        self._handlers: dict[str, Callable[[int, Mapping[str, Any]], dict[str, Any] | None]] = {
            "hello": self._hello,
            "ping": self._ping,
            "metrics": self._metrics,
            "exec.start": self._exec_start,
            "exec.input": self._exec_input,
            "exec.close_stdin": self._exec_close_stdin,
            "exec.signal": self._exec_signal,
            "exec.resize": self._exec_resize,
            "exec.list": self._exec_list,
            "fs.stat": lambda rid, m: self.files.stat(m),
            "fs.list": lambda rid, m: self.files.list(m),
            "fs.read": self._fs_read,
            "fs.write": lambda rid, m: self.files.write(m),
            "fs.mkdir": lambda rid, m: self.files.mkdir(m),
            "fs.move": lambda rid, m: self.files.move(m),
            "fs.remove": lambda rid, m: self.files.remove(m),
        }
        if self.features.system:
            from . import system  # now, so a snapshot holds it loaded: see system.py

            system.protect_agent()

            self._handlers["guest.setup"] = self._guest_setup
        self._outq: queue.SimpleQueue[tuple[ExecRecord, str, Any] | None] = queue.SimpleQueue()
        self._scheduler: Scheduler | None = None
        self._output_thread: threading.Thread | None = None
        if self.features.threads:
            self._scheduler = Scheduler()
            self._scheduler.start()
            self._output_thread = threading.Thread(target=self._output_loop, name="agent-python-output", daemon=True)
            self._output_thread.start()
            self._schedule_keepalives()

    # -----------------------------------------------------------------------------------------
    # Dispatch
    # -----------------------------------------------------------------------------------------

    def handle(self, request: Request) -> None:
        """Handle one request the leg validated. Never raises: every failure becomes an error reply."""
        rid = request.id
        try:
            handler = self._handlers.get(request.op.name)
            if handler is None:  # in the schema, but not on this platform (guest.setup without --vm)
                raise ProtocolError("unsupported", f"this agent does not offer {request.op.name}")
            result = handler(rid, request.args)
        except ProtocolError as exc:
            self.channel.error(rid, exc)
        except OSError as exc:
            self.channel.error(rid, os_error(exc))
        except Exception as exc:
            log_exception(f"request {rid} failed")
            self.channel.error(rid, ProtocolError("internal", f"{type(exc).__name__}: {exc}"))
        else:
            if result is not None:
                self.channel.reply(rid, result)

    def shutdown(self) -> None:
        """Kill every process the agent started and stop its threads (the channel is gone)."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            records = [rec for rec in self._execs.values() if rec.running]
            pgids = set(self._pgids)
        for rec in records:
            if rec.python is not None:
                rec.python.streams.terminated_by = "SIGKILL"
                self._inject(rec, ExecTerminated, "SIGKILL")
        for pgid in pgids:  # running execs and whatever their finished ones left behind
            try:
                os.killpg(pgid, signal_mod.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._cgroup is not None:  # and whatever left its process group
            self._cgroup.kill_all()
        deadline = time.monotonic() + 5.0
        python_deadline = time.monotonic() + PYTHON_KILL_GRACE
        for thread in list(self._threads):
            # A Python exec stuck in a C call cannot be stopped: do not wait long for it.
            limit = python_deadline if thread.name.startswith("python-") else deadline
            thread.join(max(0.0, limit - time.monotonic()))
        if self._scheduler is not None:
            self._scheduler.stop()
        if self._output_thread is not None:
            self._outq.put(None)
            self._output_thread.join(max(0.0, deadline - time.monotonic()))
        if self._install_std_streams:
            self._std.uninstall()

    # -----------------------------------------------------------------------------------------
    # Lifecycle, liveness, metrics
    # -----------------------------------------------------------------------------------------

    def _hello(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        version = field(message, "version", int)
        if version != PROTOCOL_VERSION:
            raise ProtocolError("unsupported", f"protocol version {version} (this agent speaks {PROTOCOL_VERSION})")
        return {
            "version": PROTOCOL_VERSION,
            "agent": AGENT,
            "capabilities": self.features.capabilities,
            "platform": self.features.platform,
            "max_frame": self.channel.max_frame,
        }

    def _guest_setup(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        from .system import setup

        return setup(message, root=self.root.real, cgroup=self._cgroup)

    def _ping(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def _metrics(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        from .metrics import guest_metrics

        with self._lock:
            running = sum(1 for rec in self._execs.values() if rec.running)
        return guest_metrics(self.root.real, self._started, running, whole_machine=self.features.system)

    # -----------------------------------------------------------------------------------------
    # exec
    # -----------------------------------------------------------------------------------------

    def _exec_start(self, rid: int, message: Mapping[str, Any]) -> None:
        # Validated by the schema where it entered (protocol.AgentLeg): types, bounds, defaults.
        exec_id = message["exec_id"] if "exec_id" in message else field(message, "exec_id", str)
        tag = message.get("tag")
        code = message.get("code")
        stdin = message.get("stdin", b"")
        pty = message.get("pty")
        stdin_open = message["stdin_open"]
        env = message.get("env", {})
        timeout = message.get("timeout")
        cwd = message.get("cwd")
        cwd_path = None if cwd is None else self._exec_cwd(cwd)
        with self._lock:
            existing = self._execs.get(exec_id)
            if existing is not None and existing.running:
                raise ProtocolError("exists", f"exec {exec_id!r:.80} is running")
            if sum(1 for rec in self._execs.values() if rec.running) >= MAX_RUNNING_EXECS:
                raise ProtocolError("busy", f"{MAX_RUNNING_EXECS} execs are running")
        now = time.monotonic()
        record = ExecRecord(
            exec_id=exec_id,
            tag=tag,
            stream=Stream(self.channel, rid),
            started=now,
            deadline=None if timeout is None else now + float(timeout),
            timeout=None if timeout is None else float(timeout),
        )
        if code is not None:
            language = message["language"]
            if language != "python":
                raise ProtocolError("unsupported", f"language {language!r:.40} is not run by the agent")
            namespace = message.get("namespace", PYTHON_NAMESPACE_DEFAULT)
            self._start_python(record, code, namespace, stdin, stdin_open, env, cwd_path)
        else:
            cwd_path = cwd_path or self.root.real
            self._start_process(record, message["command"], stdin, stdin_open, env, cwd_path, pty)

    def _exec_cwd(self, cwd: str) -> str:
        """The working directory: relative paths are under the root; absolute ones are taken as
        they are (an exec can cd anywhere anyway: confining its cwd would protect nothing)."""
        path = cwd if cwd.startswith("/") else os.path.join(self.root.real, cwd)
        try:
            if not os.path.isdir(path):
                os.stat(path)  # raises FileNotFoundError for a missing one
                raise NotADirectoryError(20, "Not a directory")
        except OSError as exc:
            raise os_error(exc, cwd) from None
        return path

    def _register(self, record: ExecRecord) -> None:
        with self._lock:
            self._execs.pop(record.exec_id, None)
            self._execs[record.exec_id] = record
            self._exec_count += 1

    def _exec_ended(self, record: ExecRecord, exit_code: int | None, sig: str | None) -> None:
        with self._lock:
            record.running = False
            record.exit_code = exit_code
            record.signal = sig
            finished = [k for k, rec in self._execs.items() if not rec.running]
            for key in finished[: max(0, len(finished) - EXEC_HISTORY)]:
                del self._execs[key]

    def _find(self, message: Mapping[str, Any]) -> ExecRecord:
        exec_id = field(message, "exec_id", str)
        with self._lock:
            record = self._execs.get(exec_id)
        if record is None:
            raise ProtocolError("not_found", f"no exec {exec_id!r:.80}")
        if not record.running:
            raise ProtocolError("not_found", f"exec {exec_id!r:.80} has ended")
        return record

    def _exec_input(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        data = message["data"]
        record = self._find(message)
        if record.python is not None:
            record.python.streams.stdin_buffer.feed(data)
        else:
            record.process.write_input(data)
        return {}

    def _exec_close_stdin(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        record = self._find(message)
        if record.python is not None:
            record.python.streams.stdin_buffer.close_input()
        else:
            record.process.close_stdin()
        return {}

    def _exec_signal(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        number = signal_number(message["signal"])
        record = self._find(message)
        if record.python is None:
            record.process.send_signal(number)
            return {}
        name = signal_name(number)
        if not self.features.async_exc:
            raise ProtocolError("unsupported", "in-interpreter execs cannot be signalled here")
        if name == "SIGINT":
            self._inject(record, KeyboardInterrupt, name)
        elif name in _TERMINATING:
            record.python.streams.terminated_by = name
            self._inject(record, ExecTerminated, name)
            if name == "SIGKILL":
                self._schedule_abandon(record)
        else:
            raise ProtocolError(
                "unsupported", f"{name} means nothing to in-interpreter Python (SIGINT, SIGTERM, SIGKILL do)"
            )
        return {}

    def _exec_resize(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        rows, cols = message["rows"], message["cols"]
        record = self._find(message)
        if record.python is not None:
            raise ProtocolError("bad_request", "this exec has no pty")
        record.process.resize(rows, cols)
        return {}

    def _exec_list(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {"execs": [rec.summary() for rec in self._execs.values()]}

    # -- processes ----------------------------------------------------------------------------

    def _start_process(
        self,
        record: ExecRecord,
        command: list[Any] | str,
        stdin: bytes,
        stdin_open: bool,
        env: dict[str, str],
        cwd: str,
        pty: dict[str, Any] | None,
    ) -> None:
        if not self.features.processes:
            raise ProtocolError("unsupported", "this sandbox cannot run processes (no exec.process)")
        if pty is not None and not self.features.pty:
            raise ProtocolError("unsupported", "this sandbox has no pseudo-terminals (no exec.pty)")
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        window = None if pty is None else (pty["rows"], pty["cols"])
        from .procexec import ProcessExec, build_env

        def on_end(exit_code: int | None, sig: str | None) -> None:
            self._exec_ended(record, exit_code, sig)

        try:
            process = ProcessExec(
                argv,
                cwd=cwd,
                env=build_env(self.root.real, env, pty=window is not None),
                emit=record.stream.emit,
                on_end=on_end,
                stdin=stdin,
                stdin_open=stdin_open,
                timeout=record.timeout,
                pty=window,
                cgroup=self._cgroup,
            )
        except FileNotFoundError:
            raise ProtocolError("not_found", f"command not found: {argv[0]!r:.200}") from None
        except OSError as exc:
            raise os_error(exc, argv[0]) from None
        record.process = process
        record.pid = process.pid
        with self._lock:
            self._pgids.add(process.pgid)
        self._register(record)
        record.stream.emit("start", exec_id=record.exec_id, pid=process.pid)
        self._spawn_thread(f"exec-{record.exec_id}", lambda: self._pump(record))

    def _pump(self, record: ExecRecord) -> None:
        try:
            record.process.pump()
        except Exception as exc:
            log_exception(f"exec {record.exec_id} pump failed")
            record.process.kill()
            error = ProtocolError("internal", f"{type(exc).__name__}: {exc}").to_wire()
            duration = round((time.monotonic() - record.started) * 1000, 3)
            self._exec_ended(record, None, None)
            record.stream.emit("end", exit_code=None, signal=None, duration_ms=duration, error=error)

    def _spawn_thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    # -- python -------------------------------------------------------------------------------

    def _start_python(
        self,
        record: ExecRecord,
        source: str,
        namespace_name: str,
        stdin: bytes,
        stdin_open: bool,
        env: dict[str, str],
        cwd: str | None,
    ) -> None:
        namespace = self._namespaces.get(namespace_name)
        threaded = self.features.threads
        if threaded:
            streams = ExecStreams.create(lambda fd, data: self._python_sink(record, fd, data))
        else:
            streams = ExecStreams.create(
                lambda fd, data: self._python_sink_inline(record, fd, data),
                pump=lambda: self._pump_for(record),
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
                run.timers.append(self._scheduler.call_later(record.timeout, lambda: self._python_timeout(record)))
            self._spawn_thread(f"python-{record.exec_id}", lambda: self._python_thread(record))
            return
        self._router.bind(streams)
        try:
            outcome = run_cell(source, namespace, run.filename, streams)
            streams.output.flush()
        finally:
            self._router.bind(None)
        self._finish_python(record, outcome)

    def _python_thread(self, record: ExecRecord) -> None:
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

    def _python_sink(self, record: ExecRecord, fd: str, data: bytes) -> None:
        """Output of a threaded Python exec: queued for the output thread, within a window."""
        run = record.python
        assert run is not None
        if record.stream.ended:
            return
        self._outq.put((record, "data", (fd, data)))
        with run.credit:
            run.unsent += len(data)
            while run.unsent > PYTHON_OUTPUT_WINDOW and not record.stream.ended:
                run.credit.wait(0.5)

    def _python_sink_inline(self, record: ExecRecord, fd: str, data: bytes) -> None:
        record.stream.emit("data", fd=fd, data=data)
        self._check_deadline(record)

    def _check_deadline(self, record: ExecRecord) -> None:
        """Single thread: the exec's deadline is enforced where it does I/O (module doc)."""
        run = record.python
        if run is None or record.deadline is None or run.timed_out:
            return
        if time.monotonic() >= record.deadline:
            run.timed_out = True
            raise TimeoutError(f"the exec ran past its timeout of {record.timeout:g} s")

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
                    run = record.python
                    assert run is not None
                    with run.credit:
                        run.unsent -= len(data)
                        run.credit.notify_all()
                elif kind == "exit":
                    self._finish_python(record, payload)
                elif kind == "abandon":
                    self._finish_python(record, None)
            except Exception:
                log_exception(f"python exec {record.exec_id}: output failed")

    def _finish_python(self, record: ExecRecord, outcome: Outcome | None) -> None:
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
            self._exec_ended(record, outcome.exit_code, outcome.signal)
            self._router.finished(run.streams)
            record.stream.emit("end", **fields)
        with run.credit:
            run.credit.notify_all()  # an abandoned thread waiting for credit: it is dropped now

    def _inject(self, record: ExecRecord, exc_type: type[BaseException], name: str) -> None:
        run = record.python
        assert run is not None
        with run.lock:
            if not run.interruptible or run.thread_id is None:
                return
            run.signalled = name
            _set_async_exc(run.thread_id, exc_type)
        run.streams.stdin_buffer.wake()

    def _python_timeout(self, record: ExecRecord) -> None:
        run = record.python
        assert run is not None
        if record.stream.ended:
            return
        run.timed_out = True
        self._inject(record, TimeoutError, "TIMEOUT")
        self._schedule_abandon(record)

    def _schedule_abandon(self, record: ExecRecord) -> None:
        run = record.python
        if run is not None and self._scheduler is not None:
            run.timers.append(
                self._scheduler.call_later(PYTHON_KILL_GRACE, lambda: self._outq.put((record, "abandon", None)))
            )

    def _pump_for(self, record: ExecRecord) -> None:
        """Single thread: the exec waits for stdin, so read and handle one frame (module doc)."""
        run = record.python
        assert run is not None
        stdin = run.streams.stdin_buffer
        try:
            request = self.channel.receive()
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
            self.channel.error(request.id, busy)
            return
        self.handle(request)

    # -----------------------------------------------------------------------------------------
    # fs.read (stream)
    # -----------------------------------------------------------------------------------------

    def _fs_read(self, rid: int, message: Mapping[str, Any]) -> None:
        with self._lock:
            if self._fs_reads >= MAX_FS_READS:
                raise ProtocolError("busy", f"{MAX_FS_READS} fs.read streams are running")
            self._fs_reads += 1
        try:
            fd, size, _offset, length = self.files.open_read(message)
        except BaseException:
            with self._lock:
                self._fs_reads -= 1
            raise
        stream = Stream(self.channel, rid)
        path = message.get("path")

        def run() -> None:
            sent = 0
            try:
                stream.emit("start", size=size)
                for chunk in read_chunks(fd, length):
                    stream.emit("data", data=chunk)
                    sent += len(chunk)
                stream.emit("end", bytes=sent)
            except OSError as exc:
                stream.emit("end", bytes=sent, error=os_error(exc, str(path)).to_wire())
            finally:
                os.close(fd)
                with self._lock:
                    self._fs_reads -= 1

        if self.features.threads:
            self._spawn_thread(f"fs-read-{rid}", run)
        else:
            run()

    # -----------------------------------------------------------------------------------------
    # keepalives
    # -----------------------------------------------------------------------------------------

    def _schedule_keepalives(self) -> None:
        assert self._scheduler is not None

        def tick() -> None:
            self.channel.keepalives()
            if not self._closed and self._scheduler is not None:
                self._scheduler.call_later(protocol.KEEPALIVE_IDLE / 3, tick)

        self._scheduler.call_later(protocol.KEEPALIVE_IDLE / 3, tick)


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


def serve(channel: Channel, agent: Agent) -> int:
    """The request loop: frames in, `agent.handle`, until EOF (0) or a framing error (2).

    Either way every process the agent started is killed before this returns.
    """
    try:
        while (request := channel.receive()) is not None:
            agent.handle(request)
        return 0
    except ProtocolError as exc:
        # The byte stream cannot be resynchronised: say why (best effort) and close.
        log(f"closing the channel: {exc.code}: {exc.message}")
        channel.error(None, exc)
        return 2
    finally:
        agent.shutdown()
