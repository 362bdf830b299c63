"""The WASM runtime through the real gateway: conformance, then what is particular to WASM."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.conformance import (
    AUTH,
    JSON,
    Gateway,
    GatewayFixtures,
    RequestFailed,
    RuntimeConformance,
    output,
)
from gateway.web.app import MANAGER

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]


class TestWasmConformance(RuntimeConformance):
    runtime = "wasm"
    watch_backend = "poll"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


class TestWasmRuntime(GatewayFixtures):
    """WASM's own tests, on the conformance suite's fixtures."""

    runtime = "wasm"

    async def test_capabilities_are_honest(self, sandbox: dict[str, Any]) -> None:
        caps = set(sandbox["capabilities"])
        assert {"exec.python", "exec.javascript", "fs", "metrics"} <= caps
        assert not caps & {"exec.process", "exec.pty", "exec.signal", "exec.concurrent"}

    async def test_warm_pool_serves_creates_and_refills(self, gateway: Gateway) -> None:
        pool = gateway.client.app[MANAGER].runtimes["wasm"].pool
        await asyncio.wait_for(pool.wait_full(), 60)
        pooled = list(pool.ready)
        sandbox = await gateway.create()
        backend = gateway.client.app[MANAGER].get("tenant-a", sandbox["id"]).backend
        assert backend is pooled[0], "a create with default limits takes a ready launcher"
        await asyncio.wait_for(pool.wait_full(), 60)
        assert len(pool.ready) == pool.size and backend not in pool.ready
        custom = await gateway.create(memory_mb=128)
        assert gateway.client.app[MANAGER].get("tenant-a", custom["id"]).backend not in pooled, "other limits: cold"
        done = await gateway.exec(sandbox["id"], language="python", code="print('warm')")
        assert done["stdout"] == "warm\n"

    async def test_javascript_one_shot(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], language="javascript",
                                  code="console.log([1, 2, 3].map(x => x * 2).join(','))")
        assert done["exit_code"] == 0 and done["stdout"] == "2,4,6\n", done
        failed = await gateway.exec(sandbox["id"], language="javascript", code="throw new Error('nope')")
        assert failed["exit_code"] == 1 and "nope" in failed["stderr"]
        echoed = await gateway.exec(sandbox["id"], language="javascript", stdin="from stdin",
                                    code="console.log(std.in.readAsString().toUpperCase())")
        assert echoed["stdout"] == "FROM STDIN\n", echoed

    async def test_destroy_leaves_no_process_or_directory(self, gateway: Gateway) -> None:
        sandbox = await gateway.create()
        manager = gateway.client.app[MANAGER]
        backend = manager.get("tenant-a", sandbox["id"]).backend
        pid, work = backend.launcher.proc.pid, backend.host_root
        assert _alive(pid) and work.is_dir()
        await gateway.exec(sandbox["id"], language="python", code="open('/work/f', 'w').write('x')")
        resp = await gateway.client.delete(f"/v1/sandboxes/{sandbox['id']}", headers=AUTH)
        assert resp.status == 204
        assert not _alive(pid) and not work.exists()

    async def test_only_work_is_writable_and_symlinks_refused(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        code = (
            "import os\n"
            "for p in ('/sandgate/x', '/usr/local/lib/x', '/x'):\n"
            "    try:\n        open(p, 'w')\n        print('WROTE', p)\n"
            "    except OSError as e:\n        print('refused', p)\n"
            "try:\n    os.symlink('../../../etc', '/work/escape')\n    print('LINKED')\n"
            "except OSError:\n    print('no symlink')\n"
        )
        done = await gateway.exec(sandbox["id"], language="python", code=code)
        assert "WROTE" not in done["stdout"] and "LINKED" not in done["stdout"], done
        assert done["stdout"].count("refused") == 3 and "no symlink" in done["stdout"]

    async def test_guest_killed_mid_exec_ends_stream_and_sandbox_recovers(
        self, gateway: Gateway, sandbox: dict[str, Any]
    ) -> None:
        ws = await gateway.ws(sandbox["id"])
        request_id = await ws.send("exec.start", language="python",
                                   code="import time\nprint('started', flush=True)\ntime.sleep(600)")
        events = [await ws.receive_for(request_id) for _ in range(2)]
        assert events[1]["ev"] == "data" and events[1]["data"] == b"started\n"
        backend = gateway.client.app[MANAGER].get("tenant-a", sandbox["id"]).backend
        pid = backend.launcher.proc.pid
        os.kill(pid, 9)
        end = await ws.receive_for(request_id)
        assert end["ev"] == "end" and end["error"]["code"] == "guest_died", end
        after = await gateway.exec(sandbox["id"], language="python", code="print('back')")
        assert after["stdout"] == "back\n", "the runtime restarted the agent; files are kept"

    async def test_guest_writing_garbage_to_the_channel_is_contained(
        self, gateway: Gateway, sandbox: dict[str, Any]
    ) -> None:
        # Untrusted code bypasses the agent and writes a frame header announcing 4 GiB.
        done = await gateway.exec(sandbox["id"], language="python",
                                  code="import os\nos.write(1, b'\\xff\\xff\\xff\\xff' + b'x' * 100)\nimport time\n"
                                       "time.sleep(600)", timeout=60)
        assert done["error"]["code"] == "guest_protocol", done
        after = await gateway.exec(sandbox["id"], language="python", code="print('still serving')")
        assert after["stdout"] == "still serving\n"

    async def test_memory_bomb_is_contained(self, gateway: Gateway) -> None:
        sandbox = await gateway.create(memory_mb=64)
        done = await gateway.exec(sandbox["id"], language="python",
                                  code="blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 20))")
        assert done["exit_code"] != 0 and ("MemoryError" in done["stderr"] or "error" in done), done
        after = await gateway.exec(sandbox["id"], language="python", code="print(sum(range(10)))")
        assert after["stdout"] == "45\n"

    async def test_cpu_budget_stops_a_spinning_guest(self, gateway: Gateway) -> None:
        sandbox = await gateway.create(cpu_seconds=1)
        done = await gateway.exec(sandbox["id"], language="python", code="while True: pass", timeout=120)
        assert done["error"]["code"] == "guest_died" and "cpu_limit" in done["error"]["message"], done

    async def test_deep_recursion_does_not_kill_the_launcher(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        managed = gateway.client.app[MANAGER].get("tenant-a", sandbox["id"])
        launcher = managed.backend.launcher
        done = await gateway.exec(sandbox["id"], language="python",
                                  code="import sys\nsys.setrecursionlimit(10**6)\ndef f(n): return f(n + 1)\nf(0)")
        assert done["exit_code"] != 0
        # Two outcomes are right: CPython stops with RecursionError, or the wasm stack overflows
        # (while recursing, or while freeing the frames after the exec reported) and wasmtime
        # traps; the launcher then exits with its stack_overflow code. A SIGSEGV never is.
        probe = await gateway.exec(sandbox["id"], language="python", code="print('alive')")
        if probe.get("error"):
            assert "stack_overflow" in probe["error"]["message"], probe["error"]
            assert launcher.proc.returncode == 114
            probe = await gateway.exec(sandbox["id"], language="python", code="print('alive')")
        assert probe["stdout"] == "alive\n", probe.get("error")
        assert launcher.proc.returncode in (None, 114)

    async def test_busy_agent_refuses_other_ops_clearly(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        ws = await gateway.ws(sandbox["id"])
        request_id = await ws.send("exec.start", language="python", stdin_open=True,
                                   code="import sys\nprint('got', sys.stdin.readline().strip())")
        assert (await ws.receive_for(request_id))["ev"] == "start"
        with pytest.raises(RequestFailed) as busy:
            await ws.call("fs.list", path=".")
        assert busy.value.code == "busy" and busy.value.error["retryable"] is True
        await ws.call("exec.input", tag=None, exec_id="e1", data=b"typed line\n")
        events = await ws.collect(request_id)
        assert output(events) == b"got typed line\n"

    async def test_signal_stops_a_running_exec(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        ws = await gateway.ws(sandbox["id"])
        request_id = await ws.send("exec.start", language="python", code="while True: pass")
        start = await ws.receive_for(request_id)
        await ws.call("exec.signal", exec_id=start["exec_id"], signal="SIGINT")
        end = await ws.receive_for(request_id)
        assert end["ev"] == "end" and end["error"]["code"] == "guest_died"
        with pytest.raises(RequestFailed) as unsupported:
            request_id = await ws.send("exec.start", language="python", code="input()", stdin_open=True)
            start = await ws.receive_for(request_id)
            await ws.call("exec.signal", exec_id=start["exec_id"], signal="SIGUSR1")
        assert unsupported.value.code == "unsupported"


class TestLifecycle(GatewayFixtures):
    runtime = "wasm"

    async def test_idle_reaper_and_activity(self, gateway: Gateway) -> None:
        manager = gateway.client.app[MANAGER]
        watched = await gateway.create(idle_timeout=50, ttl=1000)
        idle = await gateway.create(idle_timeout=50, ttl=1000)
        assert await manager.reap(time.monotonic() + 10) == []
        ws = await gateway.ws(watched["id"], JSON)
        await ws.call("ping")
        assert await manager.reap(time.monotonic() + 60) == [idle["id"]], "an open session is activity"

    async def test_ttl_is_absolute_and_connecting_does_not_extend_it(self, gateway: Gateway) -> None:
        manager = gateway.client.app[MANAGER]
        sandbox = await gateway.create(ttl=100, idle_timeout=1000)
        ws = await gateway.ws(sandbox["id"], JSON)
        info = await ws.call("sandbox.info")
        assert info["expires_at"] == sandbox["expires_at"]
        assert await manager.reap(time.monotonic() + 101) == [sandbox["id"]]
        msg = await ws.ws.receive()
        assert msg.data == 4404
