"""fs.watch through a real gateway and real WASM sandboxes (the polling backend), with the SDK and
with a raw WebSocket: events in order, none lost or doubled across a reconnect, re-attach by
`exec.attach`, stop, and the ends a watch can have."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.client import AsyncClient, AsyncSandbox, WatchEvent, errors
from tests.client.conftest import KEY, TcpProxy

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


def summary(change: WatchEvent) -> tuple[str, str, str | None]:
    return change.kind, change.path, change.src


async def next_change(changes: AsyncIterator[WatchEvent]) -> tuple[str, str, str | None]:
    return summary(await anext(changes))


async def put(sb: AsyncSandbox, path: str, text: str) -> None:
    """Write a file in one agent op. (`files.write`, a REST upload, writes a temporary file next to
    the target and renames it: a watch may see those steps, which is what happened.)"""
    await sb.connection.request("fs.write", {"path": path, "data": text.encode(), "truncate": True})


async def test_create_modify_move_delete_in_order(gateway_url: str) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY) as sb:
        await sb.files.mkdir("proj")
        async with sb.files.watch("proj", poll_interval=0.05) as watch:
            assert watch.backend == "poll"  # WASI has no inotify
            changes = aiter(watch)
            await put(sb, "proj/a.txt", "one")
            assert await next_change(changes) == ("created", "a.txt", None)
            await put(sb, "proj/a.txt", "one two")
            assert await next_change(changes) == ("modified", "a.txt", None)
            await sb.files.move("proj/a.txt", "proj/b.txt")
            assert await next_change(changes) == ("moved", "b.txt", "a.txt")
            await sb.files.remove("proj/b.txt")
            assert await next_change(changes) == ("deleted", "b.txt", None)
            # An exec's changes too (on WASM they are seen once the exec has ended).
            await sb.exec(code="import os\nos.mkdir('/work/proj/d')\nopen('/work/proj/d/x', 'w').write('1')")
            first = await anext(changes)
            assert (summary(first), first.is_dir) == (("created", "d", None), True)
            await watch.stop()
            assert [c async for c in changes] == []  # iteration ends after a stop


async def test_recursive_sees_nested_changes_and_a_plain_watch_does_not(gateway_url: str) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY) as sb:
        await sb.files.mkdir("top/sub")
        async with sb.files.watch("top", recursive=True, poll_interval=0.05) as deep, \
                sb.files.watch("top", poll_interval=0.05) as flat:
            await put(sb, "top/sub/inner.txt", "1")
            assert await next_change(aiter(deep)) == ("created", "sub/inner.txt", None)
            await put(sb, "top/outer.txt", "1")
            assert await next_change(aiter(deep)) == ("created", "outer.txt", None)
            # The plain watch's first change is the top-level file: the nested one never reached it.
            assert await next_change(aiter(flat)) == ("created", "outer.txt", None)


async def test_no_change_lost_or_doubled_across_a_reconnect(gateway_url: str, proxy: TcpProxy) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=proxy.url, api_key=KEY) as sb:
        async with sb.files.watch(".", poll_interval=0.05) as watch:
            changes = aiter(watch)
            await put(sb, "before.txt", "1")
            assert await next_change(changes) == ("created", "before.txt", None)
            # The network fails and stays down while the sandbox's files change: the gateway keeps
            # the changes in the watch's replay buffer.
            proxy.hold()
            proxy.cut()
            async with AsyncClient(gateway_url, KEY) as direct:
                other = await direct.get_sandbox(sb.id)
                async with other.files.watch(".", poll_interval=0.05) as witness:
                    seen = aiter(witness)
                    for n in range(20):
                        await put(other, f"f{n}.txt", str(n))
                        assert await next_change(seen) == ("created", f"f{n}.txt", None)
                await other.close()
            proxy.release()
            got = [await next_change(changes) for _ in range(20)]
            assert got == [("created", f"f{n}.txt", None) for n in range(20)], "each once, in order"
            await put(sb, "after.txt", "1")
            assert await next_change(changes) == ("created", "after.txt", None)
            assert sb.connection.reconnects == 1


async def test_the_watch_goes_on_when_the_agent_is_restarted(gateway_url: str) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY) as sb:
        async with sb.files.watch(".", poll_interval=0.05) as watch:
            changes = aiter(watch)
            # A runaway exec on WASM is stopped by restarting the sandbox's agent.
            with pytest.raises(errors.Timeout):
                await sb.exec(code="while True: pass", timeout=0.5)
            assert await next_change(changes) == ("overflow", "", None)  # what happened meanwhile is unknown
            await put(sb, "later.txt", "1")
            assert await next_change(changes) == ("created", "later.txt", None)


async def test_removed_directory_and_destroyed_sandbox_end_the_watch_with_an_error(gateway_url: str) -> None:
    sb = await AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY)
    try:
        await sb.files.mkdir("doomed")
        watch = await sb.files.watch("doomed", poll_interval=0.05).start()
        await sb.files.remove("doomed", recursive=True)
        assert await next_change(aiter(watch)) == ("deleted", "", None)
        with pytest.raises(errors.NotFound):
            await anext(aiter(watch))
        await put(sb, "f.txt", "")
        with pytest.raises(errors.NotADirectory):
            await sb.files.watch("f.txt").start()
        alive = await sb.files.watch(".", poll_interval=0.05).start()
    finally:
        async with AsyncClient(gateway_url, KEY) as other:
            await (await other.get_sandbox(sb.id)).destroy()
    with pytest.raises((errors.NotFound, errors.GuestDied)):
        await anext(aiter(alive))
    await sb.close()


async def test_raw_websocket_reattach_by_tag_from_seq_and_unwatch(gateway_url: str) -> None:
    async with AsyncSandbox.create(runtime="wasm", url=gateway_url, api_key=KEY) as sb, \
            aiohttp.ClientSession() as http:
        url = f"{gateway_url.replace('http', 'ws')}/v1/sandboxes/{sb.id}/ws"
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.ws_connect(url, headers=headers) as ws:
            await ws.send_json({"id": 1, "op": "fs.watch", "path": "/work", "tag": "src", "poll_interval": 0.05})
            start = await ws.receive_json()
            assert start["ev"] == "start" and start["seq"] == 0 and start["backend"] == "poll"
            watch_id = start["exec_id"]
            assert start["watch_id"] == watch_id
            await put(sb, "one.txt", "1")
            assert (await _event(ws))["path"] == "one.txt"
            await ws.send_json({"id": 2, "op": "exec.list"})
            assert (await ws.receive_json())["result"]["execs"] == [], "a watch is no exec"
        await put(sb, "two.txt", "2")  # while nobody is connected
        async with http.ws_connect(url, headers=headers) as ws:
            await ws.send_json({"id": 5, "op": "exec.attach", "tag": "src", "from_seq": 2})
            reply = await ws.receive_json()
            assert reply["result"] == {"exec_id": watch_id, "first_seq": 2, "lost": None}
            two = await _event(ws)
            assert (two["id"], two["seq"], two["change"], two["path"]) == (5, 2, "created", "two.txt")
            for bad in ({"exec_id": watch_id, "data": "eA=="},):
                await ws.send_json({"id": 6, "op": "exec.input", **bad})
                assert (await _reply(ws, 6))["error"]["code"] == "not_found", "a watch takes no exec ops"
            await ws.send_json({"id": 7, "op": "fs.unwatch", "tag": "src"})
            messages = [await ws.receive_json(), await ws.receive_json()]
            assert {"id": 7, "result": {}} in messages
            end = next(m for m in messages if m.get("ev") == "end")
            assert end["id"] == 5 and "error" not in end
            await ws.send_json({"id": 8, "op": "fs.unwatch", "watch_id": watch_id})
            assert (await _reply(ws, 8))["result"] == {}, "stopping a stopped watch is no error"
            await ws.send_json({"id": 9, "op": "fs.unwatch", "watch_id": "nope"})
            assert (await _reply(ws, 9))["error"]["code"] == "not_found"


async def _event(ws: Any) -> dict[str, Any]:
    while (message := await ws.receive_json()).get("ev") in ("keepalive", None):
        pass
    return message  # type: ignore[no-any-return]


async def _reply(ws: Any, rid: int) -> dict[str, Any]:
    while (message := await ws.receive_json()).get("id") != rid or "ev" in message:
        pass
    return message  # type: ignore[no-any-return]
