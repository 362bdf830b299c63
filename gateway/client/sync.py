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
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, TypeVar

from gateway.client.aio import DEFAULT_MAX_OUTPUT, AsyncClient, AsyncExecution, AsyncFiles, AsyncSandbox
from gateway.client.errors import ConnectionLost, NotFound
from gateway.client.models import ExecEvent, ExecResult, FileInfo, Metrics, SandboxInfo

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


class Sandbox:
    """Sync form of `AsyncSandbox`. `with Sandbox.create() as sb:` destroys it at the end."""

    def __init__(self, inner: AsyncSandbox) -> None:
        self._async = inner
        self.files = Files(inner.files)

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
               network: bool | None = None, template: str | None = None,
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
                network=network, template=template, metadata=metadata, **options)

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
        """CPU, memory, disk and uptime, from the guest and from the host."""
        return _run(self._async.metrics())

    def exec(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
             language: str | None = None, stdin: bytes | str | None = None, env: Mapping[str, str] | None = None,
             cwd: str | None = None, timeout: float | None = None, tag: str | None = None,
             namespace: str | None = None, pty: tuple[int, int] | None = None,
             max_output_bytes: int = DEFAULT_MAX_OUTPUT) -> ExecResult:
        """Run a command or code to its end (arguments, result and errors as `AsyncSandbox.exec`)."""
        return _run(self._async.exec(command, code=code, language=language, stdin=stdin, env=env, cwd=cwd,
                                     timeout=timeout, tag=tag, namespace=namespace, pty=pty,
                                     max_output_bytes=max_output_bytes))

    def start(self, command: str | Sequence[str] | None = None, *, code: str | None = None,
              language: str | None = None, stdin: bytes | str | None = None, stdin_open: bool | None = None,
              env: Mapping[str, str] | None = None, cwd: str | None = None, timeout: float | None = None,
              tag: str | None = None, namespace: str | None = None, pty: tuple[int, int] | None = None,
              max_output_bytes: int = DEFAULT_MAX_OUTPUT) -> Execution:
        """Start a command or code and return a handle to iterate, feed and signal it (as `AsyncSandbox.start`)."""
        return Execution(_run(self._async.start(command, code=code, language=language, stdin=stdin,
                                                stdin_open=stdin_open, env=env, cwd=cwd, timeout=timeout, tag=tag,
                                                namespace=namespace, pty=pty, max_output_bytes=max_output_bytes)))

    def attach(self, exec_id: str | None = None, *, tag: str | None = None) -> Execution:
        """Follow an exec started elsewhere, from its first buffered event."""
        return Execution(_run(self._async.attach(exec_id, tag=tag)))

    def list_execs(self) -> builtins.list[dict[str, Any]]:
        """The sandbox's recent execs."""
        return _run(self._async.list_execs())


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

    def wait(self) -> ExecResult:
        """Take the remaining events and return the result (errors as `AsyncExecution.wait`)."""
        return _run(self._async.wait())

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
