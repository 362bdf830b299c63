"""The synchronous SDK: `Sandbox`, `Client`, `Files` and `Execution`, for code without asyncio.

Each call runs the async SDK's coroutine on one event loop that lives in a background thread (one
per process, started on first use) and waits for its result. So there is one implementation of the
protocol, reconnect included, and the sync API works where an event loop already runs in the
calling thread (Jupyter), where `asyncio.run()` would refuse. Arguments and errors are those of the
async methods of the same name (`AsyncSandbox.exec` and so on).
"""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, TypeVar

from gateway.client.aio import (
    DEFAULT_MAX_OUTPUT,
    AsyncClient,
    AsyncExecution,
    AsyncFiles,
    AsyncPorts,
    AsyncSandbox,
    AsyncWatch,
)
from gateway.client.errors import ConnectionLost, NotFound
from gateway.client.models import (
    CacheEntry,
    Display,
    ExecEvent,
    ExecResult,
    ExecutionInfo,
    FileInfo,
    FunctionInfo,
    InvokeResult,
    Metrics,
    NetworkPolicy,
    PortInfo,
    SandboxInfo,
    TestReport,
    VolumeInfo,
    WatchEvent,
)

T = TypeVar("T")
SyncFileData = bytes | bytearray | memoryview | str | IO[bytes]


class _LoopThread:
    """An event loop running forever in a daemon thread; `run()` hands it coroutines."""

    _lock = threading.Lock()
    _instance: _LoopThread | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sandgate-sdk", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _LoopThread:
        with cls._lock:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = _LoopThread()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("the sync sandgate API was called from its own event loop; use the async API there")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller stops the work in the loop too
            raise


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return _LoopThread.get().run(coro)


_END = object()


def _iterate(iterator: AsyncIterator[T]) -> Iterator[T]:
    async def step() -> Any:
        try:
            return await iterator.__anext__()
        except StopAsyncIteration:
            return _END

    while True:
        item = _run(step())
        if item is _END:
            return
        yield item


class Client:
    """Sync form of `AsyncClient`: one gateway, one API key, a shared HTTP pool.

    Args:
        url, api_key: the gateway and key (default: `$SANDGATE_URL`, `$SANDGATE_API_KEY`).
        **options: `request_timeout`, `connect_timeout`, `reconnect_timeout`, `heartbeat`, `encoding`.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        self._async = AsyncClient(url, api_key, **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP pool; sandboxes stay as they are."""
        _run(self._async.close())

    def create_sandbox(self, runtime: str | None = None, **limits: Any) -> Sandbox:
        """Create a sandbox; the arguments are those of `Sandbox.create`."""
        return Sandbox(_run(self._async.create_sandbox(runtime, **limits)))

    def get_sandbox(self, sandbox_id: str) -> Sandbox:
        """Attach to an existing sandbox. Raises `NotFound` for an unknown id."""
        return Sandbox(_run(self._async.get_sandbox(sandbox_id)))

    def list_sandboxes(self) -> list[SandboxInfo]:
        """This tenant's sandboxes."""
        return _run(self._async.list_sandboxes())

    def runtimes(self) -> dict[str, Any]:
        """The runtimes this gateway offers."""
        return _run(self._async.runtimes())

    # -- ephemeral calls, deployed functions, the code cache (as `AsyncClient`) ----------------------

    def invoke(self, function: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
               code: str | None = None, code_ref: str | None = None, language: str | None = None,
               timeout: float | None = None, files: Mapping[str, str | bytes] | None = None,
               runtime: str | None = None, **create: Any) -> InvokeResult:
        """Call a function of `code` in a fresh sandbox, destroyed afterwards (as `AsyncClient.invoke`)."""
        return _run(self._async.invoke(function, args, kwargs, code=code, code_ref=code_ref, language=language,
                                       timeout=timeout, files=files, runtime=runtime, **create))

    def execute(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
                code_ref: str | None = None, language: str | None = None, stdin: bytes | str | None = None,
                env: Mapping[str, str] | None = None, cwd: str | None = None, timeout: float | None = None,
                runtime: str | None = None, **create: Any) -> ExecResult:
        """Run a command or code in a fresh sandbox, destroyed afterwards (as `AsyncClient.execute`)."""
        return _run(self._async.execute(command, code=code, code_ref=code_ref, language=language, stdin=stdin,
                                        env=env, cwd=cwd, timeout=timeout, runtime=runtime, **create))

    def deploy_function(self, name: str, code: str | None = None, function: str | None = None, *,
                        code_ref: str | None = None, runtime: str | None = None, language: str | None = None,
                        timeout: float | None = None, memory_mb: int | None = None, min_instances: int | None = None,
                        max_instances: int | None = None, idle_timeout: float | None = None,
                        env: Mapping[str, str] | None = None) -> FunctionInfo:
        """Create or replace a function (as `AsyncClient.deploy_function`)."""
        return _run(self._async.deploy_function(
            name, code, function, code_ref=code_ref, runtime=runtime, language=language, timeout=timeout,
            memory_mb=memory_mb, min_instances=min_instances, max_instances=max_instances,
            idle_timeout=idle_timeout, env=env))

    def create_volume(self, name: str, quota_mb: int | None = None, *, runtime: str | None = None) -> VolumeInfo:
        """Create a named volume (as `AsyncClient.create_volume`)."""
        return _run(self._async.create_volume(name, quota_mb, runtime=runtime))

    def list_volumes(self) -> list[VolumeInfo]:
        """This tenant's volumes."""
        return _run(self._async.list_volumes())

    def get_volume(self, name: str) -> VolumeInfo:
        """One volume. Raises `NotFound`."""
        return _run(self._async.get_volume(name))

    def delete_volume(self, name: str) -> None:
        """Delete a volume. Raises `NotFound`, `Busy` while mounted."""
        _run(self._async.delete_volume(name))

    def write_volume_file(self, name: str, path: str, data: bytes | str) -> int:
        """Write a file into an unmounted volume (as `AsyncClient.write_volume_file`)."""
        return _run(self._async.write_volume_file(name, path, data))

    def read_volume_file(self, name: str, path: str) -> bytes:
        """A file of a volume no sandbox mounts read-write."""
        return _run(self._async.read_volume_file(name, path))

    def list_functions(self) -> list[FunctionInfo]:
        """This tenant's deployed functions."""
        return _run(self._async.list_functions())

    def get_function(self, name: str) -> FunctionInfo:
        """One function. Raises `NotFound`."""
        return _run(self._async.get_function(name))

    def delete_function(self, name: str) -> None:
        """Delete a function. Raises `NotFound`."""
        _run(self._async.delete_function(name))

    def invoke_function(self, name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
                        wait: float | None = None) -> InvokeResult:
        """Call a deployed function (as `AsyncClient.invoke_function`)."""
        return _run(self._async.invoke_function(name, args, kwargs, wait=wait))

    def cache_entries(self) -> list[CacheEntry]:
        """The tenant's cached code, most recently used first."""
        return _run(self._async.cache_entries())

    def clear_cache(self) -> None:
        """Drop all of the tenant's cached code."""
        _run(self._async.clear_cache())

    def delete_cache_entry(self, code_hash: str) -> None:
        """Drop one cached code body. Raises `NotFound`."""
        _run(self._async.delete_cache_entry(code_hash))


class Sandbox:
    """Sync form of `AsyncSandbox`. `with Sandbox.create() as sb:` destroys it at the end."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._async = inner
        self.files = Files(inner.files)
        self.ports = Ports(inner.ports)

    @property
    def id(self) -> str:
        return self._async.id

    @property
    def info(self) -> SandboxInfo:
        """The description from creation or the last `refresh()`."""
        return self._async.info

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} runtime={self.info.runtime}>"

    @classmethod
    def create(cls, runtime: str | None = None, *, url: str | None = None, api_key: str | None = None,
               client: Client | None = None, ttl: float | None = None, idle_timeout: float | None = None,
               memory_mb: int | None = None, cpu_seconds: float | None = None, disk_mb: int | None = None,
               network: NetworkPolicy | None = None, secrets: Sequence[Mapping[str, Any]] | None = None,
               template: str | None = None,
               metadata: Mapping[str, str] | None = None, **options: Any) -> Sandbox:
        """Create a sandbox (arguments as `AsyncSandbox.create`).

        Returns:
            The `Sandbox`; `with Sandbox.create(...) as sb:` destroys it when the block ends.

        Raises:
            BadRequest, QuotaExceeded, Unavailable, Unauthorized: as `AsyncSandbox.create`.
        """

        async def make() -> AsyncSandbox:
            return await AsyncSandbox.create(
                runtime, url=url, api_key=api_key, client=client._async if client else None, ttl=ttl,
                idle_timeout=idle_timeout, memory_mb=memory_mb, cpu_seconds=cpu_seconds, disk_mb=disk_mb,
                network=network, secrets=secrets, template=template, metadata=metadata, **options)

        return cls(_run(make()))

    @classmethod
    def connect(cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None,
                client: Client | None = None) -> Sandbox:
        """Attach to an existing sandbox. Raises `NotFound` for an unknown id."""
        return cls(_run(AsyncSandbox.connect(sandbox_id, url=url, api_key=api_key,
                                             client=client._async if client else None)))

    @classmethod
    def list(cls, *, url: str | None = None, api_key: str | None = None) -> list[SandboxInfo]:
        """This tenant's sandboxes."""
        return _run(AsyncSandbox.list(url=url, api_key=api_key))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.destroy()
        except (NotFound, ConnectionLost):
            pass  # already gone, or unreachable: the gateway's ttl and idle reaper remain
        finally:
            self.close()

    def refresh(self) -> SandboxInfo:
        """Fetch the sandbox's description again."""
        return _run(self._async.refresh())

    def destroy(self) -> None:
        """Destroy the sandbox. Raises `NotFound` if it is already gone."""
        _run(self._async.destroy())

    def close(self) -> None:
        """Let go of the sandbox without destroying it."""
        _run(self._async.close())

    def metrics(self) -> Metrics:
        """CPU, memory, disk and uptime, from the guest and from the host; network figures."""
        return _run(self._async.metrics())

    def set_network(self, policy: NetworkPolicy) -> None:
        """Change the sandbox's network policy (as `AsyncSandbox.set_network`)."""
        _run(self._async.set_network(policy))

    def network(self) -> dict[str, Any]:
        """The policy, secrets (names and hosts), network figures and recent refusals."""
        return _run(self._async.network())

    def exec(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
             code_ref: str | None = None, language: str | None = None, stdin: bytes | str | None = None,
             env: Mapping[str, str] | None = None, cwd: str | None = None, timeout: float | None = None,
             tag: str | None = None, namespace: str | None = None, pty: tuple[int, int] | None = None,
             max_output_bytes: int = DEFAULT_MAX_OUTPUT,
             on_display: Callable[[Display], object] | None = None) -> ExecResult:
        """Run a command or code to its end (arguments, result and errors as `AsyncSandbox.exec`;
        `on_display` is called on the client's event-loop thread)."""
        return _run(self._async.exec(command, code=code, code_ref=code_ref, language=language, stdin=stdin, env=env,
                                     cwd=cwd, timeout=timeout, tag=tag, namespace=namespace, pty=pty,
                                     max_output_bytes=max_output_bytes, on_display=on_display))

    def start(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
              code_ref: str | None = None, language: str | None = None, stdin: bytes | str | None = None,
              stdin_open: bool | None = None, env: Mapping[str, str] | None = None, cwd: str | None = None,
              timeout: float | None = None, tag: str | None = None, namespace: str | None = None,
              pty: tuple[int, int] | None = None, max_output_bytes: int = DEFAULT_MAX_OUTPUT) -> Execution:
        """Start a command or code and return a handle to iterate, feed and signal it (as `AsyncSandbox.start`)."""
        return Execution(_run(self._async.start(command, code=code, code_ref=code_ref, language=language,
                                                stdin=stdin, stdin_open=stdin_open, env=env, cwd=cwd, timeout=timeout,
                                                tag=tag, namespace=namespace, pty=pty,
                                                max_output_bytes=max_output_bytes)))

    def attach(self, exec_id: str | None = None, *, tag: str | None = None) -> Execution:
        """Follow an exec started elsewhere, from its first buffered event."""
        return Execution(_run(self._async.attach(exec_id, tag=tag)))

    def list_execs(self) -> builtins.list[dict[str, Any]]:
        """The sandbox's recent execs."""
        return _run(self._async.list_execs())

    # -- invoke, test mode, async executions (as `AsyncSandbox`) ---------------------------------------

    def invoke(self, function: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
               code: str | None = None, code_ref: str | None = None, language: str | None = None,
               timeout: float | None = None, files: Mapping[str, str | bytes] | None = None) -> InvokeResult:
        """Call a function of `code` in this sandbox (as `AsyncSandbox.invoke`)."""
        return _run(self._async.invoke(function, args, kwargs, code=code, code_ref=code_ref, language=language,
                                       timeout=timeout, files=files))

    def run_tests(self, code: str | None, tests: str, *, code_ref: str | None = None, language: str | None = None,
                  timeout: float | None = None) -> TestReport:
        """Run tests against code in this sandbox (as `AsyncSandbox.run_tests`)."""
        return _run(self._async.run_tests(code, tests, code_ref=code_ref, language=language, timeout=timeout))

    def start_execution(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
                        code_ref: str | None = None, language: str | None = None, stdin: bytes | str | None = None,
                        env: Mapping[str, str] | None = None, cwd: str | None = None, timeout: float | None = None,
                        tag: str | None = None, namespace: str | None = None) -> ExecutionInfo:
        """Start a command or code in the background (as `AsyncSandbox.start_execution`)."""
        return _run(self._async.start_execution(command, code=code, code_ref=code_ref, language=language,
                                                stdin=stdin, env=env, cwd=cwd, timeout=timeout, tag=tag,
                                                namespace=namespace))

    def get_execution(self, execution_id: str, *, wait: bool = False, timeout: float | None = None,
                      output_offset: int = 0) -> ExecutionInfo:
        """An execution's state and output from `output_offset` on (as `AsyncSandbox.get_execution`)."""
        return _run(self._async.get_execution(execution_id, wait=wait, timeout=timeout, output_offset=output_offset))

    def cancel_execution(self, execution_id: str) -> ExecutionInfo:
        """Stop a running execution (as `AsyncSandbox.cancel_execution`)."""
        return _run(self._async.cancel_execution(execution_id))

    def list_executions(self, *, state: str | None = None, limit: int | None = None) -> builtins.list[ExecutionInfo]:
        """The sandbox's executions, newest first (as `AsyncSandbox.list_executions`)."""
        return _run(self._async.list_executions(state=state, limit=limit))

    def follow_execution(self, execution_id: str, *, interval: float = 1.0,
                         output_offset: int = 0) -> Iterator[ExecutionInfo]:
        """Each poll's new output, until the execution ends (as `AsyncSandbox.follow_execution`)."""
        polls = self._async.follow_execution(execution_id, interval=interval, output_offset=output_offset)
        try:
            yield from _iterate(polls)
        finally:
            _run(polls.aclose())

    def wait_execution(self, execution_id: str, *, timeout: float | None = None,
                       interval: float = 20.0) -> ExecutionInfo:
        """Wait for an execution to end; it with all its output (as `AsyncSandbox.wait_execution`)."""
        return _run(self._async.wait_execution(execution_id, timeout=timeout, interval=interval))


class Execution:
    """Sync form of `AsyncExecution`: iterate it (`for event in execution`) for its events."""

    def __init__(self, inner: AsyncExecution) -> None:
        self._async = inner

    @property
    def exec_id(self) -> str:
        return self._async.exec_id

    @property
    def pid(self) -> int | None:
        return self._async.pid

    @property
    def finished(self) -> bool:
        return self._async.finished

    def __iter__(self) -> Iterator[ExecEvent]:
        return _iterate(self._async)

    def wait(self, *, on_display: Callable[[Display], object] | None = None) -> ExecResult:
        """Take the remaining events and return the result (as `AsyncExecution.wait`)."""
        return _run(self._async.wait(on_display=on_display))

    def send_stdin(self, data: bytes | str) -> None:
        """Write to the exec's stdin."""
        _run(self._async.send_stdin(data))

    def close_stdin(self) -> None:
        """Close the exec's stdin."""
        _run(self._async.close_stdin())

    def signal(self, signal: str | int) -> None:
        """Send a signal (see `AsyncExecution.signal`)."""
        _run(self._async.signal(signal))

    def kill(self) -> None:
        """Stop the exec with SIGKILL."""
        _run(self._async.kill())

    def resize(self, rows: int, cols: int) -> None:
        """Change the terminal size of a PTY exec."""
        _run(self._async.resize(rows, cols))


class Watch:
    """Sync form of `AsyncWatch`: `with sandbox.files.watch("src", recursive=True) as changes:
    for change in changes: ...` (iterating starts it too; leaving the `with` stops it)."""

    def __init__(self, inner: AsyncWatch) -> None:
        self._async = inner

    @property
    def watch_id(self) -> str:
        return self._async.watch_id

    @property
    def backend(self) -> str | None:
        """`inotify` or `poll` (None before the start)."""
        return self._async.backend

    def start(self) -> Watch:
        """Start watching (once); returns when the guest watches."""
        _run(self._async.start())
        return self

    def stop(self) -> None:
        """Stop the watch; iteration ends after the changes that came before."""
        _run(self._async.stop())

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        _run(self._async.__aexit__(*exc))

    def __iter__(self) -> Iterator[WatchEvent]:
        return _iterate(self._async)


class Ports:
    """Sync form of `AsyncPorts`: the sandbox's published ports."""

    def __init__(self, inner: AsyncPorts) -> None:
        self._async = inner

    def publish(self, port: int) -> PortInfo:
        """Publish `port` (again: the same URL and token); see `AsyncPorts.publish`."""
        return _run(self._async.publish(port))

    def list(self) -> builtins.list[PortInfo]:
        """The published ports, with their tokens."""
        return _run(self._async.list())

    def unpublish(self, port: int) -> None:
        """Unpublish `port`: its token stops working."""
        _run(self._async.unpublish(port))


class Files:
    """Sync form of `AsyncFiles` (paths relative to the sandbox's root)."""

    def __init__(self, inner: AsyncFiles) -> None:
        self._async = inner

    def write(self, path: str, data: SyncFileData) -> int:
        """Write a file from bytes, text or a binary file object, streamed. Returns the bytes written."""
        return _run(self._async.write(path, data))

    def upload(self, local_path: str | os.PathLike[str], path: str) -> int:
        """Copy a local file into the sandbox, streamed."""
        return _run(self._async.upload(local_path, path))

    def read(self, path: str) -> bytes:
        """A whole file's bytes."""
        return _run(self._async.read(path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """A whole file, decoded."""
        return _run(self._async.read_text(path, encoding))

    def stream(self, path: str, *, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        """A file in chunks as they arrive (close the iterator to stop early)."""
        chunks = self._async.stream(path, chunk_size=chunk_size)
        try:
            yield from _iterate(chunks)
        finally:
            _run(chunks.aclose())

    def download(self, path: str, local_path: str | os.PathLike[str]) -> int:
        """Copy a file out of the sandbox into a local file, streamed."""
        return _run(self._async.download(path, local_path))

    def stat(self, path: str) -> FileInfo:
        """A path's type, size, mtime and mode. Raises `NotFound`."""
        return _run(self._async.stat(path))

    def exists(self, path: str) -> bool:
        """Whether the path exists."""
        return _run(self._async.exists(path))

    def list(self, path: str = ".", *, depth: int = 1) -> list[FileInfo]:
        """A directory's entries, `depth` levels down."""
        return _run(self._async.list(path, depth=depth))

    def mkdir(self, path: str, *, parents: bool = True) -> None:
        """Make a directory (and its parents)."""
        _run(self._async.mkdir(path, parents=parents))

    def move(self, src: str, dst: str) -> None:
        """Move or rename."""
        _run(self._async.move(src, dst))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file or directory."""
        _run(self._async.remove(path, recursive=recursive))

    def watch(self, path: str = ".", *, recursive: bool = False, poll_interval: float | None = None,
              tag: str | None = None) -> Watch:
        """Watch a directory for changes (as `AsyncFiles.watch`)."""
        return Watch(self._async.watch(path, recursive=recursive, poll_interval=poll_interval, tag=tag))
