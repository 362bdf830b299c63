"""The async SDK against a real gateway and real WASM sandboxes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from gateway.client import AsyncClient, AsyncSandbox, Exited, Output, OutputLost, Started, errors
from tests.client.conftest import KEY, OTHER_KEY, TcpProxy

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


async def test_create_exec_and_destroy_on_exit(gateway_url: str) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY, metadata={"who": "sdk"}) as sb:
        assert sb.info.runtime == "wasm" and sb.info.metadata == {"who": "sdk"}
        assert "exec.python" in sb.info.capabilities
        done = await sb.exec(code="x = 6 * 7\nprint('answer', x)")
        assert (done.exit_code, done.stdout, done.stderr, done.ok) == (0, "answer 42\n", "", True)
        assert done.duration > 0 and done.signal is None and done.error is None
        assert (await sb.exec(code="print(x + 1)")).stdout == "43\n", "the default namespace persists"
        failed = await sb.exec(code="raise ValueError('boom')")
        assert failed.exit_code == 1 and "ValueError: boom" in failed.stderr and not failed.ok
        shout = await sb.exec(code="import sys; print(sys.stdin.read().upper())", stdin="quiet")
        assert shout.stdout == "QUIET\n"
        js = await sb.exec(code="console.log([1, 2, 3].map(n => n * 2).join(','))", language="javascript")
        assert js.stdout == "2,4,6\n"
        async with AsyncClient(gateway_url, KEY) as client:
            assert sb.id in [s.id for s in await client.list_sandboxes()]
        assert sb.id in [s.id for s in await AsyncSandbox.list(url=gateway_url, api_key=KEY)]
    with pytest.raises(errors.NotFound) as gone:
        await AsyncSandbox.connect(sb.id, url=gateway_url, api_key=KEY)
    assert gone.value.code == "not_found" and gone.value.http_status == 404 and not gone.value.retryable


async def test_stream_events_and_interactive_stdin(gateway_url: str) -> None:
    json_client = AsyncClient(gateway_url, KEY, encoding="json")  # the other subprotocol
    async with json_client, AsyncSandbox.create(runtime="wasm", client=json_client) as sb:
        execution = await sb.start(code="import sys\nprint('name?', flush=True)\nname = input()\n"
                                        "print('hello', name)\nprint('bye', file=sys.stderr)", stdin_open=True,
                                   tag="greeter")
        events = []
        async for event in execution:
            events.append(event)
            if isinstance(event, Output) and event.text == "name?\n":
                await execution.send_stdin("sandgate\n")
        assert isinstance(events[0], Started) and events[0].exec_id == execution.exec_id
        assert isinstance(events[-1], Exited) and events[-1].exit_code == 0
        assert [e.seq for e in events] == list(range(len(events)))  # type: ignore[union-attr]
        out = b"".join(e.data for e in events if isinstance(e, Output) and e.fd == "stdout")
        assert out == b"name?\nhello sandgate\n"
        result = await execution.wait()
        assert result.stdout == "name?\nhello sandgate\n" and result.stderr == "bye\n"
        listed = {e["exec_id"]: e for e in await sb.list_execs()}
        assert listed[execution.exec_id]["tag"] == "greeter" and not listed[execution.exec_id]["running"]

        # stdin that ends: the program reads to end of file
        counter = await sb.start(code="import sys; print(len(sys.stdin.read()))", stdin_open=True)
        await counter.send_stdin(b"12345")
        await counter.close_stdin()
        assert (await counter.wait()).stdout == "5\n"

        # another client follows a finished exec from its first event
        async with AsyncClient(gateway_url, KEY) as other:
            follower = await (await other.get_sandbox(sb.id)).attach(tag="greeter")
            assert (await follower.wait()).stdout == result.stdout
            await follower.sandbox.close()


async def test_exec_errors_are_typed_and_carry_the_output(gateway_url: str) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY) as sb:
        with pytest.raises(errors.Unsupported) as no_processes:
            await sb.exec(["ls", "-l"])
        assert no_processes.value.http_status == 501 and not no_processes.value.retryable
        with pytest.raises(errors.BadRequest):
            await sb.exec()
        with pytest.raises(errors.Timeout) as late:
            await sb.exec(code="print('started', flush=True)\nwhile True: pass", timeout=1)
        assert late.value.result is not None and late.value.result.stdout == "started\n"
        assert (await sb.exec(code="print('alive')")).stdout == "alive\n", "the sandbox is usable after"

        busy = await sb.start(code="input()", stdin_open=True)
        with pytest.raises(errors.Busy) as refused:
            await sb.files.list()
        assert refused.value.retryable, "WASM runs one thing at a time and says so"
        await busy.kill()  # WASM stops it by restarting its agent
        with pytest.raises(errors.GuestDied):
            await busy.wait()


async def test_files_large_both_ways_and_fs_ops(gateway_url: str, tmp_path: os.PathLike[str]) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY) as sb:
        blob = os.urandom(5 << 20)
        assert await sb.files.write("data/blob.bin", blob) == len(blob)
        assert await sb.files.read("data/blob.bin") == blob

        async def generated() -> AsyncIterator[bytes]:
            for i in range(48):  # 3 MiB in 64 KiB chunks, sent with chunked transfer encoding
                yield bytes([i]) * 65536

        assert await sb.files.write("data/gen.bin", generated()) == 48 * 65536
        digest = hashlib.sha256()
        chunks = 0
        async for chunk in sb.files.stream("data/gen.bin"):
            digest.update(chunk)
            chunks += 1
        assert digest.digest() == hashlib.sha256(b"".join(bytes([i]) * 65536 for i in range(48))).digest()
        assert chunks > 1, "a large read arrives in pieces"

        local = os.path.join(tmp_path, "local.bin")
        assert await sb.files.download("data/blob.bin", local) == len(blob)
        assert await sb.files.upload(local, "copy.bin") == len(blob)
        size = await sb.exec(code="import os; print(os.path.getsize('copy.bin'))")
        assert size.stdout == f"{len(blob)}\n", "files written by the SDK are the sandbox's files"

        await sb.files.write("notes/todo.txt", "ünïcode ✓\n")
        assert await sb.files.read_text("notes/todo.txt") == "ünïcode ✓\n"
        await sb.files.mkdir("a/b/c")
        stat = await sb.files.stat("notes/todo.txt")
        assert stat.is_file and stat.size == len("ünïcode ✓\n".encode()) and stat.name == "todo.txt"
        await sb.files.move("notes/todo.txt", "a/b/c/todo.txt")
        listing = {e.path: e for e in await sb.files.list("a", depth=3)}
        assert listing["b"].is_dir and "b/c/todo.txt" in listing
        assert await sb.files.exists("a/b/c/todo.txt") and not await sb.files.exists("notes/todo.txt")
        with pytest.raises(errors.SandgateError) as not_empty:
            await sb.files.remove("a")
        assert not_empty.value.code != "internal"
        await sb.files.remove("a", recursive=True)
        assert not await sb.files.exists("a")

        with pytest.raises(errors.NotFound):
            await sb.files.read("missing.txt")
        with pytest.raises(errors.PathEscape):
            await sb.files.read("../etc/passwd")
        with pytest.raises(errors.PathEscape):
            await sb.files.stat("/etc")


async def test_metrics(gateway_url: str) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY) as sb:
        await sb.files.write("x.bin", b"x" * 1000)
        metrics = await sb.metrics()
        assert metrics.uptime_s is not None and metrics.uptime_s >= 0
        assert metrics.disk_bytes is not None and metrics.disk_bytes >= 1000
        assert metrics.host.get("rss_bytes", 0) > 0 and metrics.restarts == 0


async def test_auth_and_tenancy_errors(gateway_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(errors.Unauthorized) as wrong:
        await AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key="wrong-key")
    assert wrong.value.http_status == 401 and wrong.value.code == "unauthorized"
    monkeypatch.delenv("SANDGATE_API_KEY", raising=False)
    with pytest.raises(errors.Unauthorized, match="SANDGATE_API_KEY"):
        AsyncClient(gateway_url)
    with pytest.raises(ValueError, match="http://host:port"):
        AsyncClient("ftp://example.com", KEY)
    monkeypatch.setenv("SANDGATE_URL", gateway_url)
    monkeypatch.setenv("SANDGATE_API_KEY", KEY)
    async with AsyncSandbox.create(runtime="wasm") as sb:  # configured from the environment
        with pytest.raises(errors.NotFound):
            await AsyncSandbox.connect(sb.id, api_key=OTHER_KEY)  # another tenant's looks missing
        async with AsyncClient(api_key=OTHER_KEY) as stranger:
            handle = stranger.sandbox(sb.id)
            with pytest.raises(errors.NotFound):
                await handle.exec(code="print(1)")  # refused at the WebSocket upgrade
            await handle.close()
    with pytest.raises(errors.BadRequest):
        await AsyncSandbox.create(runtime="no-such-runtime")
    with pytest.raises(errors.BadRequest):
        await AsyncSandbox.create(runtime="wasm", ttl=-5)


async def test_reconnect_replays_what_was_missed_exactly_once(gateway_url: str, proxy: TcpProxy) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=proxy.url, api_key=KEY) as sb:
        code = ("for i in range(300):\n    print('before', i)\nname = input()\n"
                "for i in range(3000):\n    print('after', i, name)\n")
        execution = await sb.start(code=code, stdin_open=True)
        seen = bytearray()
        async for event in execution:
            if isinstance(event, Output):
                seen += event.data
            if seen.endswith(b"before 299\n"):
                break  # the exec now waits for stdin
        # The network fails, and stays down while the exec produces the rest of its output.
        proxy.hold()
        proxy.cut()
        async with AsyncClient(gateway_url, KEY) as direct:
            helper = await direct.get_sandbox(sb.id)
            follower = await helper.attach(execution.exec_id)
            await follower.send_stdin("go\n")
            finished = await follower.wait()
            await helper.close()
        assert finished.exit_code == 0, "the exec ran to its end while the first client was cut off"
        proxy.release()
        rest = [event async for event in execution]
        assert isinstance(rest[-1], Exited) and rest[-1].exit_code == 0
        assert not any(isinstance(e, OutputLost) for e in rest)
        for event in rest:
            if isinstance(event, Output):
                seen += event.data
        expected = "".join(f"before {i}\n" for i in range(300)) + "".join(f"after {i} go\n" for i in range(3000))
        assert seen.decode() == expected, "every byte arrived, none twice"
        assert sb.connection.reconnects == 1


async def test_reconnect_mid_stream_and_requests_after_it(gateway_url: str, proxy: TcpProxy) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=proxy.url, api_key=KEY) as sb:
        execution = await sb.start(code="for i in range(20000):\n    print('line', i)\n")
        out = bytearray()
        cut = False
        async for event in execution:
            if isinstance(event, Output):
                out += event.data
                if not cut:
                    proxy.cut()  # wherever the stream is: output keeps flowing into the replay buffer
                    cut = True
        assert out.decode() == "".join(f"line {i}\n" for i in range(20000))
        assert (await execution.wait()).exit_code == 0
        assert sb.connection.reconnects >= 1
        proxy.cut()
        assert (await sb.files.list(".")) is not None, "an idempotent request rides over a reconnect"
        assert (await sb.exec(code="print('still here')")).stdout == "still here\n"


async def test_destroyed_sandbox_ends_streams_with_not_found(gateway_url: str) -> None:
    sb = await AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY)
    execution = await sb.start(code="input()", stdin_open=True)
    async with AsyncClient(gateway_url, KEY) as other:
        await (await other.get_sandbox(sb.id)).destroy()
    with pytest.raises((errors.NotFound, errors.GuestDied)):
        await execution.wait()
    with pytest.raises((errors.NotFound, errors.GuestDied)):  # whichever the gateway said first
        await sb.files.list()
    await sb.close()
