"""What the SDK hands back: sandbox descriptions, exec events and results, file entries, metrics.

Each is built from the protocol's JSON by a `from_wire` constructor that tolerates fields it does not
know (a newer gateway may add some) and keeps the original map in `raw`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.client.errors import SandgateError, error_from_wire

Fd = Literal["stdout", "stderr", "pty"]
#: A sandbox's network policy as the gateway takes it: "none", "public", "all",
#: {"allow": [...], "deny": [...]}, or true/false (wave 1's "public"/"none").
NetworkPolicy = bool | str | Mapping[str, Sequence[str]]


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the gateway describes it (`GET /v1/sandboxes/{id}`)."""

    id: str
    runtime: str
    state: str
    capabilities: frozenset[str]
    created_at: float | None
    expires_at: float | None
    ttl: float | None
    idle_timeout: float | None
    memory_mb: int | None
    cpu_seconds: float | None
    disk_mb: int | None
    metadata: dict[str, str]
    execs_running: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> SandboxInfo:
        caps = data.get("capabilities")
        metadata = data.get("metadata")
        return cls(
            id=str(data["id"]),
            runtime=str(data.get("runtime", "")),
            state=str(data.get("state", "")),
            capabilities=frozenset(c for c in caps if isinstance(c, str)) if isinstance(caps, list) else frozenset(),
            created_at=_float(data.get("created_at")),
            expires_at=_float(data.get("expires_at")),
            ttl=_float(data.get("ttl")),
            idle_timeout=_float(data.get("idle_timeout")),
            memory_mb=_int(data.get("memory_mb")),
            cpu_seconds=_float(data.get("cpu_seconds")),
            disk_mb=_int(data.get("disk_mb")),
            metadata=dict(metadata) if isinstance(metadata, dict) else {},
            execs_running=_int(data.get("execs_running")) or 0,
            raw=dict(data),
        )


# -- exec events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The exec started. `pid` is the OS pid, or None for code run inside the agent's interpreter."""

    exec_id: str
    pid: int | None
    seq: int


@dataclass(frozen=True)
class Output:
    """A chunk of output (at most 64 KiB) on `fd`."""

    fd: Fd
    data: bytes
    seq: int

    @property
    def text(self) -> str:
        """The chunk decoded as UTF-8 (a character split across chunks shows as U+FFFD)."""
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class Display:
    """Rich output of a Python exec: one MIME bundle, as Jupyter's display_data carries it.

    Made by the last expression of a cell when its value has rich representations (a pandas
    DataFrame, an object with `_repr_html_`), by `display(obj)` in the sandbox, and by matplotlib
    figures (`plt.show()`, or left open at the end of the exec). Every value of `bundle` is text:
    `image/png` base64, `application/json` JSON text (docs/protocol.md); the properties decode them.

    Attributes:
        bundle: MIME type -> content; `text/plain` (the object's repr) is always there.
        seq: the event's sequence number in the exec's stream (None in a REST result).
    """

    bundle: dict[str, str]
    seq: int | None = None

    @property
    def text(self) -> str:
        """The text/plain representation."""
        return self.bundle.get("text/plain", "")

    @property
    def html(self) -> str | None:
        """The text/html representation (untrusted: the sandbox's code made it)."""
        return self.bundle.get("text/html")

    @property
    def png(self) -> bytes | None:
        """The image/png representation, decoded."""
        return _decoded(self.bundle.get("image/png"))

    @property
    def jpeg(self) -> bytes | None:
        """The image/jpeg representation, decoded."""
        return _decoded(self.bundle.get("image/jpeg"))

    @property
    def json(self) -> Any:
        """The application/json representation, parsed (None without one)."""
        text = self.bundle.get("application/json")
        return None if text is None else json.loads(text)

    @property
    def mime_types(self) -> list[str]:
        return list(self.bundle)

    @classmethod
    def from_wire(cls, bundle: Any, seq: int | None = None) -> Display | None:
        """A bundle as the gateway sends it; None for anything that is not one."""
        if not isinstance(bundle, Mapping):
            return None
        return cls({k: v for k, v in bundle.items() if isinstance(k, str) and isinstance(v, str)}, seq)


def _decoded(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def displays_from_wire(items: Any) -> list[Display]:
    """A REST result's `display` list."""
    if not isinstance(items, list):
        return []
    return [d for d in (Display.from_wire(item) for item in items) if d is not None]


@dataclass(frozen=True)
class OutputLost:
    """Events `first_seq`..`last_seq` (inclusive) fell out of the gateway's replay buffer while this
    client was disconnected: that output is gone, and this says exactly which part."""

    first_seq: int
    last_seq: int


@dataclass(frozen=True)
class Exited:
    """The exec ended. `error` is set when it did not end on its own (timeout, the guest died)."""

    exit_code: int | None
    signal: str | None
    duration: float
    error: SandgateError | None
    truncated: bool
    seq: int


ExecEvent = Started | Output | Display | OutputLost | Exited


@dataclass(frozen=True)
class WatchEvent:
    """One change a watch saw (`AsyncFiles.watch`). `kind` is `created`, `modified`, `deleted`,
    `moved` (then `src` is the old path) or `overflow`: changes were lost (the guest's queue was
    full, the tree grew past the watch's bound, the sandbox's agent was restarted, or a reconnect
    came too late for the replay buffer), so re-list the directory to resync. Paths are relative to
    the watched directory."""

    kind: str
    path: str
    is_dir: bool
    src: str | None
    seq: int


@dataclass
class ExecResult:
    """What an exec did: its exit, its output, and how long it took.

    Attributes:
        exit_code: the exit status (None when killed by a signal or stopped by an error).
        signal: the signal name that ended it, if one did.
        duration: wall-clock seconds, measured by the sandbox.
        stdout_bytes, stderr_bytes, pty_bytes: the output as bytes.
        error: why it did not end on its own (`Timeout`, `GuestDied`), else None.
        truncated: output was cut (by the gateway's cap, or this client's `max_output_bytes`).
        lost: sequence ranges that fell out of the replay buffer during a reconnect.
        display: rich output (Python), in order: `Display` bundles.
    """

    exec_id: str
    exit_code: int | None = None
    signal: str | None = None
    duration: float = 0.0
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    pty_bytes: bytes = b""
    error: SandgateError | None = None
    truncated: bool = False
    lost: list[tuple[int, int]] = field(default_factory=list)
    display: list[Display] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def pty(self) -> str:
        """What a terminal exec printed (stdout and stderr share the terminal)."""
        return self.pty_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """Exit code 0 and no error."""
        return self.exit_code == 0 and self.error is None

    @classmethod
    def from_rest(cls, data: Mapping[str, Any]) -> ExecResult:
        """The result of a REST exec (`POST .../exec`, `POST /v1/execute`), whose output is text."""
        duration = _float(data.get("duration_ms"))
        signal = data.get("signal")
        return cls(exec_id=str(data.get("exec_id") or ""), exit_code=_int(data.get("exit_code")),
                   signal=signal if isinstance(signal, str) else None,
                   duration=duration / 1000 if duration is not None else 0.0,
                   stdout_bytes=str(data.get("stdout") or "").encode(),
                   stderr_bytes=str(data.get("stderr") or "").encode(),
                   error=error_from_wire(data["error"]) if data.get("error") else None,
                   truncated=data.get("truncated") is True, display=displays_from_wire(data.get("display")))


# -- files and metrics -------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """One `fs.stat` / `fs.list` entry. In a listing, `path` is relative to the listed directory."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mtime: float | None
    mode: int | None

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> FileInfo:
        kind = data.get("type")
        return cls(
            name=str(data.get("name", "")),
            path=str(data.get("path", "")),
            type=kind if kind in ("file", "dir", "symlink") else "other",
            size=_int(data.get("size")) or 0,
            mtime=_float(data.get("mtime")),
            mode=_int(data.get("mode")),
        )


@dataclass(frozen=True)
class Metrics:
    """A sandbox's figures: `guest` from the agent inside it, `host` from the runtime outside it."""

    guest: dict[str, Any]
    host: dict[str, Any]
    restarts: int
    #: The sandbox's network figures (bytes_in, bytes_out, connections, refusals, dns_queries), or
    #: None without a network.
    network: dict[str, Any] | None = None

    @property
    def uptime_s(self) -> float | None:
        return _float(self.guest.get("uptime_s"))

    @property
    def cpu_s(self) -> float | None:
        return _float(self.guest.get("cpu_s"))

    @property
    def memory_bytes(self) -> int | None:
        return _int(self.guest.get("memory_bytes"))

    @property
    def disk_bytes(self) -> int | None:
        return _int(self.guest.get("disk_bytes"))

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Metrics:
        guest, host = data.get("guest"), data.get("host")
        network = data.get("network")
        return cls(guest=dict(guest) if isinstance(guest, dict) else {},
                   host=dict(host) if isinstance(host, dict) else {},
                   restarts=_int(data.get("restarts")) or 0,
                   network=dict(network) if isinstance(network, dict) else None)


# -- serverless: invoke, test mode, deployed functions, executions, the code cache ----------------


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


@dataclass(frozen=True)
class FunctionError:
    """Why an invocation did not return: `type` is the exception's class name (`ZeroDivisionError`),
    or `Timeout`, `Terminated`, `Crash`, `FunctionNotFound`, `ResultNotSerializable`."""

    type: str
    message: str
    traceback: str

    @classmethod
    def from_wire(cls, data: Any) -> FunctionError | None:
        if not isinstance(data, Mapping):
            return None
        return cls(type=str(data.get("type") or ""), message=str(data.get("message") or ""),
                   traceback=str(data.get("traceback") or ""))


@dataclass(frozen=True)
class FileChanges:
    """The files a call created, modified and deleted under the sandbox's root."""

    created: list[str]
    modified: list[str]
    deleted: list[str]
    #: The guest listed only the first changes of a call that made very many.
    truncated: bool = False

    @classmethod
    def from_wire(cls, data: Any) -> FileChanges:
        data = data if isinstance(data, Mapping) else {}
        return cls(created=_strings(data.get("created")), modified=_strings(data.get("modified")),
                   deleted=_strings(data.get("deleted")), truncated=data.get("truncated") is True)


@dataclass(frozen=True)
class InvokeResult:
    """One function call (`invoke`, `invoke_function`, ephemeral `invoke`): a failing call is a
    result with a `status`, not an exception.

    Attributes:
        status: `success`, `error` (it raised: see `error.type`), `crash` (the guest died),
            `timeout`, or `terminated` (cancelled, or stopped by a signal); a newer gateway's
            status arrives as it is.
        result: the function's return value (JSON), None unless `status` is `success`.
        error: why it did not return, or None.
        stdout, stderr: what the call printed; duration_ms: as the sandbox measured it.
        display: the call's rich output (Python: `display()`, matplotlib figures), as `Display`s.
        files: the files the call created, modified and deleted.
        exec_id: the exec that ran the call (an execution of the sandbox: cancel it by this id).
        truncated: output past the gateway's cap was dropped.
        cold, instance, version: deployed functions only: whether the call loaded the function
            (a new or reloaded instance), the instance (sandbox) that ran it, and its version.
    """

    status: str
    result: Any
    error: FunctionError | None
    stdout: str
    stderr: str
    duration_ms: float | None
    files: FileChanges
    exec_id: str | None
    truncated: bool
    cold: bool | None = None
    instance: str | None = None
    version: str | None = None
    display: list[Display] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """The function returned (`status == "success"`)."""
        return self.status == "success"

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> InvokeResult:
        status = data.get("status")
        cold = data.get("cold")
        return cls(
            status=str(status or ""),
            result=data.get("result"),
            error=FunctionError.from_wire(data.get("error")),
            stdout=str(data.get("stdout") or ""),
            stderr=str(data.get("stderr") or ""),
            duration_ms=_float(data.get("duration_ms")),
            files=FileChanges.from_wire(data.get("files")),
            exec_id=_str(data.get("exec_id")),
            truncated=data.get("truncated") is True,
            cold=cold if isinstance(cold, bool) else None,
            instance=_str(data.get("instance")),
            version=_str(data.get("version")),
            display=displays_from_wire(data.get("display")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class TestOutcome:
    """One test of a `run_tests` run. `name` is pytest's node id for Python (`test_x.py::test_adds`),
    the `test()` name for JavaScript; `error` is the failure as the test framework wrote it."""

    __test__ = False  # a model, not a test class: pytest must not collect it where it is imported

    name: str
    passed: bool
    skipped: bool
    duration_ms: float | None
    error: str | None

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TestOutcome:
        return cls(name=str(data.get("name") or ""), passed=data.get("passed") is True,
                   skipped=data.get("skipped") is True, duration_ms=_float(data.get("duration_ms")),
                   error=_str(data.get("error")))


@dataclass(frozen=True)
class TestSummary:
    """How many tests ran, passed, failed and were skipped."""

    __test__ = False

    total: int
    passed: int
    failed: int
    skipped: int

    @classmethod
    def from_wire(cls, data: Any) -> TestSummary:
        data = data if isinstance(data, Mapping) else {}
        return cls(*(_int(data.get(key)) or 0 for key in ("total", "passed", "failed", "skipped")))


@dataclass(frozen=True)
class TestReport:
    """A `run_tests` run: `success` when no test failed and at least one ran (or was skipped), and
    the run itself finished (`status` is `success`; otherwise `error` says why not: a timeout, a
    crash, code that does not import)."""

    __test__ = False

    success: bool
    status: str
    summary: TestSummary
    tests: list[TestOutcome]
    error: FunctionError | None
    stdout: str
    stderr: str
    duration_ms: float | None
    exec_id: str | None
    truncated: bool
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def failures(self) -> list[TestOutcome]:
        """The tests that failed."""
        return [t for t in self.tests if not t.passed and not t.skipped]

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> TestReport:
        tests = data.get("tests")
        return cls(
            success=data.get("success") is True,
            status=str(data.get("status") or ""),
            summary=TestSummary.from_wire(data.get("summary")),
            tests=[TestOutcome.from_wire(t) for t in tests if isinstance(t, Mapping)] if isinstance(tests, list)
            else [],
            error=FunctionError.from_wire(data.get("error")),
            stdout=str(data.get("stdout") or ""),
            stderr=str(data.get("stderr") or ""),
            duration_ms=_float(data.get("duration_ms")),
            exec_id=_str(data.get("exec_id")),
            truncated=data.get("truncated") is True,
            raw=dict(data),
        )


@dataclass(frozen=True)
class FunctionInfo:
    """A deployed function as the gateway describes it (`GET /v1/functions/{name}`; without its code).

    `version` is the hash of what its instances run: a redeploy that changes the code or a setting
    that shapes an instance makes a new version (old instances are drained). `instances` are the
    function's warm sandboxes: `{id, version, busy, calls, idle_s}` each; `queued` the calls waiting
    for one.
    """

    name: str
    version: str
    runtime: str
    language: str
    function: str
    timeout: float | None
    memory_mb: int | None
    min_instances: int
    max_instances: int
    idle_timeout: float | None
    env: dict[str, str]
    code_hash: str | None
    created_at: float | None
    updated_at: float | None
    instances: list[dict[str, Any]]
    queued: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> FunctionInfo:
        env, instances = data.get("env"), data.get("instances")
        return cls(
            name=str(data["name"]),
            version=str(data.get("version") or ""),
            runtime=str(data.get("runtime") or ""),
            language=str(data.get("language") or ""),
            function=str(data.get("function") or ""),
            timeout=_float(data.get("timeout")),
            memory_mb=int(memory) if (memory := _float(data.get("memory_mb"))) is not None else None,
            min_instances=int(_float(data.get("min_instances")) or 0),
            max_instances=int(_float(data.get("max_instances")) or 0),
            idle_timeout=_float(data.get("idle_timeout")),
            env={str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
            code_hash=_str(data.get("code_hash")),
            created_at=_float(data.get("created_at")),
            updated_at=_float(data.get("updated_at")),
            instances=[dict(i) for i in instances if isinstance(i, dict)] if isinstance(instances, list) else [],
            queued=_int(data.get("queued")) or 0,
            raw=dict(data),
        )


@dataclass(frozen=True)
class VolumeInfo:
    """A named volume (`GET /v1/volumes/{name}`): its size, the bytes in use (None when the
    gateway cannot tell right now) and the sandboxes that mount it (`{sandbox_id, readonly}`)."""

    name: str
    quota_mb: int
    store: str
    used_bytes: int | None
    mounted_by: list[dict[str, Any]]
    created_at: float | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> VolumeInfo:
        mounted = data.get("mounted_by")
        return cls(name=str(data["name"]), quota_mb=_int(data.get("quota_mb")) or 0, store=str(data.get("store") or ""),
                   used_bytes=_int(data.get("used_bytes")),
                   mounted_by=[dict(m) for m in mounted if isinstance(m, dict)] if isinstance(mounted, list) else [],
                   created_at=_float(data.get("created_at")), raw=dict(data))


@dataclass(frozen=True)
class PortInfo:
    """A published port (`POST /v1/sandboxes/{id}/ports`): its number, its URL on the gateway and
    its token (None where the gateway shows none, as in a sandbox's description).

    Attributes:
        url: the port's absolute URL (the gateway's address and `/v1/sandboxes/{id}/ports/{port}/`):
            HTTP and WebSocket requests under it reach the sandbox's port, with the API key.
        token: opens the URL without the API key: `preview_url` carries it.
    """

    port: int
    url: str
    token: str | None
    connections: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def preview_url(self) -> str:
        """The URL to hand to a browser: `?token=` makes the gateway set the port's cookie (and
        drop the token from the address bar), so the page and its assets load without a key."""
        return f"{self.url}?token={self.token}" if self.token else self.url

    @classmethod
    def from_wire(cls, data: Mapping[str, Any], base_url: str = "") -> PortInfo:
        token = data.get("token")
        return cls(port=_int(data.get("port")) or 0, url=base_url + str(data.get("url") or ""),
                   token=token if isinstance(token, str) else None, connections=_int(data.get("connections")) or 0,
                   raw=dict(data))


#: The states in which an execution has ended.
FINISHED_STATES = frozenset({"completed", "failed", "cancelled", "timeout"})


@dataclass(frozen=True)
class ExecutionInfo:
    """An async execution (`GET /v1/sandboxes/{id}/executions/{eid}`): any exec of the sandbox,
    whichever way it was started (REST, the WebSocket, an invoke).

    Attributes:
        state: `pending`, `running`, then `completed` (exit 0), `failed` (any other end),
            `cancelled` or `timeout`.
        stdout, stderr: the output from `output_offset` on (a listing carries none: empty).
        display: the rich output (`Display`s) from `output_offset` on.
        output_offset: where the next poll continues (pass it back as `output_offset`), None in a listing.
        output_lost: `(first, last)` sequence numbers that fell out of the replay buffer, if any.
        error: why it did not end on its own (`Timeout`, `GuestDied`), else None.
    """

    id: str
    state: str
    tag: str | None
    exit_code: int | None
    signal: str | None
    error: SandgateError | None
    duration_ms: float | None
    created_at: float | None
    ended_at: float | None
    stdout: str = ""
    stderr: str = ""
    pty: str = ""
    output_offset: int | None = None
    output_lost: tuple[int, int] | None = None
    display: list[Display] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        """It has ended (completed, failed, cancelled or timed out; or any state with an end time,
        so a state newer than this client still ends a `follow_execution`)."""
        return self.state in FINISHED_STATES or self.ended_at is not None

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ExecutionInfo:
        lost = data.get("output_lost")
        return cls(
            id=str(data["id"]),
            state=str(data.get("state") or ""),
            tag=_str(data.get("tag")),
            exit_code=_int(data.get("exit_code")),
            signal=_str(data.get("signal")),
            error=error_from_wire(data["error"]) if data.get("error") else None,
            duration_ms=_float(data.get("duration_ms")),
            created_at=_float(data.get("created_at")),
            ended_at=_float(data.get("ended_at")),
            stdout=str(data.get("stdout") or ""),
            stderr=str(data.get("stderr") or ""),
            pty=str(data.get("pty") or ""),
            output_offset=_int(data.get("output_offset")),
            output_lost=(int(lost[0]), int(lost[1])) if isinstance(lost, list) and len(lost) == 2
            and all(_int(n) is not None for n in lost) else None,
            display=displays_from_wire(data.get("display")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class CacheEntry:
    """One code body in the tenant's content-addressed cache: pass `hash` as `code_ref` instead of
    sending the code again."""

    hash: str
    language: str | None
    bytes: int
    created_at: float | None
    last_used: float | None
    hits: int

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CacheEntry:
        return cls(hash=str(data["hash"]), language=_str(data.get("language")), bytes=_int(data.get("bytes")) or 0,
                   created_at=_float(data.get("created_at")), last_used=_float(data.get("last_used")),
                   hits=_int(data.get("hits")) or 0)
