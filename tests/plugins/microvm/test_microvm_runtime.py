"""The microVM runtime through the real gateway: real QEMU (TCG here), a real Linux guest.

One template snapshot serves the session (built by the `microvm_image` fixture or the first
runtime start); each test's gateway keeps a warm pool of one clone, so few VMs run at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.conformance import (
    AUTH,
    MSGPACK,
    Gateway,
    GatewayFixtures,
    RuntimeConformance,
    output,
)
from gateway.web.app import MANAGER

pytestmark = [pytest.mark.microvm, pytest.mark.usefixtures("microvm_image")]

CONFIG = {"pool_size": 1}


class TestMicrovmConformance(RuntimeConformance):
    runtime = "microvm"
    watch_backend = "inotify"
    runtime_config = CONFIG
    whole_file_system = True


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "zombie" not in status


def _backend(gateway: Gateway, sandbox_id: str) -> Any:
    manager = gateway.client.app[MANAGER]
    return manager._sandboxes[sandbox_id].backend


class TestMicrovm(GatewayFixtures):
    runtime = "microvm"
    runtime_config = CONFIG

    async def test_done_when(self, gateway: Gateway, tmp_path: Path) -> None:
        """The issue's acceptance: command with exit code, Python, files both ways, a PTY over the
        WebSocket, and a destroy that leaves no process, socket or file behind."""
        sandbox = await gateway.create()
        sid = sandbox["id"]
        caps = set(sandbox["capabilities"])
        assert {"exec.process", "exec.pty", "exec.signal", "exec.concurrent", "guest.setup"} <= caps
        done = await gateway.exec(sid, command=["sh", "-c", "echo hi; exit 5"])
        assert (done["exit_code"], done["stdout"]) == (5, "hi\n")
        py = await gateway.exec(sid, language="python", code="import platform; print(platform.system())")
        assert py["stdout"] == "Linux\n"

        payload = os.urandom(3 << 20)
        resp = await gateway.client.put(f"/v1/sandboxes/{sid}/files/data/in.bin", data=io.BytesIO(payload),
                                        headers=AUTH)
        assert resp.status in (200, 201), await resp.text()
        digest = await gateway.exec(sid, command="sha256sum data/in.bin | cut -d' ' -f1; cp data/in.bin out.bin")

        assert digest["stdout"].strip() == hashlib.sha256(payload).hexdigest()
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/files/out.bin", headers=AUTH)
        assert resp.status == 200 and await resp.read() == payload

        ws = await gateway.ws(sid, MSGPACK)
        rid = await ws.send("exec.start", command=["sh"], pty={"rows": 24, "cols": 80}, stdin_open=True, tag="tty")
        start = await ws.receive_for(rid)
        assert start["ev"] == "start"
        await ws.call("exec.resize", tag="tty", rows=40, cols=100)
        await ws.call("exec.input", tag="tty", data=b"stty size; echo $((6*7)); exit 3\n")
        events = [start, *await ws.collect(rid)]
        screen = output(events, "pty").replace(b"\r\n", b"\n")
        assert b"40 100\n" in screen and b"42\n" in screen, screen
        assert events[-1]["exit_code"] == 3
        await ws.ws.close()

        backend = _backend(gateway, sid)
        qemu_pid = backend.vm.proc.pid
        workdir = backend.vm.workdir
        assert _alive(qemu_pid) and workdir.is_dir()
        resp = await gateway.client.delete(f"/v1/sandboxes/{sid}", headers=AUTH)
        assert resp.status == 204
        assert not _alive(qemu_pid) and not workdir.exists()
        assert not await asyncio.to_thread(_open_files_under, workdir), "no process holds a file of the VM"

    async def test_signals(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        ws = await gateway.ws(sandbox["id"], MSGPACK)
        rid = await ws.send("exec.start", command="trap 'echo got USR1; exit 7' USR1; echo ready; "
                                                  "while :; do sleep 0.05; done", tag="trap")
        while True:
            event = await ws.receive_for(rid)
            if event.get("ev") == "data" and b"ready" in event["data"]:
                break
        await ws.call("exec.signal", tag="trap", signal="SIGUSR1")
        events = await ws.collect(rid)
        assert b"got USR1" in output(events) and events[-1]["exit_code"] == 7
        rid = await ws.send("exec.start", command=["sleep", "30"], tag="sleeper")
        assert (await ws.receive_for(rid))["ev"] == "start"
        await ws.call("exec.signal", tag="sleeper", signal="SIGTERM")
        events = await ws.collect(rid)
        assert events[-1]["signal"] == "SIGTERM" and events[-1]["exit_code"] is None

    async def test_bombs_leave_everything_responsive(self, gateway: Gateway) -> None:
        """A fork bomb, a memory bomb and an output flood, one after the other in one VM: each is
        stopped inside the VM, the gateway and another VM answer while it rages, and the bombed VM
        is usable afterwards with no bomb process left."""
        bombed, other = await gateway.create(), await gateway.create()

        async def while_raging(bomb: Any) -> dict[str, Any]:
            task = asyncio.create_task(bomb)
            while not task.done():  # the other VM and the gateway answer all along
                ok = await gateway.exec(other["id"], command="echo fine")
                assert ok["stdout"] == "fine\n"
                assert (await gateway.client.get("/healthz")).status == 200
                await asyncio.wait({task}, timeout=0.5)
            return task.result()  # type: ignore[no-any-return]

        fork = await while_raging(gateway.exec(bombed["id"], command="b() { b | b & }; b; sleep 30", timeout=5))
        assert fork["error"]["code"] == "timeout", fork
        memory = await while_raging(gateway.exec(
            bombed["id"], command=["python3", "-c", "x = []\nwhile True: x.append(bytearray(1 << 20))"], timeout=60))
        assert memory["signal"] == "SIGKILL", memory  # the OOM killer, inside the sandbox's cgroup
        flood = await while_raging(gateway.exec(bombed["id"], command="yes flood", timeout=3))
        assert flood["error"]["code"] == "timeout" and flood["stdout"].startswith("flood\n")
        left = await gateway.exec(bombed["id"], command="cat /sys/fs/cgroup/sandbox/cgroup.procs")
        assert len(left["stdout"].split()) == 1, "only the `cat` itself: every bomb process was killed"
        assert _backend(gateway, bombed["id"]).vm.exited.done() is False

    async def test_restart_ends_a_busy_agent(self, gateway: Gateway) -> None:
        """What the exec watchdog does when the agent's own `end` is late (a loaded host): restart
        the agent while it is alive and busy. The old agent and all it started end, and nothing
        of it reaches the new agent's connection (#19: its output did, and the restart failed
        the sandbox)."""
        sandbox = await gateway.create()
        sid = sandbox["id"]
        ws = await gateway.ws(sid, MSGPACK)
        rid = await ws.send("exec.start", command="yes flood", tag="flood")
        while (await ws.receive_for(rid)).get("ev") != "data":
            pass
        manager = gateway.client.app[MANAGER]
        record = manager._sandboxes[sid]
        await manager.restart_agent(record, record.agent)
        end = (await ws.collect(rid))[-1]
        assert end["error"]["code"] == "guest_died", end
        left = await gateway.exec(sid, command="cat /sys/fs/cgroup/sandbox/cgroup.procs")
        assert len(left["stdout"].split()) == 1, "only the `cat` itself: the flood was killed"
        assert (record.state, record.restarts) == ("running", 1)

    async def test_clones_are_isolated(self, gateway: Gateway) -> None:
        a, b = await gateway.create(), await gateway.create()
        await gateway.exec(a["id"], command="echo mine > secret.txt")
        seen = await gateway.exec(b["id"], command="ls")
        assert "secret.txt" not in seen["stdout"]
        probe = ("import os, random, time; print(int(time.time())); print(os.urandom(16).hex()); "
                 "print(random.random())")
        ra = (await gateway.exec(a["id"], command=["python3", "-c", probe]))["stdout"].split()
        rb = (await gateway.exec(b["id"], command=["python3", "-c", probe]))["stdout"].split()
        pa = (await gateway.exec(a["id"], language="python", code="import random; print(random.random())"))
        pb = (await gateway.exec(b["id"], language="python", code="import random; print(random.random())"))
        now = time.time()
        for clock in (int(ra[0]), int(rb[0])):
            assert abs(clock - now) < 30, "the clone's clock was set at hand-out"
        assert ra[1] != rb[1] and ra[2] != rb[2], "each clone draws its own random numbers"
        assert pa["stdout"] != pb["stdout"], "the agent's own Python was reseeded too"
        kinds = {_backend(gateway, s["id"]).vm.boot.kind for s in (a, b)}
        assert kinds == {"clone"}, kinds

    async def test_agent_death_is_survived(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        await gateway.exec(sid, command="echo kept > kept.txt")
        resp = await gateway.client.post(f"/v1/sandboxes/{sid}/exec", headers=AUTH,
                                         json={"command": "kill -9 $PPID; sleep 5"})
        assert resp.status == 200
        died = await resp.json()
        assert died["error"]["code"] == "guest_died", died
        after = await gateway.exec(sid, command="cat kept.txt")
        assert after["stdout"] == "kept\n", "files survive an agent restart"

    async def test_metrics_and_limits(self, gateway: Gateway) -> None:
        sandbox = await gateway.create(disk_mb=64)
        sid = sandbox["id"]
        resp = await gateway.client.get(f"/v1/sandboxes/{sid}/metrics", headers=AUTH)
        metrics = await resp.json()
        host = metrics["host"]
        assert host["rss_bytes"] > 0 and host["pss_bytes"] > 0 and host["accel"] in ("kvm", "tcg")
        assert metrics["guest"]["memory_bytes"] > 0
        full = await gateway.exec(sid, command="head -c 80M /dev/zero > big; echo $?")
        assert full["stdout"].strip() != "0", "the 64 MB disk quota stops the write"
        net = await gateway.exec(sid, command="ls /sys/class/net")
        assert net["stdout"].split() == ["lo"], "no network device unless asked"

    @pytest.mark.usefixtures("microvm_full_image")
    async def test_full_template_has_node_bash_and_gcc(self, gateway: Gateway) -> None:
        sandbox = await gateway.create(template="full")
        sid = sandbox["id"]
        assert _backend(gateway, sid).vm.boot.kind == "clone"
        node = await gateway.exec(sid, command=["node", "-e", "console.log(6 * 7)"])
        assert node["stdout"] == "42\n", node
        bash = await gateway.exec(sid, command=["bash", "-c", "echo ${BASH_VERSION%%.*}"])
        assert int(bash["stdout"]) >= 5
        await gateway.exec(sid, command="printf '#include <stdio.h>\\nint main(){puts(\"compiled\");}' > m.c")
        built = await gateway.exec(sid, command="gcc -o m m.c && ./m", timeout=120)
        assert built["stdout"] == "compiled\n", built
        py = await gateway.exec(sid, language="python", code="import ssl; print('ssl ok')")
        assert py["stdout"] == "ssl ok\n"
        root = await gateway.exec(sid, command="echo x > /usr/local/x && cat /usr/local/x")
        assert root["stdout"] == "x\n", "the read-only disk has a private writable overlay"

    async def test_cold_boot_for_other_memory(self, gateway: Gateway) -> None:
        sandbox = await gateway.create(memory_mb=320)
        backend = _backend(gateway, sandbox["id"])
        assert backend.vm.boot.kind == "cold"
        done = await gateway.exec(sandbox["id"], command="grep MemTotal /proc/meminfo")
        assert int(done["stdout"].split()[1]) > 256 * 1024


def _open_files_under(folder: Path) -> list[str]:
    found = []
    for fd_link in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd_link)
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(f"{fd_link}: {target}")
    return found
