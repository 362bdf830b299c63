"""Gateway settings: one dataclass, read from a TOML file and the environment (env wins).

Every limit and default a decision depends on lives here, so there is one place to look. Every
setting is checked here too, once, when its dataclass is made (from the file, the environment, the
command line or a program): a bad value is refused with a `ConfigError` naming the setting, and
nothing downstream checks a type or a bound again.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import secrets
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.egress.resolver import parse_nameservers
from guest_agent.schema import MAX_NET_WINDOW
from guest_agent.wire import CHUNK_SIZE

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ConfigError(ValueError):
    """A setting that cannot be used. The message is one line naming the setting (and, from
    `load_settings`, the file, environment variable or flag it came from) and what is wrong."""


# -- checking values against their annotations ---------------------------------------------------


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(tp: Any) -> str:
    """`tp` in words, for a message saying what a setting must be."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is not None and issubclass(origin, Mapping):
        return "a table" if args[1] is Any else f"a table of {_expected(args[1]).removeprefix('a ')}s"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", Any: "a value"}
    return names.get(tp, "a table")


def check_value(value: Any, tp: Any, name: str) -> Any:
    """`value` as the annotation `tp` wants it (an integer is a float, a list is a tuple), or
    ConfigError naming `name`. TOML's types are all it needs to know."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # settings have one kind of union: `X | None`
        (inner,) = (a for a in args if a is not type(None))
        return None if value is None else check_value(value, inner, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, list | tuple):
            return tuple(check_value(item, args[0], f"{name}[{i}]") for i, item in enumerate(value))
    elif origin is not None and issubclass(origin, Mapping):
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return {k: check_value(v, args[1], f"{name}.{k}") for k, v in value.items()}
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"{name}: no check for the annotation {tp!r}")
    raise ConfigError(f"{name} must be {_expected(tp)}, not {_show(value)}")


@functools.cache
def _annotations(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(settings: Any, prefix: str = "") -> None:
    """Check every field of the frozen dataclass `settings` against its annotation and store the
    normalised value; called from a settings class's `__post_init__` (the runtimes' too).

    Raises:
        ConfigError: naming `prefix` + the field.
    """
    hints = _annotations(settings.__class__)
    for f in fields(settings):
        object.__setattr__(settings, f.name, check_value(getattr(settings, f.name), hints[f.name], prefix + f.name))


def check_keys(table: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Refuse keys of `table` that are not in `known` (a typo would otherwise be ignored).

    Raises:
        ConfigError: naming each unknown key, with the known one it resembles.
    """
    known = sorted(known)
    unknown = sorted(set(table) - set(known))
    if not unknown:
        return
    described, guessed = [], True
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        described.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        guessed = guessed and bool(close)
    raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(described)}"
                      + (f" in {where}" if where else "") + ("" if guessed else f"; known: {', '.join(known)}"))


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table, not {_show(value)}")
    return dict(value)


def check_positive(settings: Any, prefix: str, zero_ok: Iterable[str] = ()) -> None:
    """Every number field of `settings` > 0 (those in `zero_ok` >= 0); called from `__post_init__`
    after `check_fields` (the runtimes' settings too). Other fields (strings, flags) are left to
    the caller's own checks.

    Raises:
        ConfigError: naming `prefix` + the field.
    """
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if f.name in zero_ok:
            if value < 0:
                raise ConfigError(f"{prefix}{f.name} must be >= 0, not {value!r}")
        elif not value > 0:
            raise ConfigError(f"{prefix}{f.name} must be > 0, not {value!r}")


# -- the settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Defaults and maxima for one sandbox; a create request may ask for up to the maximum.
    Every value is > 0 (`exec_grace_s` >= 0) and every default at most its `max_` twin."""

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
    #: REST exec: each output stream (stdout, stderr, pty) keeps at most its first this many bytes;
    #: the reply counts the rest in `dropped_bytes` and says `<stream>_truncated: true`.
    exec_stream_output_bytes: int = 1 << 20
    #: What a reconnecting client can get replayed, per exec.
    replay_bytes: int = 4 << 20
    #: Replay kept for all execs of one sandbox, and of the whole gateway (real bytes of memory):
    #: past either, the buffers of the execs that finished longest ago are emptied first (an
    #: attach then reports the range as `lost`).
    replay_sandbox_bytes: int = 16 << 20
    replay_gateway_bytes: int = 512 << 20
    #: Bytes of one agent stream's events the gateway holds for a consumer that has not taken them
    #: yet; past it, the gateway stops reading the sandbox's channel (backpressure on the guest).
    agent_stream_queue_bytes: int = 256 << 10
    #: Frames of one sandbox's channel the gateway decodes (and events of one stream it queues)
    #: before it lets other work run: each sandbox's share of a turn of the event loop.
    agent_turn_events: int = 8
    #: An exec past its timeout plus this grace is taken as wedged and its agent restarted.
    exec_grace_s: float = 1.0
    agent_request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_fields(self, "[limits] ")
        check_positive(self, "[limits] ", zero_ok={"exec_grace_s"})
        for f in fields(self):
            if f.name.startswith("max_"):
                default, maximum = getattr(self, f.name.removeprefix("max_")), getattr(self, f.name)
                if default > maximum:
                    raise ConfigError(f"[limits] {f.name.removeprefix('max_')} = {default:g} is above "
                                      f"{f.name} = {maximum:g}")
        for smaller, larger in (("replay_bytes", "replay_sandbox_bytes"),
                                ("replay_sandbox_bytes", "replay_gateway_bytes")):
            if getattr(self, smaller) > getattr(self, larger):
                raise ConfigError(f"[limits] {smaller} = {getattr(self, smaller)} is above {larger} = "
                                  f"{getattr(self, larger)}")


@dataclass(frozen=True)
class Quotas:
    """Per-tenant quotas; exceeding one answers 429 with Retry-After. Each is > 0."""

    max_sandboxes: int = 50
    creates_per_minute: int = 120

    def __post_init__(self) -> None:
        check_fields(self, "[quotas] ")
        check_positive(self, "[quotas] ")


@dataclass(frozen=True)
class Functions:
    """Serverless settings (`[functions]`): deployed functions, async executions, the code cache.
    Each is > 0."""

    #: Code bodies kept per tenant in the content-addressed cache (LRU past it).
    code_cache_bytes: int = 16 << 20
    #: Deployed functions one tenant may have.
    max_functions: int = 100
    #: The most instances a function may ask for (`max_instances`), and its default.
    max_instances: int = 10
    default_max_instances: int = 1
    #: An instance idle this long is destroyed (unless `min_instances` keep it), when the function
    #: names no `idle_timeout`.
    idle_timeout_s: float = 300.0
    #: Invocations of one function waiting for an instance, per instance it may have; more answer 429.
    queue_per_instance: int = 16
    #: How long a queued invocation waits for an instance before it answers 429.
    queue_wait_s: float = 30.0
    #: The most bytes an invoke's result (its JSON report) may have.
    result_bytes: int = 4 << 20
    #: Finished executions (exec records) kept per sandbox, and for how long after they ended.
    executions_kept: int = 64
    executions_keep_s: float = 3600.0
    #: The longest `GET .../executions/{id}?wait=true` waits (its `timeout` is capped at this).
    max_wait_s: float = 300.0

    def __post_init__(self) -> None:
        check_fields(self, "[functions] ")
        check_positive(self, "[functions] ")
        if self.default_max_instances > self.max_instances:
            raise ConfigError(f"[functions] default_max_instances = {self.default_max_instances} is above "
                              f"max_instances = {self.max_instances}")


@dataclass(frozen=True)
class Storage:
    """Named volumes (`[storage]`, docs/storage.md). Sizes in MB; each count and size is > 0."""

    #: Where volumes live (records and the "local" store's images); they outlive the gateway, so
    #: not under the cache. Empty: `$SANDGATE_DATA_DIR/volumes`, else the platform's user data folder
    #: (`~/.local/share/sandgate/volumes`).
    dir: str = ""
    #: A volume's `quota_mb` when the create names none, and the most it may name.
    quota_mb: int = 1024
    max_quota_mb: int = 16384
    #: Volumes one tenant may have, and the sum of their quotas.
    max_volumes: int = 20
    max_tenant_mb: int = 65536
    #: Host directories `"mounts"` may name lie under one of these (none: mounts are refused).
    allowed_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, "[storage] ")
        for name in ("quota_mb", "max_quota_mb", "max_volumes", "max_tenant_mb"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"[storage] {name} must be > 0, not {getattr(self, name)!r}")
        if self.quota_mb > self.max_quota_mb:
            raise ConfigError(f"[storage] quota_mb = {self.quota_mb} is above max_quota_mb = {self.max_quota_mb}")
        for i, root in enumerate(self.allowed_roots):
            if not os.path.isabs(root):
                raise ConfigError(f"[storage] allowed_roots[{i}] must be an absolute path, not {_show(root)}")


@dataclass(frozen=True)
class NetworkAccess:
    """Who may give sandboxes a network, and how the gateway reaches the network for them
    (`[network]`; the policy itself is each sandbox's: gateway/egress/policy.py)."""

    #: Whether a tenant that `tenants` does not name may create sandboxes with a network.
    allowed: bool = True
    #: Tenant -> whether it may, over `allowed`.
    tenants: Mapping[str, bool] = field(default_factory=dict)
    #: Tenants that may ask for `"all"` (private networks and the metadata address too): none by default.
    all_tenants: tuple[str, ...] = ()
    #: Name servers the gateway asks for sandboxes' names ("address" or "address:port"); empty: the
    #: host's resolver.
    nameservers: tuple[str, ...] = ()
    #: An extra CA bundle (PEM) trusted for upstream TLS besides the system's (a corporate proxy's
    #: CA; the tests' upstream).
    upstream_ca_file: str = ""

    def __post_init__(self) -> None:
        check_fields(self, "[network] ")
        for tenant in (*self.tenants, *self.all_tenants):
            if not tenant.strip():
                raise ConfigError("[network] tenants: a tenant name must not be empty")
        try:
            parse_nameservers(self.nameservers)
        except ValueError as exc:
            raise ConfigError(f"[network] nameservers: {exc}") from None
        if self.upstream_ca_file and not os.path.isfile(self.upstream_ca_file):
            raise ConfigError(f"[network] upstream_ca_file: no file {_show(self.upstream_ca_file)}")

    def allows(self, tenant: str) -> bool:
        """Whether `tenant` may create a sandbox with a network."""
        return self.tenants.get(tenant, self.allowed)

    def allows_all(self, tenant: str) -> bool:
        """Whether `tenant` may ask for `"all"`."""
        return self.allows(tenant) and tenant in self.all_tenants


@dataclass(frozen=True)
class Ports:
    """Published ports (`[ports]`): how many, how many connections, and the bounds of what a client
    or a guest server may make the gateway hold. Every number is > 0."""

    #: Ports one sandbox may publish at once.
    max_per_sandbox: int = 16
    #: Proxied connections (an HTTP exchange or a WebSocket) open at once to one port, and to all
    #: of a sandbox's ports; more are refused with 503 `unavailable` (retryable).
    max_connections_per_port: int = 64
    max_connections_per_sandbox: int = 128
    #: Bytes of a guest server's output one connection may hold in the gateway (its credit window,
    #: granted again as the client takes it): a slow client holds the guest back, not memory.
    window_bytes: int = 256 << 10
    #: The most a guest server's response head (status line and headers) may take.
    max_header_bytes: int = 64 << 10
    #: The largest WebSocket message either side may send through a port.
    max_websocket_message_bytes: int = 4 << 20
    #: Seconds an HTTP exchange may pass without a byte either way before it is cut (a WebSocket
    #: may stay quiet: the sandbox's ttl bounds it).
    idle_timeout_s: float = 300.0
    #: Seconds the guest has to accept a connection.
    connect_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        check_fields(self, "[ports] ")
        check_positive(self, "[ports] ")
        if not CHUNK_SIZE <= self.window_bytes <= MAX_NET_WINDOW:
            raise ConfigError(f"[ports] window_bytes must be from {CHUNK_SIZE} to {MAX_NET_WINDOW}, "
                              f"not {self.window_bytes}")
        if self.max_connections_per_port > self.max_connections_per_sandbox:
            raise ConfigError(f"[ports] max_connections_per_port = {self.max_connections_per_port} is above "
                              f"max_connections_per_sandbox = {self.max_connections_per_sandbox}")


@dataclass(frozen=True)
class Settings:
    """The gateway's settings (README: Configuration); `load_settings` reads them."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: API key -> tenant.
    api_keys: Mapping[str, str] = field(default_factory=dict)
    #: Origins allowed to open WebSockets; the gateway's own origin is always allowed.
    allowed_origins: tuple[str, ...] = ()
    default_runtime: str = "wasm"
    limits: Limits = field(default_factory=Limits)
    quotas: Quotas = field(default_factory=Quotas)
    network: NetworkAccess = field(default_factory=NetworkAccess)
    functions: Functions = field(default_factory=Functions)
    storage: Storage = field(default_factory=Storage)
    ports: Ports = field(default_factory=Ports)
    #: `[runtimes.<id>]` tables, handed to each runtime's constructor.
    runtimes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Entry-point names of runtime plugins not to load.
    blocked_plugins: tuple[str, ...] = ()
    reap_interval_s: float = 5.0
    #: Seconds a client has to take one output event before it is disconnected (4408).
    client_send_timeout_s: float = 30.0
    #: Seconds of silence after which a running exec's stream gets a keepalive event.
    keepalive_s: float = 15.0
    #: Seconds a new connection has to send a complete request head before it is closed.
    http_header_timeout_s: float = 10.0
    #: Seconds a keep-alive connection may sit between requests (a partial head counts as idle).
    http_idle_timeout_s: float = 75.0
    #: Connections one remote address may hold open at once (0: no bound, e.g. behind a proxy);
    #: more are closed at accept. WebSocket sessions count: allow for a client's sessions.
    max_connections_per_address: int = 256
    #: A key generated at start when none is configured (loopback only); printed by `serve`.
    generated_key: str | None = None

    def __post_init__(self) -> None:
        # Before the generic check, whose messages show values: these are secrets.
        _check_api_keys(self.api_keys)
        check_fields(self)
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"host must be an address or a host name, not {_show(self.host)}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be from 1 to 65535, not {self.port}")
        for i, origin in enumerate(self.allowed_origins):
            _check_origin(origin, f"allowed_origins[{i}]")
        if not self.default_runtime.strip():
            raise ConfigError("default_runtime must not be empty")
        for i, name in enumerate(self.blocked_plugins):
            if not name.strip():
                raise ConfigError(f"blocked_plugins[{i}] must not be empty")
        for runtime_id in self.runtimes:
            if not runtime_id:
                raise ConfigError("[runtimes] a runtime table needs a name: [runtimes.<id>]")
        for name in ("reap_interval_s", "client_send_timeout_s", "keepalive_s", "http_header_timeout_s",
                     "http_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, not {getattr(self, name)!r}")
        if self.max_connections_per_address < 0:
            raise ConfigError(f"max_connections_per_address must be >= 0 (0: no bound), "
                              f"not {self.max_connections_per_address}")

    def with_generated_key_if_needed(self) -> Settings:
        """With no API keys configured, refuse non-loopback hosts and make one key for this run.

        Raises:
            ConfigError: a host other than loopback with no keys.
        """
        if self.api_keys:
            return self
        if self.host not in LOOPBACK:
            raise ConfigError(
                f"refusing to serve on {self.host} without API keys: set SANDGATE_API_KEYS "
                "(key:tenant,...) or api_keys in the config file, or serve on 127.0.0.1"
            )
        key = "sg_" + secrets.token_urlsafe(24)
        return replace(self, api_keys={key: "default"}, generated_key=key)


def _secret(key: str) -> str:
    """Enough of an API key to find it in a config, not enough to use it."""
    return f"{key[:6]!r}..."


def _check_api_keys(keys: Any) -> None:
    if not isinstance(keys, Mapping):
        raise ConfigError('api_keys must be a "key:tenant,key:tenant" string or a table of key = "tenant"')
    for key, tenant in keys.items():
        if not isinstance(key, str) or not key or any(c.isspace() or c in ",:" for c in key):
            raise ConfigError(f"api_keys: the key {_secret(str(key))} must be a non-empty string without spaces, "
                              "commas or colons")
        if not isinstance(tenant, str) or not tenant.strip():
            raise ConfigError(f"api_keys: the tenant of key {_secret(key)} must be a non-empty string")


def _check_origin(origin: str, name: str) -> None:
    """An Origin header is `scheme://host[:port]`, compared exactly: a path or a trailing slash
    would never match, so it is refused rather than silently ignored."""
    if origin == "*":
        return
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        parts = None
    if parts is None or not parts.scheme or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise ConfigError(f"{name} must be an origin like 'https://ide.example.com' (scheme://host[:port], "
                          f"no path) or '*', not {_show(origin)}")


def parse_api_keys(text: str) -> dict[str, str]:
    """`key:tenant,key:tenant` -> {key: tenant}.

    Raises:
        ConfigError: an entry that is not key:tenant, or a key given twice.
    """
    keys: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, tenant = item.partition(":")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            raise ConfigError(f"entry {_secret(item)} is not key:tenant")
        if key in keys:
            raise ConfigError(f"the key {_secret(key)} is given twice")
        keys[key] = tenant
    return keys


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


#: Environment variable -> (setting, parser). A variable that is empty defers to the file.
ENVIRONMENT: dict[str, tuple[str, typing.Callable[[str], Any]]] = {
    "SANDGATE_API_KEYS": ("api_keys", parse_api_keys),
    "SANDGATE_BLOCKED_PLUGINS": ("blocked_plugins", _names),
    "SANDGATE_ALLOWED_ORIGINS": ("allowed_origins", _names),
}

#: Top-level keys of the file that are settings of the same name; the tables are read apart.
FILE_SETTINGS = ("host", "port", "api_keys", "allowed_origins", "default_runtime", "reap_interval_s",
                 "client_send_timeout_s", "keepalive_s", "http_header_timeout_s", "http_idle_timeout_s",
                 "max_connections_per_address", "runtimes")
FILE_TABLES = ("limits", "quotas", "network", "functions", "storage", "ports", "plugins")


def _from_table(data: Mapping[str, Any]) -> Settings:
    check_keys(data, (*FILE_SETTINGS, *FILE_TABLES), "")
    values = {name: data[name] for name in FILE_SETTINGS if name in data}
    if isinstance(values.get("api_keys"), str):
        try:
            values["api_keys"] = parse_api_keys(values["api_keys"])
        except ConfigError as exc:
            raise ConfigError(f"api_keys: {exc}") from None
    if "runtimes" in values:
        values["runtimes"] = _table(values["runtimes"], "[runtimes]")
        for runtime_id, table in values["runtimes"].items():
            _table(table, f"[runtimes.{runtime_id}]")
    for name, cls in (("limits", Limits), ("quotas", Quotas), ("network", NetworkAccess), ("functions", Functions),
                      ("storage", Storage), ("ports", Ports)):
        if name in data:
            table = _table(data[name], f"[{name}]")
            check_keys(table, (f.name for f in fields(cls)), f"[{name}]")
            values[name] = cls(**table)
    if "plugins" in data:
        plugins = _table(data["plugins"], "[plugins]")
        check_keys(plugins, ("blocked",), "[plugins]")
        values["blocked_plugins"] = check_value(plugins.get("blocked", ()), _annotations(Settings)["blocked_plugins"],
                                                "[plugins] blocked")
    return Settings(**values)


def _read_file(path: Path) -> Settings:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        return _from_table(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Settings from a TOML file (optional), then `SANDGATE_*` environment variables, then
    keyword overrides (the CLI's flags; None means not given).

    Raises:
        ConfigError: the file is missing or not TOML, or a setting is unknown or bad; the message
            starts with the file, variable or flag the setting came from.
    """
    env = os.environ if env is None else env
    settings = Settings() if path is None else _read_file(Path(path))
    for variable, (name, parse) in ENVIRONMENT.items():
        text = env.get(variable)
        if text:
            try:
                settings = replace(settings, **{name: parse(text)})
            except ConfigError as exc:
                raise ConfigError(f"{variable}: {exc}") from None
    for name, value in overrides.items():
        if value is not None:
            try:
                settings = replace(settings, **{name: value})
            except ConfigError as exc:
                raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None
    return settings


def check_runtime_tables(settings: Settings, loaded: Iterable[str]) -> None:
    """Refuse a `[runtimes.<id>]` table for a runtime that is neither loaded nor blocked: a typo
    in its name would otherwise leave the runtime on its defaults without a word.

    Args:
        loaded: the ids of the runtimes the gateway loaded.

    Raises:
        ConfigError: naming the table and the runtimes there are.
    """
    known = {*loaded, *settings.blocked_plugins}
    for runtime_id in settings.runtimes:
        if runtime_id not in known:
            close = difflib.get_close_matches(runtime_id, sorted(known), n=1)
            raise ConfigError(f"[runtimes.{runtime_id}]: no such runtime is installed"
                              + (f" (did you mean [runtimes.{close[0]}]?)" if close else "")
                              + f"; installed: {', '.join(sorted(loaded)) or 'none'}")
