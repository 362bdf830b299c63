"""The agent's protocol handling: decoded requests in, replies and stream events out.

`Agent.handle(request)` dispatches one request the leg validated; everything the agent says goes
through the `Channel` it was given. No bytes, fds or frames here (see `channel` and `serve`), so
tests can drive it directly.

The agent is the dispatcher and the exec registry; it runs process execs (`procexec`) and fs.read
streams itself. Python execs are run by the `PythonRunner` it owns (`pyrunner`), which puts them
in the registry and marks them ended through callbacks the agent gives it.

Threads (host): requests are handled on the caller's thread (the request loop). Streams run
elsewhere: a pump thread per process exec, a thread per fs.read, and the Python execs' threads
(`pyrunner`). One timer thread runs Python exec deadlines and stream keepalives.

One thread (WASI): everything runs inside `handle`, a Python exec included; while it waits for
stdin it reads requests itself (`pyrunner`). There are no keepalives.
"""

from __future__ import annotations

import os
import shutil
import signal as signal_mod
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import __version__, languages, sandbox_env
from ._log import log, log_exception
from .changes import ChangeTracker
from .channel import Channel
from .features import Features, detect
from .fsops import FileOps, Root, os_error, read_chunks
from .pyrunner import PYTHON_KILL_GRACE, PythonRunner, is_exec_thread
from .records import ExecRecord, Stream
from .signals import signal_name, signal_number, unignore_for_children
from .timers import Scheduler
from .watch import WatchRegistry

if TYPE_CHECKING:
    from .netconn import Connections
    from .system import SandboxCgroup

from . import protocol
from .schema import PYTHON_NAMESPACE_DEFAULT, Request
from .wire import PROTOCOL_VERSION, ProtocolError, field

AGENT = f"sandgate-guest/{__version__}"
MAX_RUNNING_EXECS = 256
#: Finished execs kept for exec.list.
EXEC_HISTORY = 64
MAX_FS_READS = 64


class Agent:
    """The guest agent's protocol state: the exec registry, the root, the Python exec engine.

    Args:
        root: the working directory: relative paths of fs ops and execs start there.
        fs_roots: directories absolute paths of fs ops may also lie under ("/" on a VM or pod).
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
        fs_roots: tuple[str, ...] = (),
        features: Features | None = None,
        install_std_streams: bool = True,
        replace_dunder: bool = False,
        cgroup: SandboxCgroup | None = None,
    ) -> None:
        self.features = features or detect()
        if self.features.processes:
            unignore_for_children()
        self._cgroup = cgroup
        self.root = Root(root, fs_roots)
        self.files = FileOps(self.root)
        self.changes = ChangeTracker(self.root)
        self.channel = channel
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._execs: OrderedDict[str, ExecRecord] = OrderedDict()
        self._pgids: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._fs_reads = 0
        self._exec_count = 0
        self._closed = False
        # One timer thread for the agent: the runner's deadlines and kill graces, and keepalives.
        self._scheduler: Scheduler | None = None
        if self.features.threads:
            self._scheduler = Scheduler()
            self._scheduler.start()
        self.watches = WatchRegistry(self.root, threads=self.features.threads)
        self._python = PythonRunner(
            channel,
            self.features,
            scheduler=self._scheduler,
            register=self._register,
            ended=self._exec_ended,
            spawn_thread=self._spawn_thread,
            handle=self.handle,
            install_std_streams=install_std_streams,
            replace_dunder=replace_dunder,
        )
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
            "fs.patch": lambda rid, m: self.files.patch(m),
            "fs.changes": self._fs_changes,
            "fs.watch": lambda rid, m: self.watches.start(Stream(self.channel, rid), m),
            "fs.unwatch": lambda rid, m: self.watches.stop(m["watch_id"]),
            "guest.env": lambda rid, m: sandbox_env.apply(m),
        }
        self._net: Connections | None = None
        if self.features.sockets:
            from .netconn import Connections

            self._net = Connections(channel, self._spawn_thread)
            self._handlers.update({"net.connect": self._net.connect, "net.send": self._net.send,
                                   "net.credit": self._net.credit, "net.close": self._net.close})
        if self.features.system:
            from . import system  # now, so a snapshot holds it loaded: see system.py

            system.protect_agent()

            self._handlers["guest.setup"] = self._guest_setup
        if self._scheduler is not None:
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
        self.watches.close()
        if self._net is not None:
            self._net.shutdown()
        with self._lock:
            records = [rec for rec in self._execs.values() if rec.running]
            pgids = set(self._pgids)
        for rec in records:
            if rec.python is not None:
                self._python.kill(rec)
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
            limit = python_deadline if is_exec_thread(thread) else deadline
            thread.join(max(0.0, limit - time.monotonic()))
        if self._scheduler is not None:
            self._scheduler.stop()
        self._python.close(deadline)

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
        if message.get("track_files", True):
            before = self.changes.snapshot()
            record.stream.end_fields = lambda: {"files": self.changes.since(before)}
        if code is not None and message["language"] != "python":
            self._start_language(record, message["language"], code, stdin, stdin_open, env,
                                 cwd_path or self.root.real, pty)
        elif code is not None:
            namespace = message.get("namespace", PYTHON_NAMESPACE_DEFAULT)
            self._python.start(record, code, namespace, stdin, stdin_open, env, cwd_path)
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
        cleanup, record.cleanup = record.cleanup, None
        if cleanup is not None:
            cleanup()
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
            record.python.write_input(data)
        else:
            record.process.write_input(data)
        return {}

    def _exec_close_stdin(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        record = self._find(message)
        if record.python is not None:
            record.python.close_stdin()
        else:
            record.process.close_stdin()
        return {}

    def _exec_signal(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        number = signal_number(message["signal"])
        record = self._find(message)
        if record.python is None:
            record.process.send_signal(number)
            return {}
        self._python.signal(record, signal_name(number))
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

    def _start_language(
        self,
        record: ExecRecord,
        language: str,
        code: str,
        stdin: bytes,
        stdin_open: bool,
        env: dict[str, str],
        cwd: str,
        pty: dict[str, Any] | None,
    ) -> None:
        """Code in a language other than Python: written to a fresh private directory (outside the
        sandbox's files, gone when the exec ends) and compiled and run there as one process."""
        offered = self.features.languages
        lang = languages.BY_ID.get(language)
        if lang is None or language not in offered:
            raise languages.unsupported(language, offered, "guest")
        folder = tempfile.mkdtemp(prefix=f"sandgate-{lang.id}-")
        record.cleanup = lambda: shutil.rmtree(folder, ignore_errors=True)
        try:
            process = languages.as_process(lang, code, folder, self.features.programs, os.environ)
            with open(process.source, "w", encoding="utf-8") as f:
                f.write(code)
            self._start_process(record, process.argv, stdin, stdin_open, {**process.env, **env}, cwd, pty)
        except BaseException:
            record.cleanup()
            record.cleanup = None
            raise

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

    # -----------------------------------------------------------------------------------------
    # fs.changes
    # -----------------------------------------------------------------------------------------

    def _fs_changes(self, rid: int, message: Mapping[str, Any]) -> dict[str, Any]:
        if "track" in message:
            self.changes.track(message["track"])
        return self.changes.query(since=message.get("since"), keep=message.get("keep"),
                                  advance=message.get("advance"), base=message["base"])

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


def serve(channel: Channel, agent: Agent) -> int:
    """The request loop: frames in, `agent.handle`, until EOF (0) or a framing error (2).

    Either way every process the agent started is killed before this returns.
    """
    try:
        while True:
            # A single-threaded agent polls its watches between requests (guest_agent/watch.py).
            delay = agent.watches.due()
            if delay is not None and not channel.wait(delay):
                continue
            request = channel.receive()
            if request is None:
                break
            agent.handle(request)
        return 0
    except ProtocolError as exc:
        # The byte stream cannot be resynchronised: say why (best effort) and close.
        log(f"closing the channel: {exc.code}: {exc.message}")
        channel.error(None, exc)
        return 2
    finally:
        agent.shutdown()
