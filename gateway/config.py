"""Gateway settings: one dataclass, read from a TOML file and the environment (env wins).

Every limit and default a decision depends on lives here, so there is one place to look.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Limits:
    """Defaults and maxima for one sandbox; a create request may ask for up to the maximum."""

    ttl_s: float = 3600.0
    max_ttl_s: float = 24 * 3600.0
    idle_timeout_s: float = 600.0
    max_idle_timeout_s: float = 24 * 3600.0
    memory_mb: int = 256
    max_memory_mb: int = 4096
    cpu_seconds: float = 600.0
    max_cpu_seconds: float = 24 * 3600.0
    disk_mb: int = 512
    max_disk_mb: int = 16384
    #: REST exec: a request must finish, so it gets a timeout when it names none.
    exec_timeout_s: float = 60.0
    max_exec_timeout_s: float = 3600.0
    #: REST exec: output beyond this is cut and the reply says `truncated: true`.
    exec_output_bytes: int = 16 << 20
    #: What a reconnecting client can get replayed, per exec.
    replay_bytes: int = 4 << 20
    #: An exec past its timeout plus this grace is taken as wedged and its agent restarted.
    exec_grace_s: float = 1.0
    agent_request_timeout_s: float = 30.0


@dataclass(frozen=True)
class Quotas:
    """Per-tenant quotas; exceeding one answers 429 with Retry-After."""

    max_sandboxes: int = 50
    creates_per_minute: int = 120


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    #: API key -> tenant.
    api_keys: Mapping[str, str] = field(default_factory=dict)
    #: Origins allowed to open WebSockets; the gateway's own origin is always allowed.
    allowed_origins: tuple[str, ...] = ()
    default_runtime: str = "wasm"
    limits: Limits = field(default_factory=Limits)
    quotas: Quotas = field(default_factory=Quotas)
    #: `[runtimes.<id>]` tables, handed to each runtime's constructor.
    runtimes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Entry-point names of runtime plugins not to load.
    blocked_plugins: tuple[str, ...] = ()
    reap_interval_s: float = 5.0
    #: Seconds a client has to take one output event before it is disconnected (4408).
    client_send_timeout_s: float = 30.0
    #: Seconds of silence after which a running exec's stream gets a keepalive event.
    keepalive_s: float = 15.0
    #: A key generated at start when none is configured (loopback only); printed by `serve`.
    generated_key: str | None = None

    def with_generated_key_if_needed(self) -> Settings:
        """With no API keys configured, refuse non-loopback hosts and make one key for this run."""
        if self.api_keys:
            return self
        if self.host not in LOOPBACK:
            raise SystemExit(
                f"refusing to serve on {self.host} without API keys: set SANDGATE_API_KEYS "
                "(key:tenant,...) or api_keys in the config file, or serve on 127.0.0.1"
            )
        key = "sg_" + secrets.token_urlsafe(24)
        return replace(self, api_keys={key: "default"}, generated_key=key)


def parse_api_keys(text: str) -> dict[str, str]:
    """`key:tenant,key:tenant` -> {key: tenant}."""
    keys: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, tenant = item.partition(":")
        if not sep or not key or not tenant:
            raise ValueError(f"SANDGATE_API_KEYS entry {item[:6]!r}... is not key:tenant")
        keys[key] = tenant
    return keys


def _section(cls: type[Any], table: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"unknown settings in [{where}]: {sorted(unknown)}")
    return cls(**table)


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Settings from a TOML file (optional), then `SANDGATE_*` environment variables, then
    keyword overrides (the CLI's flags)."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        with Path(path).open("rb") as f:
            data = tomllib.load(f)
    values: dict[str, Any] = {}
    for name in ("host", "port", "default_runtime", "reap_interval_s", "client_send_timeout_s", "keepalive_s"):
        if name in data:
            values[name] = data.pop(name)
    if "api_keys" in data:
        raw = data.pop("api_keys")
        values["api_keys"] = parse_api_keys(raw) if isinstance(raw, str) else dict(raw)
    if "allowed_origins" in data:
        values["allowed_origins"] = tuple(data.pop("allowed_origins"))
    if "limits" in data:
        values["limits"] = _section(Limits, data.pop("limits"), "limits")
    if "quotas" in data:
        values["quotas"] = _section(Quotas, data.pop("quotas"), "quotas")
    if "runtimes" in data:
        values["runtimes"] = dict(data.pop("runtimes"))
    if "plugins" in data:
        values["blocked_plugins"] = tuple(data.pop("plugins").get("blocked", ()))
    if data:
        raise ValueError(f"unknown settings: {sorted(data)}")

    if env.get("SANDGATE_API_KEYS"):
        values["api_keys"] = parse_api_keys(env["SANDGATE_API_KEYS"])
    if env.get("SANDGATE_BLOCKED_PLUGINS"):
        values["blocked_plugins"] = tuple(n.strip() for n in env["SANDGATE_BLOCKED_PLUGINS"].split(",") if n.strip())
    if env.get("SANDGATE_ALLOWED_ORIGINS"):
        values["allowed_origins"] = tuple(o.strip() for o in env["SANDGATE_ALLOWED_ORIGINS"].split(",") if o.strip())
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
