"""The one op schema: every op of the protocol, its fields, bounds, defaults and flags.

Everything that knows something about an op takes it from here: the guest agent's dispatcher, the
gateway's WebSocket and REST layers and its admission checks, the Python SDK (which ops it may
retry), the JavaScript client (`GET /v1/protocol` serves `describe()`; a test compares the client's
copy) and docs/protocol.md (its op tables are checked against `markdown_tables()`).

Stdlib only: the agent imports it under CPython-on-WASI too. Sans-I/O: nothing here reads or writes.

A request is validated once, where it enters (`parse`): the agent on its leg, the gateway on the
client leg. What comes out is a `Request` whose `args` hold every declared field that was given or
has a default, each of the declared type and within bounds; unknown fields are dropped (forward
compatibility, docs/protocol.md §1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .languages import canonical as canonical_language
from .wire import CHUNK_SIZE, ERRORS, MAX_REQUEST_ID, MAX_WRITE_CHUNK, OUTPUT_FDS, ProtocolError

#: Which leg an op or field belongs to: both, only client -> gateway, only gateway -> agent.
BOTH, CLIENT, AGENT = "both", "client", "agent"

_MISSING: Any = object()

#: The integers every leg can carry: msgpack's signed 64-bit range.
MIN_INT, MAX_INT = -(2**63), 2**63 - 1
_NUMBERS = (int, float)

#: The JSON names of the field types, as `describe()` and docs/protocol.md spell them.
TYPE_NAMES: dict[type, str] = {str: "str", int: "int", float: "float", bool: "bool", bytes: "bin",
                               list: "list", dict: "map"}


@dataclass(frozen=True)
class Field:
    """One field of a request.

    `kinds` are the accepted Python types (msgpack and JSON both keep bool apart from int, and a
    float field takes an int). `low`/`high` bound a number's value, or the length of a str, bin,
    list or map. `default` is what the field means when absent (`_MISSING`: no value; `None` is a
    real default). `required` fields have no default.
    """

    name: str
    kinds: tuple[type, ...]
    doc: str
    default: Any = _MISSING
    required: bool = False
    low: float | None = None
    high: float | None = None
    leg: str = BOTH
    #: The error code for a value above `high` (a chunk too large is `frame_too_large`).
    over_code: str = "bad_request"

    def check(self, value: Any) -> Any:
        kind = type(value)  # exact: bool is not int here, as the protocol wants
        if kind in self.kinds and self.low is None and self.high is None and kind not in _NUMBERS:
            return value  # the common case, on every request: nothing more to check
        if isinstance(value, bool) and bool not in self.kinds:
            raise _mistyped(self)
        if float in self.kinds and isinstance(value, int) and not isinstance(value, bool):
            if not MIN_INT <= value <= MAX_INT:
                raise ProtocolError("bad_request", f"field {self.name!r}: a number must fit in 64 bits")
            value = float(value)
        if not isinstance(value, self.kinds):
            raise _mistyped(self)
        # What msgpack can carry to the agent (and JSON decoders accept beyond it): a 64-bit
        # integer, a finite float. Checked here so no value fails later, half-way to the agent.
        if isinstance(value, int) and not MIN_INT <= value <= MAX_INT:
            raise ProtocolError("bad_request", f"field {self.name!r}: an integer must fit in 64 bits")
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError("bad_request", f"field {self.name!r}: a number must be finite")
        measure = len(value) if isinstance(value, str | bytes | list | dict) else value
        if isinstance(measure, int | float) and not isinstance(measure, bool):
            if self.high is not None and measure > self.high and self.over_code != "bad_request":
                raise ProtocolError(self.over_code, f"field {self.name!r}: at most {self.high:g} bytes per request")
            if (self.low is not None and measure < self.low) or (self.high is not None and measure > self.high):
                what = "length" if measure is not value else "value"
                raise ProtocolError("bad_request", f"field {self.name!r}: {what} must be {self.range_text()}")
        return value

    def range_text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"{self.low:g}..{self.high:g}"
        if self.low is not None:
            return f">= {self.low:g}"
        return f"<= {self.high:g}" if self.high is not None else "any"

    @property
    def type_name(self) -> str:
        return " | ".join(TYPE_NAMES.get(k, k.__name__) for k in self.kinds)


def _mistyped(f: Field) -> ProtocolError:
    return ProtocolError("bad_request", f"field {f.name!r} must be {f.type_name}")


@dataclass(frozen=True)
class Op:
    """One op.

    Flags, each with one meaning:
      stream: answered by a stream of events (start, data..., end) instead of one reply.
      control: acts on a running exec (stdin, signal, resize): a session delivers these in the
        order they were sent, and they are forwarded while an exec runs on an agent that serves one
        request at a time (no `exec.concurrent`).
      nested: a single-threaded agent answers it while an exec waits for stdin (the others: `busy`).
      liveness: proves the peer is alive; never refused as `busy`.
      idempotent: a client may resend it unchanged after a reconnect.
    `capability` is what the sandbox must offer (None: always offered; exec.start's depends on its
    fields and is decided by `exec_capability`).
    """

    name: str
    doc: str
    result: str
    fields: tuple[Field, ...] = ()
    leg: str = BOTH
    capability: str | None = None
    stream: bool = False
    control: bool = False
    nested: bool = False
    liveness: bool = False
    idempotent: bool = False
    rules: Callable[[dict[str, Any]], None] | None = None

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)


@dataclass(frozen=True)
class Request:
    """A validated request: its id, its op, and its checked arguments."""

    id: int
    op: Op
    args: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.args.get(name, default)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op.name, **self.args}


# ---------------------------------------------------------------------------------------------
# Bounds shared by several ops
# ---------------------------------------------------------------------------------------------

MAX_PATH = 4096
MAX_EXEC_ID = 64
MAX_TAG = 128
#: A terminal's rows and columns: what TIOCSWINSZ takes (an unsigned short), on every leg.
MAX_PTY_SIDE = 0xFFFF
MAX_ENV = 4096
MAX_LIST_DEPTH = 16
#: guest.env: variables per call, and the CA certificate's size.
MAX_ENV_VARIABLES = 64
MAX_CA_PEM = 64 << 10
PYTHON_NAMESPACE_DEFAULT = "default"


def _exec_selector(*, leg_tag: str = CLIENT) -> tuple[Field, ...]:
    return (
        Field("exec_id", (str,), "the exec", low=1, high=MAX_EXEC_ID),
        Field("tag", (str,), "client leg: the latest exec with this tag, instead of exec_id", low=1, high=MAX_TAG,
              leg=leg_tag),
    )


def _needs_exec(args: dict[str, Any]) -> None:
    if "exec_id" not in args and "tag" not in args:
        raise ProtocolError("bad_request", "name the exec with 'exec_id' or 'tag'")


def _exec_start_rules(args: dict[str, Any]) -> None:
    if sum(name in args for name in ("code", "code_ref", "command")) != 1:
        raise ProtocolError("bad_request", "give exactly one of 'code' (with 'language'), 'code_ref' or 'command'")
    if "code" in args or "code_ref" in args:
        if "code" in args:  # a code_ref's language, when not given, is the cached code's
            args.setdefault("language", "python")
        if "language" in args:
            args["language"] = canonical_language(args["language"])
        # (code in other languages runs as a process, which a pty suits as it suits a command)
        if "pty" in args and ("code" not in args or args["language"] == "python"):
            raise ProtocolError("bad_request", "'pty' is for process execs ('command', or 'code' in a language "
                                               "other than python)")
    else:
        args.pop("language", None)
        args.pop("namespace", None)
        command = args["command"]
        if isinstance(command, list) and (not command or not all(isinstance(a, str) for a in command)):
            raise ProtocolError("bad_request", "'command' must be a non-empty list of strings or a string")
        if any("\0" in a for a in (command if isinstance(command, list) else [command])):
            raise ProtocolError("bad_request", "NUL byte in 'command'")
    env = args.get("env", {})
    if not all(isinstance(k, str) and isinstance(v, str) and "\0" not in k + v for k, v in env.items()):
        raise ProtocolError("bad_request", "'env' must map strings to strings (no NUL)")
    if "pty" in args:
        args["pty"] = _pty_size(args["pty"], defaults=True)
    # A terminal is interactive: its stdin stays open unless the client says otherwise.
    args.setdefault("stdin_open", "pty" in args)
    if "cwd" in args and "\0" in args["cwd"]:
        raise ProtocolError("bad_request", "NUL byte in 'cwd'")


def _env_strings(args: dict[str, Any]) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) and k and "\0" not in k + v and "=" not in k
               for k, v in args["set"].items()):
        raise ProtocolError("bad_request", "'set' must map variable names to strings (no NUL, no '=' in a name)")


def _needs_watch(args: dict[str, Any]) -> None:
    if "watch_id" not in args and "tag" not in args:
        raise ProtocolError("bad_request", "name the watch with 'watch_id' or 'tag'")


_ROWS = Field("rows", (int,), "terminal rows", required=True, low=1, high=MAX_PTY_SIDE)
_COLS = Field("cols", (int,), "terminal columns", required=True, low=1, high=MAX_PTY_SIDE)


def _code_rules(args: dict[str, Any]) -> None:
    """invoke and test: the code itself or a code_ref naming cached code."""
    if ("code" in args) == ("code_ref" in args):
        raise ProtocolError("bad_request", "give exactly one of 'code' and 'code_ref'")
    args["language"] = canonical_language(args["language"])


def _invoke_rules(args: dict[str, Any]) -> None:
    _code_rules(args)
    name = args["function"]
    if not (name.isidentifier() and name.isascii()):
        raise ProtocolError("bad_request", f"'function' must be a function's name (an ASCII identifier), not "
                                           f"{name!r:.80}")
    if not all(isinstance(k, str) and k.isidentifier() for k in args.get("kwargs", {})):
        raise ProtocolError("bad_request", "'kwargs' keys must be argument names")
    for path, content in args.get("files", {}).items():
        if not isinstance(path, str) or not (isinstance(content, str) or (
                isinstance(content, dict) and set(content) == {"base64"} and isinstance(content["base64"], str))):
            raise ProtocolError("bad_request", "'files' maps a relative path to its text or to {\"base64\": \"...\"}")


#: What a call's `code_ref` looks like: the sha256 of the code, in hex.
_CODE_REF = Field("code_ref", (str,), "client leg: the sha256 of code the gateway cached for this tenant "
                  "(`GET /v1/cache`), instead of `code`", low=64, high=64, leg=CLIENT)


def _pty_size(pty: Mapping[str, Any], *, defaults: bool) -> dict[str, int]:
    rows, cols = pty.get("rows"), pty.get("cols")
    if defaults:
        rows, cols = (24 if rows is None else rows), (80 if cols is None else cols)
    for f, value in ((_ROWS, rows), (_COLS, cols)):
        if value is None:
            raise ProtocolError("bad_request", f"missing field {f.name!r}")
        f.check(value)
    return {"rows": int(rows), "cols": int(cols)}  # type: ignore[arg-type]  # checked just above


def _path(name: str = "path", doc: str = "a path in the sandbox: relative to its root, or absolute inside it") -> Field:
    return Field(name, (str,), doc, required=True, high=MAX_PATH)  # "": the root itself


#: fs.patch's actions and the field each needs besides `path`.
PATCH_ACTIONS = {"text": None, "append": None, "mkdir": None, "copy": "src", "symlink": "target", "remove": None}


def _patch_rules(args: dict[str, Any]) -> None:
    action = args["action"]
    if action not in PATCH_ACTIONS:
        raise ProtocolError("bad_request", f"'action' is one of {', '.join(PATCH_ACTIONS)}, not {action!r:.40}")
    needed = PATCH_ACTIONS[action]
    if needed is not None and needed not in args:
        raise ProtocolError("bad_request", f"a {action} patch needs {needed!r}")
    if action in ("text", "append") and ("text" in args) == ("data" in args):
        raise ProtocolError("bad_request", f"a {action} patch has 'text' or 'data' (one of them)")


def _changes_rules(args: dict[str, Any]) -> None:
    for name in ("track", "advance"):
        if not all(isinstance(p, str) and "\0" not in p and len(p) <= MAX_PATH for p in args.get(name, [])):
            raise ProtocolError("bad_request", f"{name!r} is a list of paths")
    if "advance" in args and "since" not in args:
        raise ProtocolError("bad_request", "'advance' moves the pinned name given as 'since' forward")


#: A net.connect's default window (bytes the agent may send ahead of the gateway's credit), and the
#: most a window or one grant may be: what one connection may hold in the gateway's memory.
NET_WINDOW = 256 * 1024
MAX_NET_WINDOW = 16 << 20
_CONN_ID = Field("conn_id", (str,), "the connection (the id the gateway gave it in net.connect)", required=True,
                 low=1, high=MAX_EXEC_ID)


# ---------------------------------------------------------------------------------------------
# The ops (docs/protocol.md §3)
# ---------------------------------------------------------------------------------------------

_OPS: tuple[Op, ...] = (
    # -- lifecycle and liveness
    Op("hello", "handshake: the protocol version and what the peer offers",
       "`version`, `agent`, `capabilities`, `platform`, `max_frame` (client leg: also `gateway`, `sandbox`, "
       "`subprotocol`)",
       (Field("version", (int,), "the protocol version the sender speaks", required=True),),
       liveness=True, nested=True, idempotent=True),
    Op("ping", "liveness", "`{}`", liveness=True, nested=True, idempotent=True),
    Op("sandbox.info", "the sandbox, as `GET /v1/sandboxes/{id}` shows it", "the sandbox",
       leg=CLIENT, liveness=True, idempotent=True),
    Op("sandbox.destroy", "destroy the sandbox", "`{}`; then every session of the sandbox closes with 4404",
       leg=CLIENT),
    Op("metrics", "guest (and on the client leg, host) figures",
       "agent: `uptime_s`, `cpu_s`, `memory_bytes`, `disk_bytes`, `execs_running`; client leg: "
       "`{guest, host, restarts}` (`guest` is null while a one-request-at-a-time agent runs an exec)",
       capability="metrics", nested=True, idempotent=True),
    # -- exec
    Op("exec.start", "run code (capability `exec.<language>`) or a process (`exec.process`); its output streams back",
       "stream: `start{exec_id, pid}`, `data{fd, data}`... (python: and `display{bundle}`, rich output), "
       "`end{exit_code, signal, duration_ms, error?, truncated?}`",
       (
           Field("exec_id", (str,), "the exec's id (client leg: optional, the gateway assigns e1, e2, ...; "
                 "agent leg: always sent)", low=1, high=MAX_EXEC_ID),
           Field("tag", (str,), "a label exec.attach and control ops can select by", low=1, high=MAX_TAG),
           Field("language", (str,), "with `code`: the language (default python; an id or an alias of "
                 "guest_agent/languages.py)", low=1, high=32),
           Field("code", (str,), "source to run (with `language`)"),
           _CODE_REF,
           Field("command", (list, str), "argv, or a shell string run by /bin/sh -c", low=1),
           Field("namespace", (str,), "python: `default` (persistent), `fresh`, or another persistent name",
                 low=1, high=128),
           Field("stdin", (bytes,), "bytes written to stdin at start"),
           Field("stdin_open", (bool,), "keep stdin open for exec.input (default: true with `pty`, else false)"),
           Field("env", (dict,), "extra environment (str -> str)", high=MAX_ENV),
           Field("cwd", (str,), "working directory (default: the sandbox root)", low=1, high=MAX_PATH),
           Field("timeout", (float,), "wall-clock seconds; past it the exec is stopped and ends with `timeout`",
                 low=0.001),
           Field("pty", (dict,), "run on a pseudo-terminal: `{rows, cols}` (1..65535, default 24x80); output "
                 "arrives as fd `pty`"),
           Field("track_files", (bool,), "false: skip the two snapshots of the tracked folders that list the "
                 "files the exec created, modified, deleted in its end's `files` (absent: listed)"),
       ),
       stream=True, rules=_exec_start_rules),
    Op("exec.attach", "re-subscribe to an exec (reconnect, or a second viewer) and replay what is buffered",
       "`{exec_id, first_seq, lost}` first, then the stream's events with seq >= from_seq",
       (*_exec_selector(), Field("from_seq", (int,), "replay events from this seq", default=0, low=0)),
       leg=CLIENT, stream=True, rules=_needs_exec),
    Op("exec.input", "write to a running exec's stdin", "`{}`",
       (*_exec_selector(), Field("data", (bytes,), "the bytes", required=True, high=MAX_WRITE_CHUNK,
                                                over_code="frame_too_large")),
       capability="exec.stdin", control=True, nested=True, rules=_needs_exec),
    Op("exec.close_stdin", "close a running exec's stdin", "`{}`", _exec_selector(),
       capability="exec.stdin", control=True, nested=True, rules=_needs_exec),
    Op("exec.signal", "deliver a signal to a running exec", "`{}` (sent before the stream's end when the signal "
       "ends it)",
       (*_exec_selector(), Field("signal", (str, int), "a name like SIGINT, or a number", required=True, low=1,
                                 high=64)),
       capability="exec.signal", control=True, nested=True, rules=_needs_exec),
    Op("exec.resize", "resize a running exec's terminal", "`{}`",
       (*_exec_selector(), _ROWS, _COLS),
       capability="exec.pty", control=True, nested=True, rules=_needs_exec),
    Op("exec.list", "the running and recently finished execs", "`execs`: list of `{exec_id, tag, pid, running, "
       "exit_code}`", nested=True, idempotent=True),
    # -- functions (client leg: the gateway runs them as execs of a generated source)
    Op("invoke", "call a named function of `code` with `args` and `kwargs` (same as REST `POST .../invoke`)",
       "`status` (success, error, crash, timeout, terminated), `result`, `error`, `stdout`, `stderr`, "
       "`duration_ms`, `files` {created, modified, deleted}",
       (Field("language", (str,), "the code's language", default="python", low=1, high=32),
        Field("code", (str,), "the source that defines the function"), _CODE_REF,
        Field("function", (str,), "the function's name", required=True, low=1, high=128),
        Field("args", (list,), "positional arguments (JSON values)", default=[]),
        Field("kwargs", (dict,), "keyword arguments (JSON values); JavaScript gets them as a last options "
              "object", default={}),
        Field("timeout", (float,), "wall-clock seconds for the call", low=0.001),
        Field("files", (dict,), "files written before the call: relative path -> text or {base64}")),
       leg=CLIENT, rules=_invoke_rules),
    Op("test", "run `tests` against `code` (pytest for Python; `test`/`assert` globals for JavaScript)",
       "`success`, `summary` {total, passed, failed, skipped}, `tests` [{name, passed, skipped, duration_ms, "
       "error}], `stdout`, `stderr`, `duration_ms`",
       (Field("language", (str,), "the language", default="python", low=1, high=32),
        Field("code", (str,), "the code under test"), _CODE_REF,
        Field("tests", (str,), "the tests", required=True),
        Field("timeout", (float,), "wall-clock seconds for the run", low=0.001)),
       leg=CLIENT, rules=_code_rules),
    # -- fs
    Op("fs.stat", "a file's metadata", "`name`, `path`, `type`, `size`, `mtime`, `mode`", (_path(),),
       capability="fs", idempotent=True),
    Op("fs.list", "a directory's entries", "`entries` (stat results, paths relative to the listed dir), `truncated`",
       (_path(), Field("depth", (int,), "levels to descend", default=1, low=1, high=MAX_LIST_DEPTH)),
       capability="fs", idempotent=True),
    Op("fs.read", "a file's bytes, streamed", "stream: `start{size}`, `data{data}`..., `end{bytes, error?}`",
       (_path(), Field("offset", (int,), "first byte", default=0, low=0),
        Field("length", (int,), "bytes to read (default: to the end)", low=0)),
       capability="fs", stream=True, idempotent=True),
    Op("fs.write", "write one chunk of a file", "`bytes`, `size`",
       (_path(), Field("data", (bytes,), "the chunk", required=True, high=MAX_WRITE_CHUNK,
                        over_code="frame_too_large"),
        Field("offset", (int,), "where the chunk goes", default=0, low=0),
        Field("truncate", (bool,), "truncate the file first", default=False)),
       capability="fs"),
    Op("fs.mkdir", "make a directory", "`{}`",
       (_path(), Field("parents", (bool,), "make missing parents too", default=True)), capability="fs"),
    Op("fs.move", "rename a file or directory", "`{}`",
       (_path("src", "the path to move"), _path("dst", "where it goes")), capability="fs"),
    Op("fs.remove", "remove a file or directory", "`{}`",
       (_path(), Field("recursive", (bool,), "remove a directory with its contents", default=False)),
       capability="fs"),
    Op("fs.patch", "change the file system in one step (patches at create)", "`{}`",
       (_path(), Field("action", (str,), "one of " + ", ".join(PATCH_ACTIONS), required=True),
        Field("text", (str,), "text: the file's text; append: text to add", high=MAX_WRITE_CHUNK),
        Field("data", (bytes,), "text/append: the bytes instead of `text`", high=MAX_WRITE_CHUNK,
              over_code="frame_too_large"),
        Field("src", (str,), "copy: what to copy (a file or a directory)", high=MAX_PATH),
        Field("target", (str,), "symlink: what the link points to", high=MAX_PATH),
        Field("mode", (int,), "text/mkdir: permission bits", low=0, high=0o7777)),
       capability="fs", rules=_patch_rules),
    Op("fs.changes", "which files were created, modified, deleted under the tracked paths (/work, mounts, "
       "volumes) since a token; every exec's end carries the same `files` for its own run",
       "`{token, files: {created, modified, deleted, truncated?}}` (`not_found`: a token no longer kept)",
       (Field("since", (str,), "a token an earlier fs.changes gave (absent: since the sandbox was handed out)",
              low=1, high=MAX_TAG),
        Field("keep", (str,), "agent leg: pin this snapshot under this name instead of a new token (a host "
              "mount's sync point)", low=1, high=MAX_TAG, leg=AGENT),
        Field("advance", (list,), "agent leg: with `since` (a pinned name), move only these paths of it to now",
              high=100_000, leg=AGENT),
        Field("track", (list,), "agent leg: the directories tracked besides /work and the fs roots (the base is "
              "taken again)", high=64, leg=AGENT),
        Field("base", (bool,), "agent leg: make this snapshot the base (the sandbox is being handed out)",
              default=False, leg=AGENT)),
       capability="fs", rules=_changes_rules),
    Op("fs.watch", "watch a directory for changes (inotify where the guest has it, else polling: "
       "guest_agent/watch.py)",
       "stream: `start{watch_id, backend, entries}`, `change{change, path, dir, src?}`... (`change`: created, "
       "modified, deleted, moved (with `src`) or overflow; paths relative to the watched directory), "
       "`end{error?}` after fs.unwatch, or with an error (`not_found`: the directory went away; `guest_died`)",
       (_path(), Field("recursive", (bool,), "watch the directories below it too", default=False),
        Field("watch_id", (str,), "the watch's id (client leg: optional, the gateway assigns w1, w2, ...; agent "
              "leg: always sent); exec.attach re-attaches the stream by it", low=1, high=MAX_EXEC_ID),
        Field("tag", (str,), "a label fs.unwatch and exec.attach can select the watch by", low=1, high=MAX_TAG,
              leg=CLIENT),
        Field("poll_interval", (float,), "seconds between two snapshots where the guest polls (no inotify)",
              default=0.5, low=0.05, high=60.0)),
       capability="fs.watch", stream=True),
    Op("fs.unwatch", "stop a watch: its stream ends", "`{}`",
       (Field("watch_id", (str,), "the watch", low=1, high=MAX_EXEC_ID),
        Field("tag", (str,), "client leg: the latest watch with this tag, instead of watch_id", low=1, high=MAX_TAG,
              leg=CLIENT)),
       capability="fs.watch", nested=True, rules=_needs_watch),
    # -- published ports (agent leg only: the gateway proxies HTTP and WebSocket traffic over these)
    Op("net.connect", "open a TCP connection to 127.0.0.1:`port` inside the guest; its bytes stream back, "
       "at most the credit the gateway granted (`window`, then `net.credit`)",
       "stream: `start{}`, `data{data, eof?}`... (`eof`: the guest's side shut down its writing), `end{error?}` "
       "once both directions are shut down, after net.close, or on a failure (`unavailable`: nothing listens, "
       "or the connection was reset)",
       (_CONN_ID,
        Field("port", (int,), "the TCP port on the guest's loopback", required=True, low=1, high=65535),
        Field("window", (int,), "bytes of data the agent may send before the gateway grants more",
              default=NET_WINDOW, low=CHUNK_SIZE, high=MAX_NET_WINDOW)),
       leg=AGENT, capability="net.connect", stream=True),
    Op("net.send", "write bytes to a connection (then, with `eof`, shut down its writing side)",
       "`{}` once the bytes are written to the guest's socket (the gateway sends the next chunk then)",
       (_CONN_ID,
        Field("data", (bytes,), "the bytes (absent: none, with `eof`)", high=MAX_WRITE_CHUNK,
              over_code="frame_too_large"),
        Field("eof", (bool,), "after the bytes, shut down the writing side (half-close)", default=False)),
       leg=AGENT, capability="net.connect"),
    Op("net.credit", "let a connection send `bytes` more of data", "`{}`",
       (_CONN_ID, Field("bytes", (int,), "bytes of credit to add", required=True, low=1, high=MAX_NET_WINDOW)),
       leg=AGENT, capability="net.connect"),
    Op("net.close", "close a connection at once, both ways; its stream ends", "`{}`", (_CONN_ID,),
       leg=AGENT, capability="net.connect"),
    # -- agent leg only
    Op("guest.env", "the sandbox's environment for every exec from now (secrets' placeholders) and the CA it "
                    "trusts for their hosts", "`ca_bundle`: the bundle's path, or null",
       (Field("set", (dict,), "variable -> value (strings)", default={}, high=MAX_ENV_VARIABLES),
        Field("ca_pem", (bytes,), "a CA certificate (PEM) to add to the guest's trust", high=MAX_CA_PEM)),
       leg=AGENT, rules=_env_strings),
    Op("guest.setup", "make a VM restored from a snapshot its own (clock, entropy, limits)", "`time_ns`",
       (Field("time_ns", (int,), "the host's CLOCK_REALTIME", low=0),
        Field("entropy", (bytes,), "credited to the kernel's pool", low=16, high=512),
        Field("memory_bytes", (int,), "the sandbox cgroup's memory.max", low=1),
        Field("pids", (int,), "the sandbox cgroup's pids.max", low=1),
        Field("disk_bytes", (int,), "the size of the root's tmpfs", low=1)),
       leg=AGENT, capability="guest.setup"),
)

OPS: dict[str, Op] = {op.name: op for op in _OPS}


@dataclass(frozen=True)
class _LegFields:
    """An op's fields as a peer on one leg may send them, arranged for `parse`."""

    by_name: dict[str, Field]
    required: tuple[str, ...]
    defaults: tuple[tuple[str, Any], ...]


def _leg_fields(op: Op, leg: str) -> _LegFields:
    fields = [f for f in op.fields if f.leg in (BOTH, leg)]
    return _LegFields({f.name: f for f in fields}, tuple(f.name for f in fields if f.required),
                      tuple((f.name, f.default) for f in fields if f.default is not _MISSING))


_LEG_FIELDS = {(leg, op.name): _leg_fields(op, leg) for leg in (CLIENT, AGENT) for op in _OPS}
#: Fields that carry bytes anywhere (`sandgate.v1.json` base64-encodes exactly these).
BINARY_FIELDS: tuple[str, ...] = tuple(sorted({f.name for op in _OPS for f in op.fields if f.kinds == (bytes,)}
                                              | {"data"}))

#: exec.start's capability by language; a runtime may add `exec.<language>` for languages it runs itself.
PROCESS_CAPABILITY = "exec.process"


def exec_capability(args: Mapping[str, Any]) -> str:
    """The capability a checked exec.start needs."""
    return PROCESS_CAPABILITY if "command" in args else f"exec.{args['language']}"


def op_for(name: Any, leg: str) -> Op:
    """The op named `name` as a peer on `leg` may send it; `unknown_op` otherwise (an agent-leg
    op from a client is unknown to it, not forbidden)."""
    op = OPS.get(name) if isinstance(name, str) else None
    if op is None or (op.leg != BOTH and op.leg != leg):
        raise ProtocolError("unknown_op", f"unknown op {name!r:.60}")
    return op


def parse(message: Mapping[str, Any], leg: str) -> Request:
    """Validate one request as it enters on `leg` (CLIENT: at the gateway; AGENT: at the agent).

    Raises:
        ProtocolError: `bad_request` (shape, a missing or mistyped field, a bound), `unknown_op`.
    """
    rid = message.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < MAX_REQUEST_ID:
        raise ProtocolError("bad_request", "'id' must be an integer in 0..2**31-1")
    op = op_for(message.get("op"), leg)
    # Walk the message (a few keys), not the op's fields (exec.start has a dozen, mostly absent).
    known = _LEG_FIELDS[leg, op.name]
    args: dict[str, Any] = {}
    for name, value in message.items():
        f = known.by_name.get(name)
        if f is not None and value is not None:
            args[name] = f.check(value)
    for name in known.required:
        if name not in args:
            raise ProtocolError("bad_request", f"missing field {name!r}")
    for name, default in known.defaults:
        args.setdefault(name, default)
    if op.rules is not None:
        op.rules(args)
    return Request(rid, op, args)


# ---------------------------------------------------------------------------------------------
# Stream events from the agent (checked where they enter the gateway)
# ---------------------------------------------------------------------------------------------

_NONE = type(None)
#: What each stream event may carry from the agent, by field name: the accepted types (exact,
#: so bool is no int). The gateway-role `AgentLeg` checks every event against this table where it
#: enters (`check_event`): a mistyped field is the guest breaking the protocol (`guest_protocol`),
#: and fields not listed here are dropped, so nothing unchecked reaches a client or the gateway.
#: `start` carries `exec_id`/`pid` (exec.start), `size` (fs.read) or `watch_id`/`backend`/`entries`
#: (fs.watch); `change` (fs.watch) carries `change`, `path`, `dir` and, for a move, `src`; `end` carries `exit_code`,
#: `signal`, `duration_ms`, `error`, `truncated`, `files` (exec.start: what it changed, `check_files`)
#: or `bytes`, `error` (fs.read);
#: `display` (exec.start, Python) carries one MIME `bundle` (`check_display`); a net.connect's `data`
#: carries no fd and, on its last, `eof`.
EVENT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "start": {"exec_id": (str,), "pid": (int, _NONE), "size": (int, _NONE), "watch_id": (str,), "backend": (str,),
              "entries": (int,)},
    "data": {"fd": (str,), "data": (bytes,), "eof": (bool,)},
    "display": {"bundle": (dict,)},
    "end": {"exit_code": (int, _NONE), "signal": (str, int, _NONE), "duration_ms": (int, float, _NONE),
            "error": (dict, _NONE), "truncated": (bool,), "bytes": (int,), "files": (dict,)},
    "change": {"change": (str,), "path": (str,), "dir": (bool,), "src": (str,)},
    "keepalive": {},
}
#: What a fs.watch `change` event's `change` may be (guest_agent/watch.py).
CHANGE_KINDS = ("created", "modified", "deleted", "moved", "overflow")
_TYPE_WORDS = {bytes: "binary", str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "a map"}
#: The most bytes one data event may carry (docs/protocol.md: output and file chunks).
MAX_EVENT_DATA = CHUNK_SIZE
#: Bounds on the strings an event carries (an exec id is a client's, an error message the agent's).
_MAX_EVENT_TEXT = {"exec_id": MAX_EXEC_ID, "watch_id": MAX_EXEC_ID, "backend": 16, "signal": 32, "fd": 8,
                   "change": 16, "path": MAX_PATH, "src": MAX_PATH}
_MAX_ERROR_TEXT = 4096


def check_event(ev: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of one agent stream event (without id/ev/seq) as the gateway may use them.

    Raises:
        ProtocolError: `guest_protocol` for a mistyped or out-of-bounds field, a data event without
            bytes or above `MAX_EVENT_DATA`, an unknown fd, or a malformed `error`.
    """
    table = EVENT_FIELDS[ev]
    out: dict[str, Any] = {}
    for name, value in fields.items():
        kinds = table.get(name)
        if kinds is None:
            continue  # forward compatibility: a field this gateway does not know is dropped
        if type(value) not in kinds:
            wanted = " or ".join("nil" if k is _NONE else _TYPE_WORDS.get(k, k.__name__) for k in kinds)
            raise ProtocolError("guest_protocol", f"{ev} event: field {name!r} must be {wanted}, not "
                                                  f"{type(value).__name__}")
        high = _MAX_EVENT_TEXT.get(name)
        if high is not None and isinstance(value, str) and len(value) > high:
            raise ProtocolError("guest_protocol", f"{ev} event: field {name!r} longer than {high}")
        if name == "error" and value is not None:
            value = _checked_error(ev, value)
        out[name] = value
    if ev == "display":
        check_display(out.get("bundle"))
    if "files" in out:
        out["files"] = check_files(out["files"])
    if ev == "change" and (out.get("change") not in CHANGE_KINDS or "path" not in out):
        raise ProtocolError("guest_protocol", f"a change event needs 'path' and a 'change' of "
                                              f"{', '.join(CHANGE_KINDS)}")
    if ev == "data":
        data = out.get("data")
        if data is None:
            raise ProtocolError("guest_protocol", "a data event without binary 'data'")
        if len(data) > MAX_EVENT_DATA:
            raise ProtocolError("guest_protocol", f"a data event of {len(data)} bytes (at most {MAX_EVENT_DATA})")
        if "fd" in out and out["fd"] not in OUTPUT_FDS:
            raise ProtocolError("guest_protocol", f"a data event for unknown fd {out['fd']!r:.40}")
    return out


#: The kinds of change a `files` report lists (guest_agent/changes.py).
FILES_KINDS = ("created", "modified", "deleted")
#: Paths one `files` report may list in all.
MAX_FILES_LISTED = 100_000


def check_files(value: Any) -> dict[str, Any]:
    """An exec end's or fs.changes' `files` from the agent: `{created, modified, deleted}`, lists of
    paths, and `truncated` when set. Raises `guest_protocol` for any other shape."""
    if not isinstance(value, dict) or set(value) - {*FILES_KINDS, "truncated"}:
        raise ProtocolError("guest_protocol", "'files' is {created, modified, deleted, truncated?}")
    out: dict[str, Any] = {}
    count = 0
    for kind in FILES_KINDS:
        paths = value.get(kind)
        if not isinstance(paths, list) or not all(type(p) is str and len(p) <= MAX_PATH for p in paths):
            raise ProtocolError("guest_protocol", f"'files.{kind}' is a list of paths")
        count += len(paths)
        out[kind] = paths
    if count > MAX_FILES_LISTED:
        raise ProtocolError("guest_protocol", f"'files' lists more than {MAX_FILES_LISTED} paths")
    if "truncated" in value:
        if type(value["truncated"]) is not bool:
            raise ProtocolError("guest_protocol", "'files.truncated' is a boolean")
        if value["truncated"]:
            out["truncated"] = True
    return out


# ---------------------------------------------------------------------------------------------
# Rich output: display events
# ---------------------------------------------------------------------------------------------

#: A display event carries one MIME bundle, as Jupyter's display_data does: a map from MIME type
#: to its content, every value text on every leg and in every REST body (so sandgate.v1.json and
#: sandgate.v1.msgpack carry it alike): `image/png` and `image/jpeg` are base64 (standard
#: alphabet, padded, as in Jupyter's bundles), `application/json` is JSON text, the rest is the
#: text itself. `text/plain` is always there (the object's repr).
#: The most one bundle may carry, its types and values in UTF-8 bytes: a PNG of ~700 KiB in base64,
#: and the event still fits the agent leg's 1 MiB frame.
MAX_DISPLAY_BYTES = 960 * 1024
#: The most one exec may display in all (its bundles summed, as `bundle_size` counts them).
MAX_EXEC_DISPLAY_BYTES = 16 << 20
#: MIME types per bundle, and the length of one.
MAX_DISPLAY_TYPES = 16
MAX_MIME_TYPE = 128
#: The MIME types whose value is base64.
BASE64_TYPES = ("image/png", "image/jpeg")
_MIME_TYPE = re.compile(r"[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def text_bytes(text: str) -> int:
    """`text`'s length in UTF-8 (what it takes in a frame), without encoding ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def bundle_size(bundle: Mapping[str, str]) -> int:
    """What a bundle counts against `MAX_DISPLAY_BYTES` and `MAX_EXEC_DISPLAY_BYTES`."""
    return sum(text_bytes(mime) + text_bytes(value) for mime, value in bundle.items())


def check_display(bundle: Any) -> int:
    """Check one display event's bundle; returns its `bundle_size`.

    Raises:
        ProtocolError: `guest_protocol` for a bundle that is not a map of 1..16 MIME types to
            text, lacks `text/plain`, has a base64 type that is not base64, or is larger than
            `MAX_DISPLAY_BYTES`.
    """
    if not isinstance(bundle, dict) or not 1 <= len(bundle) <= MAX_DISPLAY_TYPES:
        raise ProtocolError("guest_protocol", f"a display event needs 'bundle', a map of 1..{MAX_DISPLAY_TYPES} "
                                              "MIME types")
    for mime, value in bundle.items():
        if not (isinstance(mime, str) and len(mime) <= MAX_MIME_TYPE and _MIME_TYPE.fullmatch(mime)):
            raise ProtocolError("guest_protocol", f"display event: {mime!r:.80} is not a MIME type")
        if type(value) is not str:
            raise ProtocolError("guest_protocol", f"display event: the {mime} value must be a string, not "
                                                  f"{type(value).__name__}")
    if "text/plain" not in bundle:
        raise ProtocolError("guest_protocol", "display event: the bundle has no text/plain")
    size = bundle_size(bundle)
    if size > MAX_DISPLAY_BYTES:
        raise ProtocolError("guest_protocol", f"a display event of {size} bytes (at most {MAX_DISPLAY_BYTES})")
    for mime in BASE64_TYPES:
        value = bundle.get(mime)
        if value is not None and (len(value) % 4 or not _BASE64.fullmatch(value)):
            raise ProtocolError("guest_protocol", f"display event: the {mime} value is not base64")
    return size


def _checked_error(ev: str, error: Mapping[str, Any]) -> dict[str, Any]:
    code, message = error.get("code"), error.get("message")
    if not (isinstance(code, str) and code in ERRORS and isinstance(message, str)
            and len(message) <= _MAX_ERROR_TEXT):
        raise ProtocolError("guest_protocol", f"{ev} event: malformed 'error' {error!r:.80}")
    return ProtocolError(code, message).to_wire()


def request_id_of(message: Mapping[str, Any]) -> int | None:
    """The message's id when it is a valid one (for an error reply to a bad request)."""
    rid = message.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < MAX_REQUEST_ID:
        return rid
    return None


# ---------------------------------------------------------------------------------------------
# Views for clients and docs
# ---------------------------------------------------------------------------------------------


def describe() -> dict[str, Any]:
    """The schema as JSON (served at `GET /v1/protocol` for clients such as the JavaScript one)."""
    from .wire import ERRORS, PROTOCOL_VERSION

    ops = {}
    for op in _OPS:
        ops[op.name] = {
            "leg": op.leg,
            "capability": op.capability,
            **{flag: getattr(op, flag) for flag in ("stream", "control", "nested", "liveness", "idempotent")},
            "fields": {
                f.name: {
                    "type": f.type_name,
                    "required": f.required,
                    **({"default": f.default} if f.default is not _MISSING else {}),
                    **({"min": f.low} if f.low is not None else {}),
                    **({"max": f.high} if f.high is not None else {}),
                    **({"leg": f.leg} if f.leg != BOTH else {}),
                }
                for f in op.fields
            },
        }
    return {
        "version": PROTOCOL_VERSION,
        "ops": ops,
        "binary_fields": list(BINARY_FIELDS),
        "display": {"max_bundle_bytes": MAX_DISPLAY_BYTES, "max_exec_bytes": MAX_EXEC_DISPLAY_BYTES,
                    "max_types": MAX_DISPLAY_TYPES, "base64_types": list(BASE64_TYPES)},
        "errors": {code: {"retryable": k.retryable, "http": k.http_status} for code, k in ERRORS.items()},
    }


def markdown_tables() -> str:
    """docs/protocol.md's op table (checked against the document by a test)."""
    lines = ["| op | what it does | leg | flags | capability | fields | result |", "|---|---|---|---|---|---|---|"]
    for op in _OPS:
        flags = ", ".join(flag for flag in ("stream", "control", "nested", "liveness", "idempotent")
                          if getattr(op, flag)) or "—"
        fields = ", ".join(_field_text(f) for f in op.fields) or "—"
        cells = [f"`{op.name}`", op.doc, op.leg, flags, op.capability or "—", fields, op.result]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def _field_text(f: Field) -> str:
    parts = [f.type_name]
    if f.required:
        parts.append("required")
    elif f.default is not _MISSING:
        parts.append(f"default {f.default!r}".replace("'", '"').replace("True", "true").replace("False", "false"))
    if f.low is not None or f.high is not None:
        parts.append(f.range_text())
    if f.leg != BOTH:
        parts.append(f"{f.leg} leg")
    return f"`{f.name}` ({', '.join(parts)})"
