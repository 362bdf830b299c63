"""What the SDK hands back: sandbox descriptions, exec events and results, file entries, metrics.

Each is built from the protocol's JSON by a `from_wire` constructor that tolerates fields it does not
know (a newer gateway may add some) and keeps the original map in `raw`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.client.errors import SandgateError

Fd = Literal["stdout", "stderr", "pty"]


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


ExecEvent = Started | Output | OutputLost | Exited


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
        return cls(guest=dict(guest) if isinstance(guest, dict) else {},
                   host=dict(host) if isinstance(host, dict) else {},
                   restarts=_int(data.get("restarts")) or 0)
