"""Fault tests with real processes: a guest killed mid-exec, mid-read and mid-write, a client's TCP
connection cut mid-stream, a sandbox destroyed during each operation, and a gateway stopped
mid-stream. Every operation must end within its deadline with a clear error, the sandbox (when it
lives on) must keep its files, and nothing may be left running.

A guest is "killed" from outside, as the kernel's OOM killer or an operator would: SIGKILL to its
WASM launcher process. Deadlines (DEADLINE) turn a hang into a failure; nothing here waits for them.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from websockets.sync.client import connect

from gateway.config import Settings
from gateway.web.app import MANAGER, create_app
from tests.guest_agent.agent_harness import wait_gone
from tests.serving import serve

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

KEY = "faults-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEADLINE = 30.0
SHUTDOWN_TIMEOUT = 30.0
FLOOD = "import sys\nwhile True:\n    sys.stdout.write('x' * 60000 + '\\n')\n"
BLOB = os.urandom(24 << 20)  # big enough that a transfer is surely under way when the fault hits


@pytest.fixture
async def gateway(aiohttp_client: Any) -> TestClient[Any, Any]:
    settings = Settings(api_keys={KEY: "tenant"}, blocked_plugins=("microvm", "pod"), default_runtime="wasm",
                        reap_interval_s=3600.0, runtimes={"wasm": {"pool_size": 0}})
    return await aiohttp_client(create_app(settings))  # type: ignore[no-any-return]


async def _create(gateway: TestClient[Any, Any]) -> str:
    resp = await gateway.post("/v1/sandboxes", json={}, headers=AUTH)
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


def _launcher_pid(gateway: TestClient[Any, Any], sid: str) -> int:
    return int(gateway.app[MANAGER].get("tenant", sid).backend.launcher.proc.pid)


async def _exec(gateway: TestClient[Any, Any], sid: str, code: str) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        resp = await gateway.post(f"/v1/sandboxes/{sid}/exec", json={"code": code}, headers=AUTH)
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def _put(gateway: TestClient[Any, Any], sid: str, name: str, data: bytes) -> None:
    resp = await gateway.put(f"/v1/sandboxes/{sid}/files/{name}", data=io.BytesIO(data), headers=AUTH)
    assert resp.status == 201, await resp.text()


async def _get(gateway: TestClient[Any, Any], sid: str, name: str) -> bytes:
    resp = await gateway.get(f"/v1/sandboxes/{sid}/files/{name}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    return await resp.read()


async def _flood_started(gateway: TestClient[Any, Any], sid: str) -> aiohttp.ClientWebSocketResponse:
    """A WebSocket client with FLOOD running, once its first output arrived."""
    ws = await gateway.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await ws.send_json({"id": 1, "op": "exec.start", "language": "python", "tag": "flood", "code": FLOOD})
    async with asyncio.timeout(DEADLINE):
        while (await ws.receive_json()).get("ev") != "data":
            pass
    return ws


async def _end_of(ws: aiohttp.ClientWebSocketResponse, request_id: int) -> dict[str, Any]:
    """Read until request `request_id`'s stream ends; that end event."""
    async with asyncio.timeout(DEADLINE):
        while True:
            message = await ws.receive_json()
            if message.get("id") == request_id and message.get("ev") == "end":
                return dict(message)


class _Paced:
    """A request body sent in 64 KiB chunks that pauses, after `pause_after` bytes, until `resume`
    is set: the fault happens while the upload is half sent."""

    def __init__(self, data: bytes, pause_after: int) -> None:
        self.data = data
        self.pause_after = pause_after
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for offset in range(0, len(self.data), 1 << 16):
            if offset == self.pause_after:
                self.paused.set()
                await self.resume.wait()
            yield self.data[offset:offset + (1 << 16)]


# -- the guest killed ----------------------------------------------------------------------------


async def test_guest_killed_mid_exec_ends_the_stream_and_the_sandbox_keeps_its_files(
    gateway: TestClient[Any, Any],
) -> None:
    sid = await _create(gateway)
    await _put(gateway, sid, "kept.txt", b"still here")
    ws = await _flood_started(gateway, sid)
    os.kill(_launcher_pid(gateway, sid), signal.SIGKILL)
    end = await _end_of(ws, 1)
    assert end["error"]["code"] == "guest_died", end
    result = await _exec(gateway, sid, "print(open('/work/kept.txt').read())")
    assert result["stdout"] == "still here\n", result
    await ws.close()


async def test_guest_killed_mid_read_breaks_the_transfer(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    await _put(gateway, sid, "big.bin", BLOB)
    resp = await gateway.get(f"/v1/sandboxes/{sid}/files/big.bin", headers=AUTH)
    assert resp.status == 200
    await resp.content.readexactly(1 << 16)
    os.kill(_launcher_pid(gateway, sid), signal.SIGKILL)
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert await _get(gateway, sid, "big.bin") == BLOB  # the agent came back; the file is whole


async def test_guest_killed_mid_write_fails_the_upload_and_keeps_the_old_file(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    await _put(gateway, sid, "doc.bin", b"version 1")
    body = _Paced(BLOB, pause_after=4 << 20)
    upload = asyncio.ensure_future(gateway.put(f"/v1/sandboxes/{sid}/files/doc.bin", data=body, headers=AUTH))
    async with asyncio.timeout(DEADLINE):
        await body.paused.wait()
    os.kill(_launcher_pid(gateway, sid), signal.SIGKILL)
    body.resume.set()
    async with asyncio.timeout(DEADLINE):
        resp = await upload
    assert resp.status == 502, await resp.text()
    assert (await resp.json())["error"]["code"] == "guest_died"
    assert await _get(gateway, sid, "doc.bin") == b"version 1"
    listing = await _exec(gateway, sid, "import os; print(sorted(os.listdir('/work')))")
    assert listing["stdout"] == "['doc.bin']\n", "no temporary upload file is left behind"


# -- the client's connection cut -----------------------------------------------------------------


async def test_client_cut_mid_stream_leaves_the_exec_reattachable(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    ws = await _flood_started(gateway, sid)
    ws._response.connection.transport.abort()  # type: ignore[union-attr]  # a TCP reset, no close frame
    viewer = await gateway.ws_connect(f"/v1/sandboxes/{sid}/ws", headers=AUTH)
    await viewer.send_json({"id": 1, "op": "exec.attach", "tag": "flood", "from_seq": 0})
    async with asyncio.timeout(DEADLINE):
        reply = await viewer.receive_json()
    assert reply["result"]["exec_id"] == "e1", reply
    await viewer.send_json({"id": 2, "op": "exec.signal", "tag": "flood", "signal": "SIGKILL"})
    end = await _end_of(viewer, 1)
    assert end["ev"] == "end"
    await viewer.close()


# -- destroyed during each operation -------------------------------------------------------------


async def test_destroy_mid_exec_ends_the_stream(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    ws = await _flood_started(gateway, sid)
    async with asyncio.timeout(DEADLINE):
        resp = await gateway.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
    assert resp.status == 204
    async with asyncio.timeout(DEADLINE):
        while (msg := await ws.receive()).type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            pass
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4404, msg


async def test_destroy_mid_read_breaks_the_transfer(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    await _put(gateway, sid, "big.bin", BLOB)
    resp = await gateway.get(f"/v1/sandboxes/{sid}/files/big.bin", headers=AUTH)
    await resp.content.readexactly(1 << 16)
    async with asyncio.timeout(DEADLINE):
        assert (await gateway.delete(f"/v1/sandboxes/{sid}", headers=AUTH)).status == 204
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_destroy_mid_write_fails_the_upload(gateway: TestClient[Any, Any]) -> None:
    sid = await _create(gateway)
    body = _Paced(BLOB, pause_after=4 << 20)
    upload = asyncio.ensure_future(gateway.put(f"/v1/sandboxes/{sid}/files/doc.bin", data=body, headers=AUTH))
    async with asyncio.timeout(DEADLINE):
        await body.paused.wait()
        assert (await gateway.delete(f"/v1/sandboxes/{sid}", headers=AUTH)).status == 204
    body.resume.set()
    async with asyncio.timeout(DEADLINE):
        resp = await upload
    assert resp.status in (404, 410, 502), await resp.text()
    assert "error" in await resp.json()


# -- the gateway stopped mid-stream --------------------------------------------------------------


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_sigterm_mid_stream_stops_within_the_shutdown_timeout_and_leaves_nothing_running(tmp_path: Path) -> None:
    env = {**os.environ, "SANDGATE_API_KEYS": f"{KEY}:tenant", "SANDGATE_STATE_DIR": str(tmp_path)}
    with serve(env) as served:
        sid = served.call(KEY, "POST", "/v1/sandboxes", {"runtime": "wasm"})["id"]
        with connect(f"ws://127.0.0.1:{served.port}/v1/sandboxes/{sid}/ws", additional_headers=AUTH,
                     open_timeout=DEADLINE) as ws:
            ws.send(json.dumps({"id": 1, "op": "exec.start", "language": "python", "code": FLOOD}))
            while json.loads(ws.recv(timeout=DEADLINE)).get("ev") != "data":
                pass
            launchers = _processes_naming(str(tmp_path))
            assert launchers, "the sandbox's launcher runs with its work folder under the state dir"
            served.proc.send_signal(signal.SIGTERM)
            # 30 s is the gateway's shutdown timeout; the margin covers the interpreter's own exit.
            served.proc.wait(timeout=SHUTDOWN_TIMEOUT + 10)
    assert all(wait_gone(pid, DEADLINE) for pid in launchers)
    assert _processes_naming(str(tmp_path)) == []
    work_folders = list((tmp_path / "wasm").iterdir()) if (tmp_path / "wasm").exists() else []
    assert work_folders == []
