"""The async runtime ABC, in the style of jupyter_client's kernel provisioners.

A `Runtime` is a factory registered once per process (one per runtime id); it makes one `Backend` per
sandbox. Required steps are abstract; optional steps are concrete and either do nothing or refuse
with `unsupported`, so a runtime offers exactly what it declares in `capabilities`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from gateway.egress.network import SandboxNetwork
from gateway.storage.volumes import VolumeBackend, VolumeMount
from guest_agent.wire import ProtocolError


class NotConfigured(Exception):
    """Raised by `Runtime.start` of an optional runtime the operator has not configured: the
    runtime stays off and is listed as unavailable with this message, which is not an error."""


#: `progress(seconds_elapsed, phase)`, called about twice a second during a long build.
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class SandboxSpec:
    """What the gateway asks a runtime to create.

    `options` are the runtime-specific fields of the create request, already checked by
    `Runtime.validate_options`.
    """

    sandbox_id: str
    tenant: str
    memory_mb: int
    cpu_seconds: float
    disk_mb: int
    network: bool = False
    template: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    #: The sandbox's lifetime and idle timeout (seconds) and creation time (epoch seconds), for
    #: runtimes whose sandboxes outlive a gateway: an adopting gateway keeps them, so adoption
    #: never extends a sandbox's life.
    ttl_s: float | None = None
    idle_timeout_s: float | None = None
    created_at: float | None = None
    #: Named volumes to mount (gateway/storage/volumes.py), already acquired for this sandbox; a
    #: runtime makes a sandbox with volumes cold (a warm one was started without them).
    volumes: tuple[VolumeMount, ...] = ()
    #: The sandbox's network (gateway/egress/network.py: its policy, secrets and figures) when it
    #: has one (`network` is then true): the runtime brings the sandbox's outbound connections
    #: to the policy proxy with it. Not part of what a spec is compared or saved by.
    egress: SandboxNetwork | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class CachedImage:
    """One thing a runtime keeps in the cache (an image, a compiled module, a fetched package),
    as `sandgate images ls` lists it."""

    #: What it is for: a template, a language, a toolchain.
    name: str
    path: Path
    #: Whether the runtime, as configured now, uses it (`sandgate images prune` removes the rest).
    current: bool
    #: Bytes on disk by part ("image", "snapshot", ...); a file hard-linked elsewhere counts here too.
    sizes: Mapping[str, int]
    detail: str = ""

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


class ByteChannel(ABC):
    """A reliable, ordered byte stream to a guest agent: pipes, a unix socket, a k8s exec stream."""

    @abstractmethod
    async def read(self) -> bytes:
        """Some bytes, or b"" at end of stream. Called from the gateway's AgentClient reader task."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """All of `data`, waiting while the peer is slow (that wait is the backpressure)."""

    @abstractmethod
    async def close(self) -> None:
        """Close both directions; safe to call twice."""


class StreamChannel(ByteChannel):
    """A ByteChannel over an asyncio StreamReader/StreamWriter pair (subprocess pipes, sockets)."""

    READ_SIZE = 256 * 1024

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | Any) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        return await self._reader.read(self.READ_SIZE)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def abort(self) -> None:
        """Close now, from synchronous code: the reader then sees end of input."""
        if not self._writer.is_closing():
            self._writer.close()

    async def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()
        try:
            # Shielded: wait_closed() awaits the pipe's one close future itself, and a caller
            # cancelled here (an agent restart cut short by a destroy) would cancel that future,
            # so every later close of this channel would raise CancelledError.
            await asyncio.shield(self._writer.wait_closed())
        except (ConnectionError, BrokenPipeError):
            pass  # the guest is already gone; closing is all that was asked


class Backend(ABC):
    """One sandbox, as its runtime sees it. Created by `Runtime.create`."""

    #: Host directory that is the sandbox's file system root, when the runtime has one on the host.
    host_root: Path | None = None

    @abstractmethod
    def channel(self) -> ByteChannel:
        """The byte channel to the guest agent. Called by SandboxManager right after `create` and
        after every `restart_agent`; the agent has not necessarily said hello yet."""

    @abstractmethod
    async def destroy(self) -> None:
        """Stop the guest and remove every process, file and directory the sandbox had. Called
        once by SandboxManager.destroy (API delete, ttl, idle reaper, shutdown). Must not raise
        for a guest that is already dead."""

    async def wait_exited(self) -> str:
        """Wait until the guest stops by itself and return why (for error messages). Called by
        SandboxManager's watcher; the default never returns (the channel's EOF is then the only
        sign of death)."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def restart_agent(self) -> None:
        """Replace a wedged guest agent (an exec that ran past its timeout in an agent that cannot
        interrupt itself). Called by SandboxManager's exec watchdog; files survive, in-memory
        state does not. The default refuses, and the sandbox is then marked failed."""
        raise ProtocolError("unsupported", "this runtime cannot restart its agent")

    async def network_changed(self, policy: Any) -> None:
        """The sandbox's network policy changed (`PATCH`; `policy` in its wire form). The gateway
        enforces it already; a runtime that keeps the policy with the sandbox, for a gateway
        that adopts it later (pods), saves it here. The default does nothing."""

    async def host_metrics(self) -> dict[str, Any]:
        """Host-side figures (rss_bytes, cpu_s of the sandbox's processes). Called for `metrics`."""
        return {}

    def disk_usage(self) -> tuple[int, int] | None:
        """(used, total) bytes of the sandbox's file system, measured on the host where the guest
        cannot change the figure, cheaply (no tree walk); None when the runtime cannot tell from
        outside the guest (the gateway then asks the agent). Called by REST uploads' quota check."""
        return None

    def oneshot_languages(self) -> frozenset[str]:
        """Languages this runtime runs itself, outside the agent (e.g. WASM's QuickJS)."""
        return frozenset()

    def run_oneshot(
        self, language: str, code: str, *, stdin: bytes, env: Mapping[str, str], timeout: float | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Run `code` once and yield exec stream events (start/data/end, without id/seq). Called
        by SandboxManager.start_exec for a language in `oneshot_languages()`."""
        raise ProtocolError("unsupported", f"this runtime does not run {language} itself")

    async def stop_oneshot(self) -> None:
        """Stop the running one-shot exec now (SIGKILL); its stream then ends as killed. Called by
        OpRouter.signal for a killing exec.signal naming a one-shot exec; returns without waiting
        for the end."""
        raise ProtocolError("unsupported", "this runtime runs no one-shot execs")

    def get_state(self) -> dict[str, Any]:
        """JSON-able state from which `Runtime.load_state` can reattach after a gateway restart."""
        return {}


class Runtime(ABC):
    """A runtime backend factory. Subclasses set a stable `id` and their `capabilities`."""

    #: Stable id used in `{"runtime": id}`; never reuse one for a different runtime.
    id: ClassVar[str]
    #: What sandboxes of this runtime can do beyond what the agent says in hello (docs/protocol.md §2).
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: One line for `GET /v1/runtimes`.
    description: ClassVar[str] = ""
    #: The least `memory_mb` a sandbox of this runtime can start with; a create asking for less
    #: answers `bad_request` before anything starts (docs/plugins.md).
    min_memory_mb: ClassVar[int] = 1
    #: The volume store whose volumes this runtime's sandboxes mount (`SandboxSpec.volumes`):
    #: "local" (ext4 images on this host, kept by the gateway), a store of the runtime's own
    #: (`volume_backend`), or None for no volumes.
    volume_store: ClassVar[str | None] = None
    #: Whether the sandbox's own TLS clients reach its secrets' hosts through the policy proxy,
    #: which shows them certificates of the sandbox's CA: the gateway then has the agent trust it
    #: (`guest.env`). False where the proxy itself speaks TLS for the guest (WASM's fetch).
    guest_speaks_tls: ClassVar[bool] = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        """`config` is this runtime's table from the gateway config file (`[runtimes.<id>]`)."""
        self.config = dict(config)
        self.unavailable_languages = {}

    @classmethod
    def build_images(cls, config: Mapping[str, Any], template: str | None, progress: Progress) -> list[str]:
        """Build and cache what this runtime's sandboxes boot from (compiled modules, kernels,
        root images, snapshots); return one line per artefact for the user. Called by
        `sandgate images build <id> [--template NAME]`, synchronously, outside any event loop;
        may take minutes, calling `progress(seconds_elapsed, phase)` as it goes. The default
        says there is nothing to build."""
        return [f"{cls.id}: nothing to build"]

    @classmethod
    def cached_images(cls, config: Mapping[str, Any]) -> list[CachedImage]:
        """What this runtime keeps in the cache, each marked current or not for `config` (its
        `[runtimes.<id>]` table). Called by `sandgate images ls`, outside any event loop; reads
        files only. The default: nothing."""
        return []

    @classmethod
    def prune_images(cls, config: Mapping[str, Any]) -> tuple[list[CachedImage], int]:
        """Remove what `cached_images` lists as not current; return what went and the bytes that
        freed (files with links elsewhere free nothing). Called by `sandgate images prune`,
        outside any event loop. The default removes nothing."""
        return [], 0

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check the runtime-specific fields of a create request; raise ProtocolError('bad_request').
        Called by SandboxManager.create before any quota is taken. The default accepts none."""
        if options:
            raise ProtocolError("bad_request", f"unknown options for {self.id}: {sorted(options)}")
        return {}

    def check_create(self, template: str | None, network: bool) -> None:
        """Refuse a template or network setting this runtime cannot honour (`bad_request`,
        `unsupported`, or `unavailable` for a template not built here). Called by
        SandboxManager.create with `validate_options`, before any quota or rate token is taken, so
        a request that cannot succeed costs the tenant nothing. The default accepts both."""

    #: Languages this runtime runs where the host has what they need, but not here, with the reason
    #: (a module not fetched): `GET /v1/runtimes` lists them and `unsupported` answers say why.
    unavailable_languages: dict[str, str]

    def languages(self) -> dict[str, list[str]]:
        """The languages (ids of guest_agent/languages.py) this runtime's sandboxes run, by template
        (`default`: no template asked): what `GET /v1/runtimes` lists. Empty when only a sandbox's
        agent can tell (its hello's `exec.<language>` capabilities decide either way)."""
        return {}

    def volume_backend(self) -> VolumeBackend | None:
        """The backend of this runtime's own `volume_store` (e.g. PersistentVolumeClaims), or None
        for a store the gateway keeps ("local"). Called once by the gateway after `start`."""
        return None

    async def start(self) -> None:
        """Prepare (fill warm pools, check host support). Called once at gateway start-up; a
        runtime that cannot work here raises, and the gateway serves without it."""

    async def stop(self) -> None:
        """Release what `start` made (pools). Called once at gateway shutdown, after every
        sandbox of this runtime was destroyed."""

    @abstractmethod
    async def create(self, spec: SandboxSpec) -> Backend:
        """Make a sandbox whose agent is reachable through `Backend.channel()`. Called by
        SandboxManager.create; raise ProtocolError('unavailable') when the host cannot."""

    async def find(self, sandbox_id: str) -> dict[str, Any] | None:
        """The state (as `Backend.get_state()`, with a `tenant` key) of a sandbox this gateway does
        not hold but another replica, or this gateway before a restart, made; None if this
        runtime has no such sandbox. Called by SandboxManager.lookup on a miss. Only runtimes
        whose sandboxes outlive their gateway (pods) implement it."""
        return None

    async def load_state(self, state: Mapping[str, Any]) -> Backend | None:
        """Reattach to a sandbox from `Backend.get_state()` (or `find`), or None if it is gone.
        Called by SandboxManager.lookup after `find`."""
        return None


class RuntimeRegistry:
    """Runtime classes by id, filled by the `sandgate_register_runtimes` hook."""

    def __init__(self) -> None:
        self._runtimes: dict[str, type[Runtime]] = {}

    def add(self, runtime: type[Runtime]) -> None:
        runtime_id = getattr(runtime, "id", None)
        if not isinstance(runtime_id, str) or not runtime_id:
            raise TypeError(f"{runtime!r} has no string `id`")
        if not (isinstance(runtime, type) and issubclass(runtime, Runtime)):
            raise TypeError(f"{runtime!r} is not a gateway.runtime.Runtime subclass")
        existing = self._runtimes.get(runtime_id)
        if existing is not None and existing is not runtime:
            raise ValueError(f"runtime id {runtime_id!r} registered twice ({existing!r}, {runtime!r})")
        self._runtimes[runtime_id] = runtime

    def get(self, runtime_id: str) -> type[Runtime]:
        return self._runtimes[runtime_id]

    def ids(self) -> list[str]:
        return sorted(self._runtimes)

    def __contains__(self, runtime_id: object) -> bool:
        return runtime_id in self._runtimes
