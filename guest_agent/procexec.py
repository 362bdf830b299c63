"""Process execs (`exec.start` with `command`): pipes or a pty, one pump thread per exec.

Each process gets its own session and process group (`start_new_session=True`, which keeps
`subprocess` on its fast vfork path: ordinary execs have no `preexec_fn`), so exec.signal, the
timeout and the agent's final kill reach everything it started, not only the first process.

One thread per exec (`ProcessExec.pump`) moves all its bytes with a selector: stdout and stderr
(or the pty master) to `data` events, buffered exec.input to the stdin pipe, and the process's
exit (a pidfd where the kernel has them, else a short poll). Output is read only as fast as the
channel takes it, so a slow gateway stalls the process instead of filling the agent's memory.

End of an exec: when the process has exited, the output already in the pipes is read and the
`end` event sent. Descendants that still hold the pipes keep running; whatever they write after
the end is read and discarded (not SIGPIPE'd) until they close them. The agent kills every
process group it started when it exits.
"""

from __future__ import annotations

import errno
import os
import selectors
import shutil
import signal as signal_mod
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import sandbox_env
from .signals import signal_name
from .wire import CHUNK_SIZE, ProtocolError

if TYPE_CHECKING:
    from .system import SandboxCgroup

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: exec.input beyond this much unwritten stdin is answered `busy` (retryable).
STDIN_LIMIT = 1 << 20
#: After the process exits, read at most this much more before sending `end`.
_DRAIN_LIMIT = 4 << 20
#: Without pidfds, how often a process whose pipes are still open is polled for its exit.
_POLL_INTERVAL = 0.05
_EOF_CHAR = b"\x04"

Emit = Callable[..., Any]


#: The agent's own variables every process it starts gets: how the sandbox reaches the network
#: (a microVM's init sets them to the host's egress proxy; the guest has no other way out).
INHERITED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def build_env(root: str, extra: Mapping[str, str], *, pty: bool) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": root, "LANG": "C.UTF-8"}
    env.update({name: os.environ[name] for name in INHERITED_ENV if name in os.environ})
    env.update(sandbox_env.ENV)
    if pty:
        env["TERM"] = "xterm-256color"
    env.update(extra)
    return env


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    import fcntl
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _become_terminal_owner() -> None:
    """preexec_fn of pty execs only: a new session whose controlling terminal is the pty (fd 0).

    Runs in the forked child; fcntl and termios are imported by the parent beforehand.
    """
    import fcntl
    import termios

    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _check_runnable(program: str, env: Mapping[str, str], cwd: str) -> None:
    """FileNotFoundError unless `program` names something executable (as execvp would find it)."""
    if "/" in program:
        if not os.access(os.path.join(cwd, program), os.X_OK):
            raise FileNotFoundError(program)
    elif shutil.which(program, path=env.get("PATH", DEFAULT_PATH)) is None:
        raise FileNotFoundError(program)


class ProcessExec:
    """One running process and its pump.

    Args:
        argv: the program and its arguments (a shell string is already `/bin/sh -c` here).
        emit: sends the exec's stream events (`data`, `end`); thread-safe.
        on_end: called (on the pump thread) just before `end` is sent, with (exit_code, signal).
        pty: (rows, cols) to run on a pseudo-terminal, else None.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        cwd: str,
        env: dict[str, str],
        emit: Emit,
        on_end: Callable[[int | None, str | None], None],
        stdin: bytes = b"",
        stdin_open: bool = False,
        timeout: float | None = None,
        pty: tuple[int, int] | None = None,
        cgroup: SandboxCgroup | None = None,
    ) -> None:
        self._cgroup = cgroup
        self._emit = emit
        self._on_end = on_end
        self._timeout = timeout
        self._lock = threading.Lock()
        self._stdin_data = bytearray(stdin)
        if pty is not None and not stdin_open:
            self._stdin_data += _EOF_CHAR  # a terminal's "close": ^D after the given input
        self._stdin_closing = not stdin_open
        self._stdin_broken = False
        self._stdin_fd: int | None = None
        self._outputs: dict[int, str] = {}
        self._master: int | None = None
        self._pty = pty is not None
        self._sel: selectors.BaseSelector = selectors.DefaultSelector()
        self._registered: dict[int, int] = {}  # fd -> events, as registered in _sel
        self.started = time.monotonic()
        self.finished = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        try:
            self.proc = self._spawn(argv, cwd, env, pty)
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._sel.close()
            raise
        self.pid = self.proc.pid
        self.pgid = self.proc.pid  # its own session leader, hence group leader

    def _spawn(
        self, argv: list[str], cwd: str, env: dict[str, str], pty: tuple[int, int] | None
    ) -> subprocess.Popen[bytes]:
        if self._cgroup is not None:
            _check_runnable(argv[0], env, cwd)  # the wrapper would turn "not found" into exit 127
        if pty is None:
            if self._cgroup is not None:
                argv = self._cgroup.wrap(argv)
            # Our own pipes (os.pipe fds are close-on-exec; Popen dup2s the child's ends onto
            # 0, 1 and 2), so the pump owns plain fds and no file object ever closes them.
            pipes = [os.pipe() for _ in range(3)]
            child_ends = [pipes[0][0], pipes[1][1], pipes[2][1]]
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=child_ends[0],
                    stdout=child_ends[1],
                    stderr=child_ends[2],
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
            except BaseException:
                for fd in (pipes[0][1], pipes[1][0], pipes[2][0]):
                    os.close(fd)
                raise
            finally:
                for fd in child_ends:
                    os.close(fd)
            self._stdin_fd = pipes[0][1]
            self._outputs = {pipes[1][0]: "stdout", pipes[2][0]: "stderr"}
        else:
            import fcntl  # noqa: F401  (imported before the fork: the preexec_fn uses them)
            import termios  # noqa: F401

            master, slave = os.openpty()
            try:
                _set_winsize(master, *pty)
                proc = subprocess.Popen(
                    argv,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=cwd,
                    env=env,
                    preexec_fn=_become_terminal_owner if self._cgroup is None else self._cgroup.enter_then(
                        _become_terminal_owner
                    ),
                )
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self._master = master
            self._stdin_fd = master
            self._outputs = {master: "pty"}
        for fd in {*self._outputs, self._stdin_fd}:
            if fd is not None:
                os.set_blocking(fd, False)
        return proc

    # -- control, from the request loop -------------------------------------------------------

    def write_input(self, data: bytes) -> None:
        with self._lock:
            if self._stdin_closing:
                raise ProtocolError("bad_request", "stdin of this exec is closed")
            if self._stdin_broken:
                return  # the process closed its stdin: dropped, like writes to a dead pipe
            if len(self._stdin_data) + len(data) > STDIN_LIMIT:
                raise ProtocolError(
                    "busy",
                    f"the process has not read {len(self._stdin_data)} bytes of stdin; retry later",
                )
            self._stdin_data += data
        self._wake()

    def close_stdin(self) -> None:
        with self._lock:
            if self._pty and not self._stdin_closing:
                # A terminal has no half-close: send its EOF character, as a typed ^D would.
                self._stdin_data += _EOF_CHAR
            self._stdin_closing = True
        self._wake()

    def send_signal(self, number: int) -> None:
        if self.finished:
            return
        try:
            os.killpg(self.pgid, number)
        except ProcessLookupError:
            pass

    def resize(self, rows: int, cols: int) -> None:
        with self._lock:  # the pump closes the master under this lock
            if not self._pty:
                raise ProtocolError("bad_request", "this exec has no pty")
            if self._master is None:
                return  # the exec is ending
            try:
                _set_winsize(self._master, rows, cols)
            except OSError as exc:
                raise ProtocolError("io_error", exc.strerror or "resize failed") from None

    def kill(self) -> None:
        """Kill the whole process group (the agent is exiting)."""
        try:
            os.killpg(self.pgid, signal_mod.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _wake(self) -> None:
        with self._lock:  # the pump closes the pipe under this lock: never write a reused fd
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # already woken

    # -- the pump, on its own thread ----------------------------------------------------------

    def pump(self) -> None:
        sel = self._sel
        pidfd = self._open_pidfd()
        try:
            exit_code, sig, timed_out = self._run_live(sel, pidfd)
            self._drain(_DRAIN_LIMIT)
            fields: dict[str, Any] = {
                "exit_code": exit_code,
                "signal": sig,
                "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            }
            if timed_out:
                fields["error"] = ProtocolError(
                    "timeout", f"the exec ran past its timeout of {self._timeout:g} s and was killed"
                ).to_wire()
            self.finished = True
            self._on_end(exit_code, sig)  # first: a client that saw `end` finds the exec ended
            self._emit("end", **fields)
            self._close_stdin_fd()
            self._discard_until_eof(sel)
        finally:
            sel.close()
            for fd in list(self._outputs):
                self._close_output(fd)
            self._close_stdin_fd()
            self._close_master()
            with self._lock:
                wake_fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
            for fd in wake_fds + ((pidfd,) if pidfd is not None else ()):
                os.close(fd)

    def _open_pidfd(self) -> int | None:
        opener = getattr(os, "pidfd_open", None)
        if opener is None:
            return None
        try:
            return opener(self.pid)  # type: ignore[no-any-return]
        except OSError:
            return None

    def _run_live(self, sel: selectors.BaseSelector, pidfd: int | None) -> tuple[int | None, str | None, bool]:
        deadline = None if self._timeout is None else self.started + self._timeout
        timed_out = False
        registered = self._registered
        while self.proc.poll() is None:
            with self._lock:
                pending = bool(self._stdin_data)
                close_now = self._stdin_closing and not pending and not self._pty
            if close_now:
                self._close_stdin_fd()
            wanted = {fd: selectors.EVENT_READ for fd in self._outputs}
            wanted[self._wake_r] = selectors.EVENT_READ
            if pidfd is not None:
                wanted[pidfd] = selectors.EVENT_READ
            if self._stdin_fd is not None and pending:
                wanted[self._stdin_fd] = wanted.get(self._stdin_fd, 0) | selectors.EVENT_WRITE
            _sync(sel, registered, wanted)
            timeout: float | None = None
            if deadline is not None and not timed_out:
                timeout = max(0.0, deadline - time.monotonic())
            if pidfd is None:
                timeout = _POLL_INTERVAL if timeout is None else min(timeout, _POLL_INTERVAL)
                if not self._outputs and not pending:
                    # Nothing to read or write: block in waitpid, which returns at the exit.
                    try:
                        self.proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        pass
                    timeout = 0
            for key, mask in sel.select(timeout):
                fd = key.fd
                if fd == self._wake_r:
                    _drain_wake(fd)
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._write_stdin()
                if mask & selectors.EVENT_READ and fd in self._outputs:
                    self._read_output(fd)
            if deadline is not None and not timed_out and time.monotonic() >= deadline:
                timed_out = True
                self.kill()
        for fd in list(registered):
            sel.unregister(fd)
            del registered[fd]
        rc = self.proc.returncode
        if rc < 0:
            return None, signal_name(-rc), timed_out
        return rc, None, timed_out

    def _read_output(self, fd: int, *, emit: bool = True) -> int:
        """Read one chunk; returns its size (0 at EOF, -1 if nothing was ready)."""
        try:
            data = os.read(fd, CHUNK_SIZE)
        except BlockingIOError:
            return -1
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's last slave closed
                raise
            data = b""
        if not data:
            self._close_output(fd)
            return 0
        if emit:
            self._emit("data", fd=self._outputs[fd], data=data)
        return len(data)

    def _drain(self, limit: int) -> None:
        """The process has exited: send what its pipes still hold, without waiting for more."""
        for fd in list(self._outputs):
            while limit > 0 and fd in self._outputs:
                got = self._read_output(fd)
                if got <= 0:
                    break
                limit -= got

    def _discard_until_eof(self, sel: selectors.BaseSelector) -> None:
        if not self._outputs:
            return
        for fd in self._outputs:
            sel.register(fd, selectors.EVENT_READ)
            self._registered[fd] = selectors.EVENT_READ
        while self._outputs:
            for key, _ in sel.select():
                self._read_output(key.fd, emit=False)

    def _write_stdin(self) -> None:
        fd = self._stdin_fd
        if fd is None:
            return
        with self._lock:
            try:
                written = os.write(fd, self._stdin_data)
            except BlockingIOError:
                written = 0
            except OSError:  # EPIPE: the process closed its stdin
                self._stdin_broken = True
                written = len(self._stdin_data)
            del self._stdin_data[:written]
            broken = self._stdin_broken and not self._pty
        if broken:
            self._close_stdin_fd()

    def _close_stdin_fd(self) -> None:
        with self._lock:
            fd, self._stdin_fd = self._stdin_fd, None
            self._stdin_broken = True
        if fd is not None and fd != self._master:
            os.close(fd)

    def _close_output(self, fd: int) -> None:
        """Stop reading `fd`. A pty master stays open until the process has exited (see
        `_close_master`): closing it hangs the terminal up, which SIGHUPs a session leader
        that has closed its tty fds (EIO here) but has not finished exiting yet."""
        if self._outputs.pop(fd, None) is None:
            return
        if self._registered.pop(fd, None) is not None:
            self._sel.unregister(fd)  # before close: the fd number may be reused at once
        if fd != self._master:
            os.close(fd)

    def _close_master(self) -> None:
        with self._lock:
            master, self._master = self._master, None
            if self._stdin_fd == master:
                self._stdin_fd = None
        if master is not None:
            self._outputs.pop(master, None)
            os.close(master)


def _sync(sel: selectors.BaseSelector, registered: dict[int, int], wanted: dict[int, int]) -> None:
    """Make the selector's registrations match `wanted` (fd -> events)."""
    for fd in list(registered):
        if fd not in wanted:
            sel.unregister(fd)
            del registered[fd]
    for fd, events in wanted.items():
        if fd not in registered:
            sel.register(fd, events)
        elif registered[fd] != events:
            sel.modify(fd, events)
        registered[fd] = events


def _drain_wake(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
