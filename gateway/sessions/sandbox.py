"""The model: one sandbox as the gateway keeps it (`Sandbox`).

A module of its own because every other part of `gateway.sessions` and the web layer use it, while
it depends on none of them: admission, the manager and the op router all import it, never the other
way round. It holds state and the facts derived from state (capabilities, activity, the REST
description); decisions about a sandbox are made elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Ports
from gateway.ports.registry import PortRegistry
from gateway.runtime.agent_client import AgentClient
from gateway.runtime.base import Backend, Runtime, SandboxSpec
from gateway.sessions.execs import ExecRecord
from gateway.sessions.replay import ReplayBudget
from gateway.storage.mount_sync import MountState
from guest_agent import languages


@dataclass
class Sandbox:
    id: str
    tenant: str
    runtime: Runtime
    spec: SandboxSpec
    backend: Backend
    agent: AgentClient
    ttl: float
    idle_timeout: float
    metadata: dict[str, str]
    created_at: float = field(default_factory=time.time)
    created_mono: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    state: str = "running"
    sessions: int = 0
    execs: dict[str, ExecRecord] = field(default_factory=dict)
    #: Records whose pump still runs, and finished exec ids oldest first (for pruning `execs`).
    live_execs: set[ExecRecord] = field(default_factory=set)
    finished_execs: deque[str] = field(default_factory=deque)
    exec_ids: Any = field(default_factory=lambda: itertools.count(1))
    restarts: int = 0
    destroyed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    #: Held while the agent is replaced. Shared by lifecycle (the restart itself) and op routing
    #: (which waits out a restart before it uses `agent`), hence public.
    restart_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The replay bytes all of this sandbox's execs share (its parent is the gateway's).
    replay_budget: ReplayBudget | None = None
    #: What made the sandbox for its own use (`function:<name>`, `ephemeral`): such a sandbox counts
    #: against the tenant's quotas but is not in its sandbox list. None: the tenant's own.
    owner: str | None = None
    #: Host mounts (gateway/storage/mount_sync.py), in the create's order.
    mounts: tuple[MountState, ...] = ()
    #: Published ports (gateway/ports): the manager gives it the gateway's `[ports]` bounds.
    ports: PortRegistry = field(default_factory=lambda: PortRegistry(Ports()))

    @property
    def capabilities(self) -> frozenset[str]:
        oneshot = {f"exec.{lang}" for lang in self.backend.oneshot_languages()}
        return self.agent.capabilities | self.runtime.capabilities | oneshot

    def languages(self) -> list[str]:
        """The languages `code` may be in here (its `exec.<language>` capabilities)."""
        return sorted(c.removeprefix("exec.") for c in self.capabilities
                      if c.startswith("exec.") and c.removeprefix("exec.") in languages.BY_ID)

    def running_execs(self) -> list[ExecRecord]:
        # `running` too: a record is done (its end published) a moment before its pump leaves.
        return [r for r in self.live_execs if r.running]

    @property
    def active(self) -> bool:
        """Open sessions, running execs and open connections to its ports are activity: the idle
        reaper leaves the sandbox be."""
        return self.sessions > 0 or bool(self.running_execs()) or self.ports.open_connections > 0

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def describe(self, *, port_tokens: bool = False) -> dict[str, Any]:
        """The sandbox as the REST API shows it; its ports' tokens only with `port_tokens` (the
        create's answer, to the tenant that asked for the ports)."""
        return {
            "id": self.id,
            "runtime": self.runtime.id,
            "state": self.state,
            "created_at": self.created_at,
            "expires_at": self.created_at + self.ttl,
            "ttl": self.ttl,
            "idle_timeout": self.idle_timeout,
            "memory_mb": self.spec.memory_mb,
            "cpu_seconds": self.spec.cpu_seconds,
            "disk_mb": self.spec.disk_mb,
            "network": self.spec.egress.policy.to_wire() if self.spec.egress is not None else "none",
            "secrets": self.spec.egress.secrets.describe() if self.spec.egress is not None else [],
            "template": self.spec.template,
            "volumes": {m.path: {"name": m.name, "readonly": m.readonly} for m in self.spec.volumes},
            "mounts": [{"path": m.spec.path, "sync": m.spec.sync, "on_error": m.spec.on_error} for m in self.mounts],
            "capabilities": sorted(self.capabilities),
            "languages": self.languages(),
            "metadata": self.metadata,
            "execs_running": len(self.running_execs()),
            "ports": [p.describe(self.id, with_token=port_tokens) for p in self.ports.list()],
            "ws_url": f"/v1/sandboxes/{self.id}/ws",
        }

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run `coro` as one of the sandbox's tasks: a destroy cancels and awaits them all."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task
