"""The asynchronous SDK: `AsyncClient`, `AsyncSandbox`, its `files`, and running `AsyncExecution`s.

Lifecycle, metrics and file transfers go over REST (streamed, independent of any socket); exec and
the other file-system ops go over one WebSocket per sandbox, opened on first use and kept up by
`Connection` (reconnect and re-attach). See docs/clients.md.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import io
import os
import secrets
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from yarl import URL

from gateway.client import bodies
from gateway.client.connection import Connection, ExecStream
from gateway.client.errors import (
    ConnectionLost,
    GuestProtocol,
    NotFound,
    SandgateError,
    Timeout,
    Unauthorized,
    error_for_status,
    error_from_wire,
)
from gateway.client.models import (
    CacheEntry,
    Display,
    ExecEvent,
    ExecResult,
    ExecutionInfo,
    Exited,
    FileInfo,
    FunctionInfo,
    InvokeResult,
    Metrics,
    NetworkPolicy,
    OutputLost,
    PortInfo,
    SandboxInfo,
    Started,
    TestReport,
    VolumeInfo,
    WatchEvent,
)
from gateway.client.streams import ResultBuilder
from gateway.protocol.client import JSON, MSGPACK

DEFAULT_URL = "http://127.0.0.1:8080"
#: What `exec()` keeps of an exec's output (the gateway's REST cap is the same).
DEFAULT_MAX_OUTPUT = 16 << 20
_CHUNK = 64 * 1024

FileData = bytes | bytearray | memoryview | str | AsyncIterable[bytes] | IO[bytes]


def _gateway_url(url: str | None) -> str:
    raw = url or os.environ.get("SANDGATE_URL") or DEFAULT_URL
    parts = urlsplit(raw)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the gateway URL must look like http://host:port, not {raw!r}")
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class AsyncClient:
    """A connection to one gateway with one API key; sandboxes made through it share its HTTP pool.

    Args:
        url: the gateway, e.g. `http://127.0.0.1:8080` (default: `$SANDGATE_URL`, then that).
        api_key: the tenant's API key (default: `$SANDGATE_API_KEY`).
        request_timeout: seconds a single request may take (not an exec: those take `timeout`).
        connect_timeout: seconds one attempt to connect may take.
        reconnect_timeout: seconds a dropped WebSocket keeps trying to come back.
        heartbeat: seconds between WebSocket pings; a missing pong counts as a drop.
        encoding: `"msgpack"` (binary frames, the default) or `"json"` on the WebSocket.
        call_timeout: seconds a call that runs code (invoke, run_tests, execute, invoke_function)
            may take when it names no `timeout` of its own; with one, that plus `request_timeout`.

    Raises:
        Unauthorized: no API key given and `$SANDGATE_API_KEY` is unset.
        ValueError: a URL that is not http(s):// or ws(s)://.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, request_timeout: float = 60.0,
                 connect_timeout: float = 10.0, reconnect_timeout: float = 30.0, heartbeat: float = 20.0,
                 encoding: Literal["msgpack", "json"] = "msgpack", call_timeout: float = 600.0) -> None:
        self.url = _gateway_url(url)
        key = api_key or os.environ.get("SANDGATE_API_KEY")
        if not key:
            raise Unauthorized("no API key: pass api_key=... or set SANDGATE_API_KEY")
        if encoding not in ("msgpack", "json"):
            raise ValueError("encoding must be 'msgpack' or 'json'")
        self._headers = {"Authorization": f"Bearer {key}"}
        self.request_timeout = request_timeout
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.heartbeat = heartbeat
        self.subprotocol = MSGPACK if encoding == "msgpack" else JSON
        self._session: aiohttp.ClientSession | None = None
        self._connections: weakref.WeakSet[Connection] = weakref.WeakSet()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP pool and every sandbox WebSocket made through it. Sandboxes stay as they
        are on the gateway."""
        for connection in list(self._connections):
            await connection.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- sandboxes ------------------------------------------------------------------------------

    async def create_sandbox(self, runtime: str | None = None, *, ttl: float | None = None,
                             idle_timeout: float | None = None, memory_mb: int | None = None,
                             cpu_seconds: float | None = None, disk_mb: int | None = None,
                             network: NetworkPolicy | None = None,
                             secrets: Sequence[Mapping[str, Any]] | None = None, template: str | None = None,
                             metadata: Mapping[str, str] | None = None, **options: Any) -> AsyncSandbox:
        """Create a sandbox (`POST /v1/sandboxes`); see `AsyncSandbox.create` for the arguments."""
        body: dict[str, Any] = {"runtime": runtime, "ttl": ttl, "idle_timeout": idle_timeout, "memory_mb": memory_mb,
                                "cpu_seconds": cpu_seconds, "disk_mb": disk_mb, "network": network,
                                "secrets": [dict(s) for s in secrets] if secrets is not None else None,
                                "template": template, "metadata": dict(metadata) if metadata is not None else None,
                                **options}
        data = await self._json("POST", "/v1/sandboxes", json={k: v for k, v in body.items() if v is not None})
        return AsyncSandbox(self, SandboxInfo.from_wire(data))

    async def get_sandbox(self, sandbox_id: str) -> AsyncSandbox:
        """Attach to an existing sandbox of this tenant.

        Raises:
            NotFound: no such sandbox (or another tenant's).
        """
        return AsyncSandbox(self, await self._info(sandbox_id))

    def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        """A handle on a sandbox by id without asking the gateway first (one request fewer);
        a missing sandbox shows as `NotFound` on first use. Its `info` holds only the id until
        `refresh()`."""
        return AsyncSandbox(self, SandboxInfo.from_wire({"id": sandbox_id}))

    async def list_sandboxes(self) -> list[SandboxInfo]:
        """This tenant's sandboxes."""
        data = await self._json("GET", "/v1/sandboxes")
        return [SandboxInfo.from_wire(s) for s in data.get("sandboxes", [])]

    async def runtimes(self) -> dict[str, Any]:
        """The runtimes this gateway offers (`GET /v1/runtimes`), and why any is unavailable."""
        return await self._json("GET", "/v1/runtimes")

    # -- ephemeral calls: a fresh sandbox for one call, destroyed after it -----------------------

    async def invoke(self, function: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                     code: str | None = None, code_ref: str | None = None, language: str | None = None,
                     timeout: float | None = None, files: Mapping[str, str | bytes] | None = None,
                     runtime: str | None = None, **create: Any) -> InvokeResult:
        """Call `function(*args, **kwargs)` of `code` in a fresh sandbox (`POST /v1/invoke`), taken
        from the warm pool and destroyed afterwards: nothing is left behind.

        Args:
            function: the function's name; args, kwargs: its arguments (JSON values). JavaScript
                gets `kwargs`, when given, as a last options object.
            code: the source that defines it, or code_ref: the sha256 of code the gateway cached
                (`cache_entries()`); language: `"python"` (default) or `"javascript"`.
            timeout: wall-clock seconds for the call. files: written before the call
                ({relative path: text or bytes}).
            runtime: the runtime (default: the gateway's); **create: other create options
                (`memory_mb`, `ttl`, ...), as `create_sandbox` takes them.

        Returns:
            The `InvokeResult`: an exception, a crash or a timeout is a result with a `status`.

        Raises:
            BadRequest: a bad field (checked before any sandbox is made). NotFound: an unknown code_ref.
            QuotaExceeded: the tenant's sandbox quota or create rate (`retry_after` says when to retry).
        """
        body = {**bodies.invoke_body(function, args, kwargs, code=code, code_ref=code_ref, language=language,
                                     timeout=timeout, files=files), **_options(runtime, create)}
        data = await self._json("POST", "/v1/invoke", json=body, timeout=self._deadline(timeout))
        return InvokeResult.from_wire(data)

    async def execute(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
                      code_ref: str | None = None, language: str | None = None, stdin: bytes | str | None = None,
                      env: Mapping[str, str] | None = None, cwd: str | None = None, timeout: float | None = None,
                      runtime: str | None = None, **create: Any) -> ExecResult:
        """Run a command or code to its end in a fresh sandbox (`POST /v1/execute`), destroyed afterwards.

        Takes the arguments of `AsyncSandbox.exec` (stdin as text: REST carries no bytes) and
        `invoke`'s `runtime` and create options.

        Returns:
            The `ExecResult` (a non-zero exit is a result).

        Raises:
            Timeout, GuestDied: it did not end on its own (the exception's `result` has the output).
            BadRequest, QuotaExceeded, Unsupported: as `invoke` and `AsyncSandbox.exec`.
        """
        body = {**bodies.exec_body(command, code=code, code_ref=code_ref, language=language, stdin=stdin, env=env,
                                   cwd=cwd, timeout=timeout, tag=None, namespace=None), **_options(runtime, create)}
        result = ExecResult.from_rest(await self._json("POST", "/v1/execute", json=body,
                                                       timeout=self._deadline(timeout)))
        if result.error is not None:
            result.error.result = result
            raise result.error
        return result

    # -- volumes --------------------------------------------------------------------------------

    async def create_volume(self, name: str, quota_mb: int | None = None, *,
                            runtime: str | None = None) -> VolumeInfo:
        """Create a named volume (`POST /v1/volumes`): a file system of `quota_mb` that outlives the
        sandboxes that mount it (`create_sandbox(volumes={"/data": {"name": name}})`).

        Args:
            name: 1-63 lowercase letters, digits, `.`, `_` or `-`.
            quota_mb: its size (default: the gateway's); writes past it fail with `DiskQuota`.
            runtime: the runtime whose sandboxes will mount it (default: the gateway's).

        Raises:
            BadRequest: a bad name or size. Exists: the name is taken. QuotaExceeded: too many volumes.
        """
        body = {"name": name, "quota_mb": quota_mb, "runtime": runtime}
        return VolumeInfo.from_wire(await self._json("POST", "/v1/volumes",
                                                     json={k: v for k, v in body.items() if v is not None}))

    async def list_volumes(self) -> list[VolumeInfo]:
        """This tenant's volumes, by name."""
        data = await self._json("GET", "/v1/volumes")
        return [VolumeInfo.from_wire(v) for v in data.get("volumes", []) if isinstance(v, dict)]

    async def get_volume(self, name: str) -> VolumeInfo:
        """One volume. Raises `NotFound`."""
        return VolumeInfo.from_wire(await self._json("GET", _volume_path(name)))

    async def delete_volume(self, name: str) -> None:
        """Delete a volume and its files. Raises `NotFound`; `Busy` while a sandbox mounts it."""
        await self._json("DELETE", _volume_path(name))

    async def write_volume_file(self, name: str, path: str, data: FileData) -> int:
        """Write a file into a volume no sandbox mounts (streamed, whole or not at all); the bytes
        written. Raises `Busy` while mounted, `DiskQuota` past its size."""
        body: Any = data.encode() if isinstance(data, str) else data
        if isinstance(body, bytes | bytearray | memoryview):
            body = io.BytesIO(body)
        url = self._url("v1", "volumes", quote(name, safe=""), "files", path.lstrip("/"))
        async with self._request("PUT", url, data=body, streaming=True) as resp:
            answer = await resp.json(content_type=None)
        return int(answer.get("bytes", 0)) if isinstance(answer, dict) else 0

    async def read_volume_file(self, name: str, path: str) -> bytes:
        """A file of a volume that no sandbox mounts read-write. Raises `NotFound`, `Busy`."""
        url = self._url("v1", "volumes", quote(name, safe=""), "files", path.lstrip("/"))
        async with self._request("GET", url, streaming=True) as resp:
            return await resp.read()

    # -- deployed functions -----------------------------------------------------------------------

    async def deploy_function(self, name: str, code: str | None = None, function: str | None = None, *,
                              code_ref: str | None = None, runtime: str | None = None, language: str | None = None,
                              timeout: float | None = None, memory_mb: int | None = None,
                              min_instances: int | None = None, max_instances: int | None = None,
                              idle_timeout: float | None = None,
                              env: Mapping[str, str] | None = None) -> FunctionInfo:
        """Create or replace a function (`PUT /v1/functions/{name}`).

        Args:
            name: 1-128 letters, digits, `_`, `.` or `-`.
            code: its source (or code_ref: the sha256 of cached code); function: the function to call
                (default: `name`, when `name` is an identifier).
            runtime, language: where and in what it runs (the gateway's default runtime, Python).
            timeout: seconds per call; memory_mb: each instance's memory.
            min_instances: instances kept warm (made now); max_instances: the most that run at once
                (more calls queue, then answer `QuotaExceeded`); idle_timeout: seconds an instance
                may idle before it is destroyed (down to `min_instances`). env: the calls' environment.

        Returns:
            The `FunctionInfo`; a redeploy that changes what instances run has a new `version`
            (old instances are drained).

        Raises:
            BadRequest: a bad name or field. QuotaExceeded: the tenant has as many functions as it may.
        """
        if function is None:
            if not name.isidentifier():
                raise ValueError(f"name the function to call (function=...): {name!r} is not a Python name")
            function = name
        body = bodies.deploy_body(code=code, code_ref=code_ref, function=function, runtime=runtime, language=language,
                                  timeout=timeout, memory_mb=memory_mb, min_instances=min_instances,
                                  max_instances=max_instances, idle_timeout=idle_timeout, env=env)
        return FunctionInfo.from_wire(await self._json("PUT", _function_path(name), json=body))

    async def list_functions(self) -> list[FunctionInfo]:
        """This tenant's deployed functions, by name."""
        data = await self._json("GET", "/v1/functions")
        return [FunctionInfo.from_wire(f) for f in data.get("functions", []) if isinstance(f, dict)]

    async def get_function(self, name: str) -> FunctionInfo:
        """One function, with its instances and queue.

        Raises:
            NotFound: no such function (or another tenant's).
        """
        return FunctionInfo.from_wire(await self._json("GET", _function_path(name)))

    async def delete_function(self, name: str) -> None:
        """Delete a function; its idle instances are destroyed before this returns, busy ones when
        their call ends, and queued calls fail with `NotFound`.

        Raises:
            NotFound: no such function.
        """
        await self._json("DELETE", _function_path(name))

    async def invoke_function(self, name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                              *, wait: float | None = None) -> InvokeResult:
        """Call a deployed function (`POST /v1/functions/{name}/invoke`) on a warm instance if one
        is idle, else on a new one, else after queueing for one.

        Args:
            args, kwargs: its arguments (JSON values).
            wait: seconds to wait for the answer (default: the client's `call_timeout`); the call's
                own limit is the function's `timeout`.

        Returns:
            The `InvokeResult`, with `cold` (the call loaded the function), `instance` and `version`.

        Raises:
            NotFound: no such function. QuotaExceeded: every instance is busy and the queue is full,
                or no instance came free in time: `retry_after` says when to try again.
        """
        body = {"args": list(args), "kwargs": dict(kwargs or {})}
        data = await self._json("POST", _function_path(name) + "/invoke", json=body,
                                timeout=wait if wait is not None else self.call_timeout)
        return InvokeResult.from_wire(data)

    # -- the code cache ---------------------------------------------------------------------------

    async def cache_entries(self) -> list[CacheEntry]:
        """The code this tenant's calls sent, content-addressed, most recently used first."""
        data = await self._json("GET", "/v1/cache")
        return [CacheEntry.from_wire(e) for e in data.get("entries", []) if isinstance(e, dict)]

    async def clear_cache(self) -> None:
        """Drop every cached code body of this tenant."""
        await self._json("DELETE", "/v1/cache")

    async def delete_cache_entry(self, code_hash: str) -> None:
        """Drop one cached code body.

        Raises:
            NotFound: no such entry.
        """
        await self._json("DELETE", f"/v1/cache/{quote(code_hash, safe='')}")

    def _deadline(self, timeout: float | None) -> float:
        return bodies.call_deadline(timeout, request_timeout=self.request_timeout, call_timeout=self.call_timeout)

    # -- HTTP -----------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp binds a session to its loop).
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    def _url(self, *segments: str) -> URL:
        path = "/".join(quote(s, safe="/") for s in segments)
        return URL(f"{self.url}/{path}", encoded=True)

    async def _json(self, method: str, path: str, *, json: Any = None, timeout: float | None = None) -> dict[str, Any]:
        async with self._request(method, URL(self.url + path, encoded=True), json=json, timeout=timeout) as resp:
            if resp.status == 204:
                return {}
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = None
            if not isinstance(data, dict):
                raise error_for_status(502, f"{method} {path}: the gateway answered something that is not JSON")
            return data

    @contextlib.asynccontextmanager
    async def _request(self, method: str, url: URL, *, streaming: bool = False, timeout: float | None = None,
                       **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """One HTTP request whose errors arrive as `SandgateError`s; yields the (2xx) response.

        It may take `timeout` seconds (default `request_timeout`); a call that runs code passes
        a longer one. A streaming transfer has no overall deadline, only one on each read."""
        what = f"{method} {url.path}"
        limit = self.request_timeout if timeout is None else timeout
        deadlines = aiohttp.ClientTimeout(total=None if streaming else limit, sock_connect=self.connect_timeout,
                                          sock_read=limit)
        try:
            async with self._http().request(method, url, timeout=deadlines, **kwargs) as resp:
                if resp.status >= 400:
                    raise await _error_from_response(resp, what)
                yield resp
        except aiohttp.ClientPayloadError as exc:
            raise ConnectionLost(f"{what}: the transfer broke off: {exc}") from None
        except aiohttp.ConnectionTimeoutError as exc:
            raise ConnectionLost(f"{what}: cannot reach the gateway at {self.url}: {exc}") from None
        except TimeoutError:
            raise Timeout(f"{what}: no answer within {limit:g} s") from None
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise ConnectionLost(f"{what}: the connection to {self.url} failed: {exc}") from None

    async def _info(self, sandbox_id: str) -> SandboxInfo:
        if not sandbox_id or not isinstance(sandbox_id, str):
            raise NotFound("a sandbox id is a non-empty string")
        return SandboxInfo.from_wire(await self._json("GET", f"/v1/sandboxes/{quote(sandbox_id, safe='')}"))

    def _connection(self, sandbox_id: str) -> Connection:
        ws_url = self._url("v1", "sandboxes", quote(sandbox_id, safe=""), "ws")
        ws_url = ws_url.with_scheme("wss" if ws_url.scheme == "https" else "ws")
        connection = Connection(self._http(), str(ws_url), self._headers, subprotocol=self.subprotocol,
                                request_timeout=self.request_timeout, connect_timeout=self.connect_timeout,
                                reconnect_timeout=self.reconnect_timeout, heartbeat=self.heartbeat)
        self._connections.add(connection)
        return connection


async def _error_from_response(resp: aiohttp.ClientResponse, what: str) -> SandgateError:
    retry_after = resp.headers.get("Retry-After")
    try:
        body = await resp.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = None
    wait = float(retry_after) if retry_after and retry_after.isdigit() else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return error_from_wire(body["error"], http_status=resp.status, retry_after=wait)
    return error_for_status(resp.status, f"{what}: HTTP {resp.status} {resp.reason}")


def _options(runtime: str | None, create: Mapping[str, Any]) -> dict[str, Any]:
    """An ephemeral call's create options, those given."""
    return {name: value for name, value in {"runtime": runtime, **create}.items() if value is not None}


def _function_path(name: str) -> str:
    if not name or not isinstance(name, str):
        raise NotFound("a function's name is a non-empty string")
    return f"/v1/functions/{quote(name, safe='')}"


def _volume_path(name: str) -> str:
    return f"/v1/volumes/{quote(name, safe='')}"


class _Creating:
    """What `AsyncSandbox.create()` returns: await it for the sandbox, or use it with `async with`
    to destroy the sandbox at the end of the block."""

    def __init__(self, coro: Awaitable[AsyncSandbox]) -> None:
        self._coro = coro
        self._sandbox: AsyncSandbox | None = None

    def __await__(self) -> Generator[Any, None, AsyncSandbox]:
        return self._coro.__await__()

    async def __aenter__(self) -> AsyncSandbox:
        self._sandbox = await self._coro
        return self._sandbox

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(exc_type, exc, tb)


async def _with_client(client: AsyncClient | None, url: str | None, api_key: str | None,
                       get: Callable[[AsyncClient], Awaitable[AsyncSandbox]]) -> AsyncSandbox:
    """`get(client)`, with a client of its own when none is given: the sandbox then owns (and
    closes) it, and a failure closes it at once."""
    owned = client is None
    api = client or AsyncClient(url, api_key)
    try:
        sandbox = await get(api)
    except BaseException:
        if owned:
            await api.close()
        raise
    sandbox._owns_client = owned
    return sandbox


class AsyncSandbox:
    """One sandbox on a gateway. Make one with `AsyncSandbox.create()` or `AsyncSandbox.connect()`.

    `async with` destroys the sandbox when the block ends; `close()` only lets go of it.
    """

    def __init__(self, client: AsyncClient, info: SandboxInfo, *, owns_client: bool = False) -> None:
        self.client = client
        self.info = info
        self.files = AsyncFiles(self)
        self.ports = AsyncPorts(self)
        self._owns_client = owns_client
        self._conn: Connection | None = None

    @property
    def id(self) -> str:
        return self.info.id

    def __repr__(self) -> str:
        return f"<AsyncSandbox {self.id} runtime={self.info.runtime}>"

    # -- making and finding ---------------------------------------------------------------------

    @classmethod
    def create(cls, runtime: str | None = None, *, url: str | None = None, api_key: str | None = None,
               client: AsyncClient | None = None, ttl: float | None = None, idle_timeout: float | None = None,
               memory_mb: int | None = None, cpu_seconds: float | None = None, disk_mb: int | None = None,
               network: NetworkPolicy | None = None, secrets: Sequence[Mapping[str, Any]] | None = None,
               template: str | None = None,
               metadata: Mapping[str, str] | None = None, **options: Any) -> _Creating:
        """Create a sandbox. `await` the result, or use it as `async with AsyncSandbox.create() as sb:`.

        Args:
            runtime: the runtime id (`"wasm"`, ...); default: the gateway's default runtime.
            url, api_key: the gateway and key (default: `$SANDGATE_URL`, `$SANDGATE_API_KEY`).
            client: an `AsyncClient` to share (then `url`/`api_key` are not used).
            ttl: absolute lifetime in seconds; idle_timeout: seconds without activity before reaping.
            memory_mb, cpu_seconds, disk_mb, template: limits and options, up to the gateway's maxima.
            network: `"none"` (the default), `"public"`, `"all"` (if the operator allows it) or
                `{"allow": [...], "deny": [...]}` (names, `*.domain`, addresses, CIDRs, `host:port`).
            secrets: `[{"env": "API_KEY", "value": "...", "hosts": ["api.example.com"]}]`: the
                sandbox sees a placeholder; the gateway fills in the value for those hosts only.
            metadata: string labels kept with the sandbox.
            **options: runtime-specific options, passed on as they are.

        Returns:
            An awaitable that is also an async context manager, giving the `AsyncSandbox`.

        Raises:
            BadRequest: an unknown runtime or a limit out of range.
            QuotaExceeded: the tenant's quota is used up (`retry_after` says when to retry).
            Unavailable: the gateway is draining or the runtime cannot create sandboxes now.
            Unauthorized: no or a wrong API key.
        """

        def make(api: AsyncClient) -> Awaitable[AsyncSandbox]:
            return api.create_sandbox(runtime, ttl=ttl, idle_timeout=idle_timeout, memory_mb=memory_mb,
                                      cpu_seconds=cpu_seconds, disk_mb=disk_mb, network=network, secrets=secrets,
                                      template=template, metadata=metadata, **options)

        return _Creating(_with_client(client, url, api_key, make))

    @classmethod
    async def connect(cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None,
                      client: AsyncClient | None = None) -> AsyncSandbox:
        """Attach to an existing sandbox (made by this or any other client of the same tenant).

        Raises:
            NotFound: no such sandbox for this key's tenant.
        """
        return await _with_client(client, url, api_key, lambda api: api.get_sandbox(sandbox_id))

    @classmethod
    async def list(cls, *, url: str | None = None, api_key: str | None = None) -> list[SandboxInfo]:
        """This tenant's sandboxes (a one-off; `AsyncClient.list_sandboxes()` reuses a client)."""
        async with AsyncClient(url, api_key) as api:
            return await api.list_sandboxes()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self.destroy()
        except (NotFound, ConnectionLost):
            pass  # already gone, or unreachable: the gateway's ttl and idle reaper remain
        finally:
            await self.close()

    # -- lifecycle ------------------------------------------------------------------------------

    async def refresh(self) -> SandboxInfo:
        """Fetch the sandbox's description again (state, running execs)."""
        self.info = await self.client._info(self.id)
        return self.info

    async def destroy(self) -> None:
        """Destroy the sandbox on the gateway: its processes and files are gone.

        Raises:
            NotFound: it was already destroyed (or reaped).
        """
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        await self.client._json("DELETE", f"/v1/sandboxes/{quote(self.id, safe='')}")

    async def close(self) -> None:
        """Let go of the sandbox without destroying it (close its WebSocket, and the client if this
        sandbox made its own)."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        if self._owns_client:
            await self.client.close()

    async def metrics(self) -> Metrics:
        """CPU, memory, disk and uptime, from the guest and from the host; network figures."""
        return Metrics.from_wire(await self.client._json("GET", f"/v1/sandboxes/{quote(self.id, safe='')}/metrics"))

    async def set_network(self, policy: NetworkPolicy) -> None:
        """Change the sandbox's network policy (`PATCH`): new connections follow it at once, and
        open ones it refuses are ended.

        Raises:
            BadRequest: a malformed policy. Forbidden: one the tenant may not have.
            Unsupported: a network for a sandbox created without one.
        """
        data = await self.client._json("PATCH", f"/v1/sandboxes/{quote(self.id, safe='')}", json={"network": policy})
        self.info = SandboxInfo.from_wire(data)

    async def network(self) -> dict[str, Any]:
        """The policy, the secrets (names and hosts only), the network figures and the recent
        refusals with their reasons (`GET /v1/sandboxes/{id}/network`)."""
        return dict(await self.client._json("GET", f"/v1/sandboxes/{quote(self.id, safe='')}/network"))

    @property
    def broken(self) -> bool:
        """True when this handle's WebSocket gave up for good (the sandbox is gone, the key refused)."""
        failed = self._conn.failed if self._conn is not None else None
        return failed is not None and not failed.retryable

    @property
    def connection(self) -> Connection:
        """The sandbox's WebSocket session (opened on first use, reconnected on drops)."""
        if self._conn is None:
            self._conn = self.client._connection(self.id)
        return self._conn

    # -- exec -----------------------------------------------------------------------------------

    async def exec(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
                   code_ref: str | None = None, language: str | None = None, stdin: bytes | str | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None, timeout: float | None = None,
                   tag: str | None = None, namespace: str | None = None,
                   pty: tuple[int, int] | None = None, max_output_bytes: int = DEFAULT_MAX_OUTPUT,
                   on_display: Callable[[Display], object] | None = None) -> ExecResult:
        """Run a command or code to its end and return what it did.

        Args:
            command: argv (`["ls", "-l"]`) or a shell string (`"ls | wc -l"`), on runtimes with processes.
            code: source to run instead of a command; language: `"python"` (default) or `"javascript"`.
            code_ref: instead of `code`, the sha256 of code the gateway cached for this tenant
                (`AsyncClient.cache_entries`); its language is the cached code's unless given.
            stdin: bytes (or text, sent as UTF-8) for its stdin, which is then closed.
            env, cwd: extra environment and working directory.
            timeout: wall-clock seconds, after which the sandbox stops it (default: no limit).
            tag: a label to find the exec by (`exec.attach`, `exec.list`).
            namespace: python only: `"default"` (persistent), `"fresh"`, or another persistent name.
            pty: `(rows, cols)` to run on a terminal (runtimes with `exec.pty`).
            max_output_bytes: output kept beyond this is dropped and `truncated` set.
            on_display: called with each `Display` (rich output of Python code: figures,
                DataFrames, `display()`) as it arrives; the result lists them too (`display`).

        Returns:
            The `ExecResult` (a non-zero exit is a result, not an error).

        Raises:
            Timeout: it ran past `timeout` (the exception's `result` has the output so far).
            GuestDied: the sandbox's guest stopped under it (`result` as above).
            Unsupported: the runtime cannot run this (no processes, no such language, no PTY).
            Busy: the sandbox runs one exec at a time and another is running.
            BadRequest: neither or both of `command` and `code`, or a bad field.
        """
        execution = await self.start(command, code=code, code_ref=code_ref, language=language, stdin=stdin,
                                     stdin_open=False,
                                     env=env, cwd=cwd, timeout=timeout, tag=tag, namespace=namespace, pty=pty,
                                     max_output_bytes=max_output_bytes)
        return await execution.wait(on_display=on_display)

    async def start(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
                    code_ref: str | None = None, language: str | None = None, stdin: bytes | str | None = None,
                    stdin_open: bool | None = None,
                    env: Mapping[str, str] | None = None, cwd: str | None = None, timeout: float | None = None,
                    tag: str | None = None, namespace: str | None = None, pty: tuple[int, int] | None = None,
                    max_output_bytes: int = DEFAULT_MAX_OUTPUT) -> AsyncExecution:
        """Start a command or code and return at once with a handle to stream, feed and signal it.

        Takes the arguments of `exec()`, plus `stdin_open` to keep stdin open for `send_stdin()`
        (default: open for a PTY exec, a terminal being for typing into; closed otherwise).

        Returns:
            An `AsyncExecution`: iterate it (`async for event in execution`) for its events, or
            `await execution.wait()` for its result.

        Raises:
            The errors `exec()` raises before an exec starts (`Unsupported`, `Busy`, `BadRequest`).
        """
        exec_id = "c" + secrets.token_hex(8)  # chosen here, so a reconnect can re-attach before `start` arrived
        fields: dict[str, Any] = {"exec_id": exec_id}
        if code is not None:
            fields.update(code=code, language=language or "python")
        if code_ref is not None:
            fields["code_ref"] = code_ref
            if language is not None:
                fields["language"] = language
        if command is not None:
            fields["command"] = command if isinstance(command, str) else list(command)
        optional = {"env": dict(env) if env is not None else None, "cwd": cwd, "timeout": timeout, "tag": tag,
                    "namespace": namespace}
        fields.update({k: v for k, v in optional.items() if v is not None})
        if stdin is not None:
            fields["stdin"] = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        if pty is not None:
            rows, cols = pty
            fields["pty"] = {"rows": rows, "cols": cols}
        if stdin_open or (stdin_open is None and pty is not None):
            fields["stdin_open"] = True
        stream = await self.connection.start_exec(fields)
        return AsyncExecution(self, stream, tag, max_output_bytes)

    async def attach(self, exec_id: str | None = None, *, tag: str | None = None,
                     max_output_bytes: int = DEFAULT_MAX_OUTPUT) -> AsyncExecution:
        """Follow an exec started elsewhere (another client, a REST call), from its first event.

        Raises:
            NotFound: no such exec (or it finished long ago).
        """
        if (exec_id is None) == (tag is None):
            raise ValueError("name the exec by exec_id or by tag")
        stream = await self.connection.attach_exec(exec_id, tag)
        return AsyncExecution(self, stream, tag, max_output_bytes)

    async def list_execs(self) -> builtins.list[dict[str, Any]]:
        """The sandbox's recent execs: `{exec_id, tag, pid, running, exit_code}` each."""
        result = await self.connection.request("exec.list")
        return [e for e in result.get("execs", []) if isinstance(e, dict)]

    # -- invoke and test mode ---------------------------------------------------------------------

    def _path(self, *tail: str) -> str:
        return "/".join(("/v1/sandboxes", quote(self.id, safe=""), *tail))

    async def invoke(self, function: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                     code: str | None = None, code_ref: str | None = None, language: str | None = None,
                     timeout: float | None = None, files: Mapping[str, str | bytes] | None = None) -> InvokeResult:
        """Call `function(*args, **kwargs)` of `code` in this sandbox (`POST .../invoke`). The code
        is loaded afresh for each call; files it writes stay in the sandbox.

        Args:
            function: the function's name; args, kwargs: its arguments (JSON values). JavaScript
                gets `kwargs`, when given, as a last options object.
            code: the source that defines it, or code_ref: the sha256 of code the gateway cached
                for this tenant; language: `"python"` (default) or `"javascript"`.
            timeout: wall-clock seconds for the call.
            files: written before the call, {relative path: text or bytes}.

        Returns:
            The `InvokeResult`: `status` success, error (with the exception's `type`), crash,
            timeout or terminated; the result, output, and the files the call changed.

        Raises:
            BadRequest: a bad field (a function name that is not a name, both or neither of code and
                code_ref). NotFound: the sandbox, or the code_ref, is unknown. Busy: the sandbox runs
                something else and does one thing at a time.
        """
        body = bodies.invoke_body(function, args, kwargs, code=code, code_ref=code_ref, language=language,
                                  timeout=timeout, files=files)
        data = await self.client._json("POST", self._path("invoke"), json=body, timeout=self.client._deadline(timeout))
        return InvokeResult.from_wire(data)

    async def run_tests(self, code: str | None, tests: str, *, code_ref: str | None = None,
                        language: str | None = None, timeout: float | None = None) -> TestReport:
        """Run `tests` against `code` in this sandbox (`POST .../test`).

        Python tests are pytest tests (`test_*` functions with plain `assert`; `code`'s names are in
        scope), run by real pytest in the sandbox. JavaScript tests call `test(name, fn)` and use
        the `assert` global (`is`, `equal`, `ok`, `not`, `throws`).

        Args:
            code: the code under test (None with `code_ref`); tests: the tests' source.
            language: `"python"` (default) or `"javascript"`; timeout: seconds for the whole run.

        Returns:
            The `TestReport` (`success`, `summary`, one `TestOutcome` per test). Failing tests are
            a result, not an exception.
        """
        body = bodies.tests_body(code, tests, code_ref=code_ref, language=language, timeout=timeout)
        data = await self.client._json("POST", self._path("test"), json=body, timeout=self.client._deadline(timeout))
        return TestReport.from_wire(data)

    # -- async executions ---------------------------------------------------------------------------

    async def start_execution(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
                              code_ref: str | None = None, language: str | None = None,
                              stdin: bytes | str | None = None, env: Mapping[str, str] | None = None,
                              cwd: str | None = None, timeout: float | None = None, tag: str | None = None,
                              namespace: str | None = None) -> ExecutionInfo:
        """Start a command or code in the background (`POST .../executions`) and return at once.

        It runs on whatever happens to this client: poll it with `get_execution`, follow its
        output with `follow_execution`, wait with `wait_execution`, stop it with `cancel_execution`
        (or attach over the WebSocket: it is an exec like any other). Arguments as `exec`, with
        `stdin` as text (REST carries no bytes).

        Returns:
            The `ExecutionInfo`, state `pending` or `running`; its `id` names it.
        """
        body = bodies.exec_body(command, code=code, code_ref=code_ref, language=language, stdin=stdin, env=env,
                                cwd=cwd, timeout=timeout, tag=tag, namespace=namespace)
        return ExecutionInfo.from_wire(await self.client._json("POST", self._path("executions"), json=body))

    async def get_execution(self, execution_id: str, *, wait: bool = False, timeout: float | None = None,
                            output_offset: int = 0) -> ExecutionInfo:
        """An execution's state and its output from `output_offset` on.

        Args:
            wait: wait until it ends, for at most `timeout` seconds (the gateway's default is 30
                and its cap 300), and answer then (ended or not).
            output_offset: the `output_offset` of the previous reply, to get only what came since.

        Raises:
            NotFound: no such execution (or it ended long ago and was forgotten).
        """
        query = {"output_offset": str(output_offset)}
        if wait:
            query["wait"] = "true"
            if timeout is not None:
                query["timeout"] = f"{timeout:g}"
        path = self._path("executions", quote(execution_id, safe="")) + "?" + urlencode(query)
        limit = self.client.request_timeout + (timeout if wait and timeout is not None else 30.0 if wait else 0.0)
        return ExecutionInfo.from_wire(await self.client._json("GET", path, timeout=limit))

    async def cancel_execution(self, execution_id: str) -> ExecutionInfo:
        """Stop a running execution (SIGKILL); its state becomes `cancelled`. An execution that has
        already ended is left as it is. Returns its state (without output)."""
        path = self._path("executions", quote(execution_id, safe=""))
        return ExecutionInfo.from_wire(await self.client._json("DELETE", path))

    async def list_executions(self, *, state: str | None = None, limit: int | None = None,
                              ) -> builtins.list[ExecutionInfo]:
        """The sandbox's executions, newest first (without output): every exec, however started.

        Args:
            state: only those in this state (`running`, `completed`, ...); limit: at most this many (1..1000).
        """
        query = {k: str(v) for k, v in (("state", state), ("limit", limit)) if v is not None}
        path = self._path("executions") + ("?" + urlencode(query) if query else "")
        data = await self.client._json("GET", path)
        return [ExecutionInfo.from_wire(e) for e in data.get("executions", []) if isinstance(e, dict)]

    async def follow_execution(self, execution_id: str, *, interval: float = 1.0,
                               output_offset: int = 0) -> AsyncGenerator[ExecutionInfo, None]:
        """Follow an execution's output: each item is one poll (the gateway holds it up to
        `interval` seconds, less when the execution ends) with the output that arrived since the
        previous item; the last item is the finished execution.

        Nothing is lost or repeated between items (they continue from each other's
        `output_offset`); output the replay buffer dropped meanwhile shows as `output_lost`.
        """
        while True:
            info = await self.get_execution(execution_id, wait=True, timeout=interval, output_offset=output_offset)
            if info.output_offset is not None:
                output_offset = info.output_offset
            yield info
            if info.finished:
                return

    async def wait_execution(self, execution_id: str, *, timeout: float | None = None,
                             interval: float = 20.0) -> ExecutionInfo:
        """Wait for an execution to end and return it with all of its output.

        Args:
            timeout: give up after this many seconds (default: wait as long as it runs).
            interval: seconds each poll may be held by the gateway (at most its cap, 300 by default).

        Raises:
            Timeout: it was still running after `timeout` seconds (it runs on).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        out: dict[str, builtins.list[str]] = {"stdout": [], "stderr": [], "pty": []}
        offset = 0
        lost: tuple[int, int] | None = None
        while True:
            hold = interval if deadline is None else max(0.0, min(interval, deadline - loop.time()))
            info = await self.get_execution(execution_id, wait=True, timeout=hold, output_offset=offset)
            for name, parts in out.items():
                parts.append(getattr(info, name))
            if info.output_lost is not None:
                lost = info.output_lost if lost is None else (lost[0], info.output_lost[1])
            if info.output_offset is not None:
                offset = info.output_offset
            if info.finished:
                return dataclasses.replace(info, stdout="".join(out["stdout"]), stderr="".join(out["stderr"]),
                                           pty="".join(out["pty"]), output_lost=lost)
            if deadline is not None and loop.time() >= deadline:
                raise Timeout(f"execution {execution_id} is still {info.state} after {timeout:g} s")


class AsyncExecution:
    """A running exec: an async iterator of its events (`Started`, `Output`…, `Exited`, and
    `OutputLost` if a reconnect came too late), plus stdin, signals and terminal size.

    Iterate it once, from one task. Events are buffered until taken, so an exec nobody reads
    keeps its output in memory until the handle is dropped or `wait()` is called."""

    def __init__(self, sandbox: AsyncSandbox, stream: ExecStream, tag: str | None, max_output_bytes: int) -> None:
        self.sandbox = sandbox
        self.exec_id = stream.exec_id
        self.tag = tag
        self._stream = stream
        self._conn = sandbox.connection
        self._builder = ResultBuilder(stream.exec_id, max_output_bytes)
        self._finished = False
        started = stream.started.result() if stream.started.done() and not stream.started.exception() else None
        self.pid = started.pid if started else None

    def __repr__(self) -> str:
        return f"<AsyncExecution {self.exec_id} {'finished' if self._finished else 'running'}>"

    def __aiter__(self) -> AsyncExecution:
        return self

    async def __anext__(self) -> ExecEvent:
        if self._finished:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, WatchEvent):  # never on an exec's stream: ExecStream.feed refuses it
            item = GuestProtocol("a change event on an exec's stream")
        if isinstance(item, SandgateError):
            self._finished = True
            item.result = self._builder.build()
            raise item
        self._builder.add(item)
        if isinstance(item, Started):
            self.pid = item.pid
        if isinstance(item, Exited):
            self._finished = True
        return item

    @property
    def finished(self) -> bool:
        """True once the `Exited` event (or an error) was taken."""
        return self._finished

    async def wait(self, *, on_display: Callable[[Display], object] | None = None) -> ExecResult:
        """Take the remaining events and return the result; `on_display` is called with each
        `Display` taken meanwhile.

        Raises:
            Timeout, GuestDied: the exec did not end on its own (the exception's `result` has its output).
            ConnectionLost, NotFound: the connection could not be resumed, or the sandbox is gone.
        """
        try:
            async for event in self:
                if on_display is not None and isinstance(event, Display):
                    on_display(event)
        except asyncio.CancelledError:
            self._conn.forget(self._stream)  # the exec runs on; this client stops following it
            raise
        result = self._builder.build()
        if result.error is not None:
            result.error.result = result
            raise result.error
        return result

    async def send_stdin(self, data: bytes | str) -> None:
        """Write to the exec's stdin (start it with `stdin_open=True`); text is sent as UTF-8."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        await self._control("exec.input", data=payload)

    async def close_stdin(self) -> None:
        """Close the exec's stdin (the program sees end of file)."""
        await self._control("exec.close_stdin")

    async def signal(self, signal: str | int) -> None:
        """Send a signal (`"SIGINT"`, `"SIGTERM"`, `9`, ...). Runtimes without signals can only stop
        an exec (SIGKILL/SIGTERM/SIGINT), by restarting their agent: it then ends with `GuestDied`."""
        await self._control("exec.signal", signal=signal)

    async def kill(self) -> None:
        """Stop the exec with SIGKILL."""
        await self.signal("SIGKILL")

    async def resize(self, rows: int, cols: int) -> None:
        """Change the terminal size of a PTY exec."""
        await self._control("exec.resize", rows=rows, cols=cols)

    async def _control(self, op: str, **fields: Any) -> None:
        await self._conn.request(op, {"exec_id": self.exec_id, **fields})


class AsyncWatch:
    """A directory's changes, as `WatchEvent`s (`AsyncFiles.watch`): an async iterator, and an async
    context manager that stops the watch on exit.

    The watch starts on first use (`start()`, entering it, or the first iteration). It follows the
    sandbox across WebSocket reconnects (re-attached from the first change not yet delivered, as an
    exec is); changes the gateway could no longer replay arrive as one `overflow` change. Iteration
    ends after `stop()`; it raises when the watch ends otherwise: `NotFound` when the watched
    directory went away, `GuestDied` or `NotFound` when the sandbox did."""

    def __init__(self, sandbox: AsyncSandbox, path: str, recursive: bool, poll_interval: float | None,
                 tag: str | None) -> None:
        self.sandbox = sandbox
        self.path = path
        self.recursive = recursive
        self.tag = tag
        self.watch_id = "cw" + secrets.token_hex(8)  # chosen here, so a reconnect can re-attach it
        self._poll_interval = poll_interval
        self._stream: ExecStream | None = None
        self._finished = False

    def __repr__(self) -> str:
        return f"<AsyncWatch {self.watch_id} {self.path!r}{' recursive' if self.recursive else ''}>"

    @property
    def backend(self) -> str | None:
        """How the guest watches: `inotify`, or `poll` (None before the start)."""
        backend = self._stream.start_message.get("backend") if self._stream is not None else None
        return backend if isinstance(backend, str) else None

    async def start(self) -> AsyncWatch:
        """Start watching (once); returns when the guest watches.

        Raises:
            NotFound, NotADirectory, PathEscape, BadRequest (a tree past the guest's bound), Busy
            (too many watches), Unsupported: the sandbox's refusal.
        """
        if self._stream is None:
            fields: dict[str, Any] = {"path": self.path, "recursive": self.recursive, "watch_id": self.watch_id}
            if self._poll_interval is not None:
                fields["poll_interval"] = self._poll_interval
            if self.tag is not None:
                fields["tag"] = self.tag
            self._stream = await self.sandbox.connection.start_exec(fields, op="fs.watch")
        return self

    async def stop(self) -> None:
        """Stop the watch; iteration then ends after the changes that came before."""
        if self._stream is None or self._stream.done:
            return
        await self.sandbox.connection.request("fs.unwatch", {"watch_id": self.watch_id})

    async def __aenter__(self) -> AsyncWatch:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        stream = self._stream
        if stream is None:
            return
        try:
            await self.stop()
        except SandgateError:
            pass  # the sandbox or the connection is gone: so is the watch
        self.sandbox.connection.forget(stream)

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        await self.start()
        assert self._stream is not None
        while not self._finished:
            item = await self._stream.queue.get()
            if isinstance(item, SandgateError):
                self._finished = True
                raise item
            if isinstance(item, WatchEvent):
                return item
            if isinstance(item, OutputLost):
                return WatchEvent("overflow", "", True, None, item.last_seq)
            if isinstance(item, Exited):
                self._finished = True
                if item.error is not None:
                    raise item.error
        raise StopAsyncIteration


class AsyncPorts:
    """The sandbox's published ports: its TCP servers (a dev server, a notebook, an API) served by the
    gateway at `/v1/sandboxes/{id}/ports/{port}/`, for HTTP and WebSockets (microVM and pod; a WASM
    sandbox has no sockets and raises `Unsupported`). A port may also be published at create:
    `AsyncSandbox.create(..., ports=[8000])`."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    def _path(self, *more: str) -> str:
        return "/".join([f"/v1/sandboxes/{quote(self._sandbox.id, safe='')}/ports", *more])

    async def publish(self, port: int) -> PortInfo:
        """Publish `port` (again: the same URL and token).

        Returns:
            The port, with its URL and token (`preview_url` for a browser).

        Raises:
            Unsupported: the sandbox's runtime cannot publish ports. BadRequest: no port number.
            QuotaExceeded: the sandbox has as many published ports as it may.
        """
        answer = await self._sandbox.client._json("POST", self._path(), json={"port": port})
        return PortInfo.from_wire(answer, self._sandbox.client.url)

    async def list(self) -> builtins.list[PortInfo]:
        """The published ports, with their tokens."""
        answer = await self._sandbox.client._json("GET", self._path())
        ports = answer.get("ports")
        return [PortInfo.from_wire(p, self._sandbox.client.url) for p in ports or () if isinstance(p, dict)]

    async def unpublish(self, port: int) -> None:
        """Unpublish `port`: its token stops working and its open connections are cut.

        Raises:
            NotFound: the port is not published.
        """
        await self._sandbox.client._json("DELETE", self._path(str(int(port))))


class AsyncFiles:
    """The sandbox's files. Every op takes a path relative to the sandbox's working folder (/work),
    or an absolute one: anywhere in its file system on a microVM or pod, under /work or a mounted
    volume on WASM."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    def _file_url(self, path: str) -> URL:
        url = self._sandbox.client._url("v1", "sandboxes", quote(self._sandbox.id, safe=""), "files")
        return url.with_query(path=path)

    async def write(self, path: str, data: FileData) -> int:
        """Write a file (created with its parent directories, or replaced), streamed: `data` may be
        bytes, text (written as UTF-8), an async iterable of bytes, or a binary file object.
        The file appears whole or not at all.

        Returns:
            The number of bytes written.

        Raises:
            DiskQuota: the sandbox's disk quota is used up. PathEscape: the path leaves the root.
            Busy: an exec is running on a runtime that does one thing at a time.
        """
        body: Any = data.encode() if isinstance(data, str) else data
        if isinstance(body, bytes | bytearray | memoryview):
            body = io.BytesIO(body)  # sent in chunks, not as one write that holds up the event loop
        async with self._sandbox.client._request("PUT", self._file_url(path), data=body, streaming=True) as resp:
            answer = await resp.json(content_type=None)
        return int(answer.get("bytes", 0)) if isinstance(answer, dict) else 0

    async def upload(self, local_path: str | os.PathLike[str], path: str) -> int:
        """Copy a local file into the sandbox, streamed. Returns the number of bytes written."""
        f = await asyncio.to_thread(Path(local_path).open, "rb")
        try:
            return await self.write(path, f)  # aiohttp reads file objects off the event loop
        finally:
            f.close()

    async def stream(self, path: str, *, chunk_size: int = _CHUNK) -> AsyncGenerator[bytes, None]:
        """Read a file as it arrives, in chunks (for files too large to hold in memory).

        Raises:
            NotFound: no such file. IsADirectory: the path is a directory.
            ConnectionLost: the transfer broke off (never a silently short file).
        """
        async with self._sandbox.client._request("GET", self._file_url(path), streaming=True) as resp:
            async for chunk in resp.content.iter_chunked(chunk_size):
                yield chunk

    async def read(self, path: str) -> bytes:
        """A whole file's bytes (see `stream` for large ones)."""
        return b"".join([chunk async for chunk in self.stream(path)])

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """A whole file, decoded."""
        return (await self.read(path)).decode(encoding)

    async def download(self, path: str, local_path: str | os.PathLike[str]) -> int:
        """Copy a file out of the sandbox into a local file, streamed. Returns its size."""
        size = 0
        f = await asyncio.to_thread(Path(local_path).open, "wb")
        try:
            async for chunk in self.stream(path):
                await asyncio.to_thread(f.write, chunk)  # a slow disk must not stall the event loop
                size += len(chunk)
        finally:
            f.close()
        return size

    async def stat(self, path: str) -> FileInfo:
        """A file's or directory's type, size, mtime and mode.

        Raises:
            NotFound: no such path.
        """
        return FileInfo.from_wire(await self._sandbox.connection.request("fs.stat", {"path": path}))

    async def exists(self, path: str) -> bool:
        """Whether the path exists."""
        try:
            await self.stat(path)
        except NotFound:
            return False
        return True

    async def list(self, path: str = ".", *, depth: int = 1) -> list[FileInfo]:
        """A directory's entries, `depth` levels down (1..16); their paths are relative to `path`."""
        result = await self._sandbox.connection.request("fs.list", {"path": path, "depth": depth})
        return [FileInfo.from_wire(e) for e in result.get("entries", []) if isinstance(e, dict)]

    async def mkdir(self, path: str, *, parents: bool = True) -> None:
        """Make a directory (and its parents unless `parents=False`)."""
        await self._sandbox.connection.request("fs.mkdir", {"path": path, "parents": parents})

    async def move(self, src: str, dst: str) -> None:
        """Move or rename a file or directory."""
        await self._sandbox.connection.request("fs.move", {"src": src, "dst": dst})

    def watch(self, path: str = ".", *, recursive: bool = False, poll_interval: float | None = None,
              tag: str | None = None) -> AsyncWatch:
        """Watch a directory for changes (fs.watch): `async with sandbox.files.watch("src",
        recursive=True) as changes: async for change in changes: ...`.

        Args:
            path: the directory (relative to the sandbox's root, or absolute).
            recursive: the directories below it too.
            poll_interval: seconds between two looks where the guest polls (WASM; see
                `AsyncWatch.backend`); the gateway's default (0.5) when None.
            tag: a label to find the watch by (fs.unwatch, exec.attach).
        """
        return AsyncWatch(self._sandbox, path, recursive, poll_interval, tag)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a directory (which must be empty unless `recursive=True`)."""
        await self._sandbox.connection.request("fs.remove", {"path": path, "recursive": recursive})
