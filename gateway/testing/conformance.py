"""The runtime conformance suite: what every sandgate runtime must do, through the real gateway.

A runtime proves itself by subclassing `RuntimeConformance` in a test module:

    from gateway.testing.conformance import RuntimeConformance

    class TestMyRuntime(RuntimeConformance):
        runtime = "my-runtime"            # the id it registers
        plugins = (my_runtime_module,)    # only if it is not installed through the entry point

Every test starts the real gateway (`create_app`) on a real socket with pytest-aiohttp and talks to
it over REST and WebSocket exactly as a client does. Tests follow the sandbox's advertised
capabilities: a runtime without processes must refuse `command` with `unsupported`, one with them
must run it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Functions, Limits, Settings
from gateway.protocol.client import JSON, MSGPACK, ClientCodec
from gateway.web.app import create_app

KEY = "conformance-key-tenant-a"
OTHER_KEY = "conformance-key-tenant-b"
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_KEY}"}
#: Every wait in the suite has a deadline: a broken runtime fails, it never hangs the run.
DEADLINE = 60.0


class WsClient:
    """A minimal protocol client over aiohttp's WebSocket, for tests."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, subprotocol: str) -> None:
        self.ws = ws
        self.codec = ClientCodec(subprotocol)
        self._ids = iter(range(1, 1 << 30))
        self._backlog: list[dict[str, Any]] = []  # messages for other requests, kept in order

    async def send(self, op: str, **fields: Any) -> int:
        request_id = next(self._ids)
        payload = self.codec.encode({"id": request_id, "op": op, **fields})
        if isinstance(payload, bytes):
            await self.ws.send_bytes(payload)
        else:
            await self.ws.send_str(payload)
        return request_id

    async def receive(self) -> dict[str, Any]:
        async with asyncio.timeout(DEADLINE):
            msg = await self.ws.receive()
        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            raise ConnectionError(f"WebSocket closed: {msg.type!r} {msg.data!r} {msg.extra!r}")
        return self.codec.decode(msg.data)

    async def receive_for(self, request_id: int) -> dict[str, Any]:
        for i, message in enumerate(self._backlog):
            if message.get("id") == request_id:
                return self._backlog.pop(i)
        while True:
            message = await self.receive()
            if message.get("id") == request_id:
                return message
            self._backlog.append(message)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """A request and its reply: the result, or AssertionError carrying the error."""
        message = await self.receive_for(await self.send(op, **fields))
        if "error" in message:
            raise RequestFailed(message["error"])
        return message["result"]  # type: ignore[no-any-return]

    async def stream(self, op: str, **fields: Any) -> list[dict[str, Any]]:
        """All events of a stream op up to its end (or a refusing error reply)."""
        request_id = await self.send(op, **fields)
        return await self.collect(request_id)

    async def collect(self, request_id: int) -> list[dict[str, Any]]:
        events = []
        while True:
            message = await self.receive_for(request_id)
            events.append(message)
            if message.get("ev") == "end" or ("error" in message and "ev" not in message):
                return events


class RequestFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.error = error


def output(events: list[dict[str, Any]], fd: str = "stdout") -> bytes:
    return b"".join(e["data"] for e in events if e.get("ev") == "data" and e.get("fd") == fd)


class Gateway:
    def __init__(self, client: TestClient[Any, Any], runtime: str, options: dict[str, Any]) -> None:
        self.client = client
        self.runtime = runtime
        self.options = options

    async def create(self, headers: dict[str, str] = AUTH, **body: Any) -> dict[str, Any]:
        resp = await self.client.post("/v1/sandboxes", json={"runtime": self.runtime, **self.options, **body},
                                      headers=headers)
        assert resp.status == 201, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]

    async def exec(self, sandbox_id: str, **body: Any) -> dict[str, Any]:
        resp = await self.client.post(f"/v1/sandboxes/{sandbox_id}/exec", json=body, headers=AUTH)
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]

    async def ws(self, sandbox_id: str, subprotocol: str = JSON) -> WsClient:
        ws = await self.client.ws_connect(f"/v1/sandboxes/{sandbox_id}/ws", protocols=(subprotocol,), headers=AUTH)
        assert ws.protocol == subprotocol
        return WsClient(ws, subprotocol)


class GatewayFixtures:
    """The suite's fixtures alone (a real gateway for `runtime`, a sandbox), for a runtime's own tests."""

    runtime: ClassVar[str]
    plugins: ClassVar[tuple[object, ...]] = ()
    #: Extra fields for every create request (e.g. a template).
    create_options: ClassVar[dict[str, Any]] = {}
    #: The runtime's settings table (`[runtimes.<id>]`), e.g. a smaller warm pool.
    runtime_config: ClassVar[dict[str, Any]] = {}
    #: Entry-point names not to load. None: every installed runtime but `runtime` (starting
    #: runtimes the suite does not test would only cost time: pools, VMs).
    blocked_plugins: ClassVar[tuple[str, ...] | None] = None
    #: The `[functions]` settings of the gateway under test.
    functions: ClassVar[Functions] = Functions()
    #: Whether the files API reaches the sandbox's whole file system (`--fs-root /`: microVM, pod),
    #: not only /work and the preopens (WASM): absolute paths like /etc are then no escape.
    whole_file_system: ClassVar[bool] = False

    @pytest.fixture
    async def gateway(self, aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]]) -> Gateway:
        settings = Settings(api_keys={KEY: "tenant-a", OTHER_KEY: "tenant-b"},
                            limits=Limits(exec_timeout_s=30.0), reap_interval_s=3600.0,
                            blocked_plugins=self._blocked(), runtimes={self.runtime: self.runtime_config},
                            functions=self.functions)
        client = await aiohttp_client(create_app(settings, plugins=self.plugins))
        return Gateway(client, self.runtime, dict(self.create_options))

    def _blocked(self) -> tuple[str, ...]:
        if self.blocked_plugins is not None:
            return self.blocked_plugins
        from importlib.metadata import entry_points

        from gateway.plugins import ENTRY_POINT_GROUP

        return tuple(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name != self.runtime)

    @pytest.fixture
    async def sandbox(self, gateway: Gateway) -> AsyncIterator[dict[str, Any]]:
        sandbox = await gateway.create()
        yield sandbox
        await gateway.client.delete(f"/v1/sandboxes/{sandbox['id']}", headers=AUTH)


class RuntimeConformance(GatewayFixtures):
    """Subclass with `runtime = "<id>"`; every test here must pass for a conforming runtime."""

    #: The fs.watch backend the runtime's guest must use (`inotify`, `poll`); None: either.
    watch_backend: ClassVar[str | None] = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def test_create_get_list_delete(self, gateway: Gateway) -> None:
        created = await gateway.create(metadata={"owner": "conformance"})
        assert created["runtime"] == self.runtime and created["state"] == "running"
        assert created["metadata"] == {"owner": "conformance"}
        sid = created["id"]
        got = await (await gateway.client.get(f"/v1/sandboxes/{sid}", headers=AUTH)).json()
        assert got["id"] == sid
        listed = await (await gateway.client.get("/v1/sandboxes", headers=AUTH)).json()
        assert sid in [s["id"] for s in listed["sandboxes"]]
        resp = await gateway.client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
        assert resp.status == 204
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}", headers=AUTH)
        assert resp.status == 404

    async def test_other_tenant_sees_404(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/exec"), ("GET", "/files/x")):
            resp = await gateway.client.request(method, f"/v1/sandboxes/{sid}{path}", headers=OTHER_AUTH,
                                                json={"code": "1"} if method == "POST" else None)
            assert resp.status == 404, (method, path)
            assert (await resp.json())["error"]["code"] == "not_found"
        listed = await (await gateway.client.get("/v1/sandboxes", headers=OTHER_AUTH)).json()
        assert listed["sandboxes"] == []

    # -- exec --------------------------------------------------------------------------------

    async def test_python_exec_rest(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        done = await gateway.exec(sid, language="python", code="x = 6 * 7\nprint('answer', x)")
        assert done["exit_code"] == 0 and done["stdout"] == "answer 42\n", done
        again = await gateway.exec(sid, language="python", code="print(x + 1)")
        assert again["stdout"] == "43\n", "the default namespace persists between execs"
        fresh = await gateway.exec(sid, language="python", code="print('x' in globals())", namespace="fresh")
        assert fresh["stdout"] == "False\n"
        failed = await gateway.exec(sid, language="python", code="raise ValueError('boom')")
        assert failed["exit_code"] == 1 and "ValueError: boom" in failed["stderr"]
        stdin = await gateway.exec(sid, language="python", code="import sys; print(sys.stdin.read().upper())",
                                   stdin="shout")
        assert stdin["stdout"] == "SHOUT\n"

    async def test_python_exec_streams_over_ws(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        for subprotocol in (JSON, MSGPACK):
            ws = await gateway.ws(sandbox["id"], subprotocol)
            hello = await ws.call("hello", version=1)
            assert hello["subprotocol"] == subprotocol and "exec.python" in hello["capabilities"]
            events = await ws.stream("exec.start", language="python",
                                     code="import sys\nfor i in range(3):\n    print(i, flush=True)\n"
                                          "print('err', file=sys.stderr)")
            kinds = [e["ev"] for e in events]
            assert kinds[0] == "start" and kinds[-1] == "end"
            assert [e["seq"] for e in events] == list(range(len(events)))
            assert output(events) == b"0\n1\n2\n" and output(events, "stderr") == b"err\n"
            assert events[-1]["exit_code"] == 0 and "error" not in events[-1]
            await ws.ws.close()

    async def test_process_exec_or_unsupported(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        if "exec.process" not in sandbox["capabilities"]:
            resp = await gateway.client.post(f"/v1/sandboxes/{sid}/exec", json={"command": ["true"]}, headers=AUTH)
            assert resp.status == 501 and (await resp.json())["error"]["code"] == "unsupported"
            return
        done = await gateway.exec(sid, command=["sh", "-c", "echo hi; echo oops >&2; exit 5"])
        assert (done["exit_code"], done["stdout"], done["stderr"]) == (5, "hi\n", "oops\n")
        shell = await gateway.exec(sid, command="echo $GREETING | tr a-z A-Z", env={"GREETING": "hey"})
        assert shell["stdout"] == "HEY\n"

    async def test_exec_timeout_leaves_sandbox_usable(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        done = await gateway.exec(sid, language="python", code="while True: pass", timeout=1)
        assert done["error"]["code"] == "timeout", done
        after = await gateway.exec(sid, language="python", code="print('still here')")
        assert after["stdout"] == "still here\n"

    async def test_reattach_replays_missed_output(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        first = await gateway.ws(sandbox["id"])
        request_id = await first.send("exec.start", language="python", tag="job",
                                      code="for i in range(5):\n    print('line', i)")
        start = await first.receive_for(request_id)
        assert start["ev"] == "start"
        await first.ws.close()  # drop the connection mid-stream
        second = await gateway.ws(sandbox["id"])
        attach_id = await second.send("exec.attach", tag="job", from_seq=1)
        reply = await second.receive_for(attach_id)
        assert reply["result"]["lost"] is None and reply["result"]["exec_id"] == start["exec_id"]
        events = await second.collect(attach_id)
        assert events[0]["seq"] == 1 and events[-1]["ev"] == "end"
        assert output(events) == b"".join(b"line %d\n" % i for i in range(5))

    # -- files -------------------------------------------------------------------------------

    async def test_files_roundtrip_rest(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        blob = os.urandom(3 << 20)  # several fs.write chunks and fs.read data events
        resp = await gateway.client.put(f"/v1/sandboxes/{sid}/files/dir/sub/blob.bin", data=io.BytesIO(blob),
                                        headers=AUTH)
        assert resp.status == 201, await resp.text()
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files/dir/sub/blob.bin", headers=AUTH)
        assert resp.status == 200 and await resp.read() == blob
        done = await gateway.exec(sid, language="python",
                                  code="import os; print(os.path.getsize('dir/sub/blob.bin'))")
        assert done["stdout"] == f"{len(blob)}\n", "files written over REST are the sandbox's files"
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files/missing.txt", headers=AUTH)
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"

    async def test_path_escapes_refused(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        for path in ("../etc/passwd", "a/../../x", "%2e%2e/%2e%2e/etc/passwd", "..%2Fetc%2Fpasswd", "/etc/passwd"):
            resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files/{path}", headers=AUTH)
            assert resp.status in (400, 404), path
            if resp.status == 400:
                assert (await resp.json())["error"]["code"] == "path_escape", path
        ws = await gateway.ws(sid)
        outside = (("fs.list", {"path": "/etc"}), ("fs.write", {"path": "/tmp/escape", "data": b"x"}))
        for op, fields in (("fs.stat", {"path": "../.."}), *(() if self.whole_file_system else outside)):
            with pytest.raises(RequestFailed) as failed:
                await ws.call(op, **fields)
            assert failed.value.code in ("path_escape", "not_found"), (op, failed.value)
        if self.whole_file_system:  # outside /work, but inside the file system the API reaches
            for op, fields in outside:
                await ws.call(op, **fields)

    async def test_fs_ops_over_ws(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        ws = await gateway.ws(sandbox["id"], MSGPACK)
        await ws.call("fs.mkdir", path="proj/src")
        written = await ws.call("fs.write", path="proj/src/main.py", data=b"print(1)\n", truncate=True)
        assert written["size"] == 9
        stat = await ws.call("fs.stat", path="proj/src/main.py")
        assert stat["type"] == "file" and stat["size"] == 9
        listing = await ws.call("fs.list", path="proj", depth=2)
        assert {e["path"] for e in listing["entries"]} >= {"src", "src/main.py"}
        await ws.call("fs.move", src="proj/src/main.py", dst="proj/app.py")
        events = await ws.stream("fs.read", path="proj/app.py")
        assert output_data(events) == b"print(1)\n"
        await ws.call("fs.remove", path="proj", recursive=True)
        with pytest.raises(RequestFailed) as missing:
            await ws.call("fs.stat", path="proj")
        assert missing.value.code == "not_found"

    async def test_fs_watch_events_in_order_across_a_reconnect(self, gateway: Gateway,
                                                              sandbox: dict[str, Any]) -> None:
        """fs.watch: create, modify, move and delete seen in order; a nested change only by a
        recursive watch; after a dropped connection, exec.attach from the next seq replays exactly
        the changes missed; fs.unwatch ends the stream."""
        sid = sandbox["id"]
        ws = await gateway.ws(sid, MSGPACK)
        await ws.call("fs.mkdir", path="watched/sub")
        deep = await ws.send("fs.watch", path="watched", recursive=True, tag="deep", poll_interval=0.05)
        flat = await ws.send("fs.watch", path="watched", poll_interval=0.05)
        for request_id in (deep, flat):
            start = await ws.receive_for(request_id)
            assert start["ev"] == "start" and start["seq"] == 0, start
            if self.watch_backend is not None:
                assert start["backend"] == self.watch_backend, start

        async def change(request_id: int, client: WsClient = ws) -> tuple[str, str, str | None]:
            while (event := await client.receive_for(request_id))["ev"] == "keepalive":
                pass
            assert event["ev"] == "change", event
            return event["change"], event["path"], event.get("src")

        await ws.call("fs.write", path="watched/sub/inner.txt", data=b"1", truncate=True)
        assert await change(deep) == ("created", "sub/inner.txt", None)
        await ws.call("fs.write", path="watched/a.txt", data=b"1", truncate=True)
        assert await change(deep) == ("created", "a.txt", None)
        assert await change(flat) == ("created", "a.txt", None), "the flat watch never saw sub/inner.txt"
        await ws.call("fs.write", path="watched/a.txt", data=b"22", truncate=True)
        assert await change(deep) == ("modified", "a.txt", None)
        await ws.call("fs.move", src="watched/a.txt", dst="watched/b.txt")
        assert await change(deep) == ("moved", "b.txt", "a.txt")
        await ws.call("fs.remove", path="watched/b.txt")
        assert await change(deep) == ("deleted", "b.txt", None)
        await ws.ws.close()  # six events so far (start and five changes): the next is seq 6
        other = await gateway.ws(sid)
        names = [f"f{n}.txt" for n in range(5)]
        for name in names:  # while the watch's client is away
            await other.call("fs.write", path=f"watched/{name}", data=b"x", truncate=True)
        again = await gateway.ws(sid)
        attach = await again.send("exec.attach", tag="deep", from_seq=6)
        reply = await again.receive_for(attach)
        assert reply["result"]["lost"] is None and reply["result"]["first_seq"] == 6, reply
        replayed = [await change(attach, again) for _ in names]
        assert replayed == [("created", n, None) for n in names], replayed
        assert await again.call("fs.unwatch", tag="deep") == {}
        while (end := await again.receive_for(attach))["ev"] != "end":
            assert end["ev"] == "keepalive", end
        assert end.get("error") is None, end

    # -- metrics, errors, destroy -------------------------------------------------------------

    async def test_metrics(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        resp = await gateway.client.get(f"/v1/sandboxes/{sandbox['id']}/metrics", headers=AUTH)
        metrics = await resp.json()
        assert resp.status == 200 and metrics["guest"]["uptime_s"] >= 0
        assert isinstance(metrics["host"], dict)

    async def test_bad_messages_get_errors_and_session_survives(self, gateway: Gateway,
                                                                sandbox: dict[str, Any]) -> None:
        ws = await gateway.ws(sandbox["id"])
        await ws.ws.send_str("{not json")
        assert (await ws.receive())["error"]["code"] == "bad_frame"
        await ws.ws.send_str(json.dumps({"id": 7, "op": "no.such.op"}))
        assert (await ws.receive())["error"]["code"] == "unknown_op"
        await ws.ws.send_str(json.dumps({"id": 8, "op": "fs.stat"}))
        assert (await ws.receive())["error"]["code"] == "bad_request"
        assert await ws.call("ping") == {}

    async def test_destroy_closes_sessions(self, gateway: Gateway) -> None:
        sandbox = await gateway.create()
        ws = await gateway.ws(sandbox["id"])
        await ws.call("ping")
        resp = await gateway.client.delete(f"/v1/sandboxes/{sandbox['id']}", headers=AUTH)
        assert resp.status == 204
        async with asyncio.timeout(DEADLINE):
            msg = await ws.ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4404


def output_data(events: list[dict[str, Any]]) -> bytes:
    return b"".join(e["data"] for e in events if e.get("ev") == "data")
