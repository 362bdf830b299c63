"""One QEMU `microvm` process: its command line, the guest agent's socket, its QMP monitor.

The agent's virtio-serial port, the guest init's control port and the QMP monitor are socket
chardevs over socketpairs made before QEMU starts (QEMU gets one end of each): nothing to poll for,
nothing on the file system, and the ports are connected from the first instant, which matters for
clones: a port that looked unplugged while a clone's state loads would make its reader in the
guest read end-of-input and exit. An agent restart goes through the guest's init (`replace_agent`).

QEMU dies with the gateway (PR_SET_PDEATHSIG), so a crashed gateway leaves no VM running.
A VM with a network reaches only the gateway's egress proxy (egress.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.egress import dns, proxy
from gateway.egress.handoff import HandoffListener
from gateway.egress.network import SandboxNetwork
from gateway.runtime.agent_client import call_once
from gateway.runtime.base import ByteChannel, StreamChannel
from gateway.storage.volumes import VolumeMount
from guest_agent.wire import ProtocolError
from plugins.microvm import egress
from plugins.microvm.accel import Accel
from plugins.microvm.images.cache import BootImage

# qemu.qmp logs every monitor connection's end at INFO: one line per VM destroyed, noise in a gateway.
logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
T = TypeVar("T")

AGENT_PORT = "sandgate.agent"
#: The port the guest's init takes the host's requests on, one a line: `restart` (kill the agent
#: and every sandbox process) and `start` (start the next agent). guest/init reads it.
CONTROL_PORT = "sandgate.control"
#: Bump when the devices `Machine.argv` gives a VM change: a snapshot fits only the same devices.
DEVICE_LAYOUT = 3
PR_SET_PDEATHSIG = 1
#: Loading a snapshot takes ~30 ms (clone) to ~1 s (full restore); past this something is wrong.
INCOMING_TIMEOUT_S = 30.0
#: How much of QEMU's stderr and of the guest console is kept for error messages.
TAIL_BYTES = 4096
#: The guest kernel's command line is cut at 2048 bytes on x86 (COMMAND_LINE_SIZE).
CMDLINE_MAX = 2047
#: Bytes of a volume's mount path that go on the kernel command line as they are; the others
#: as %XX (the guest's init decodes them), so a path with spaces or `%` stays one argument.
_PATH_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-")


def volume_serial(index: int) -> str:
    """The virtio-blk serial of a VM's `index`th volume disk: how its init finds the disk (the
    guest's vdX names follow probe order, which the host does not choose)."""
    return f"sgvol{index}"


def encode_path(path: str) -> str:
    """`path` for the kernel command line: %XX for every byte but [A-Za-z0-9/._-]."""
    return "".join(chr(b) if b in _PATH_PLAIN else f"%{b:02X}" for b in path.encode())


@dataclass(frozen=True)
class Boot:
    """How a VM starts: from its kernel (cold), or from a migration stream (restore)."""

    #: Guest RAM in this file instead of anonymous memory. `share=True` writes go to the file (a
    #: template being made); False maps it copy-on-write (a clone of that template).
    ram_file: Path | None = None
    share: bool = False
    #: A migration stream to load instead of booting the kernel.
    incoming: Path | None = None
    #: The stream leaves out RAM in `ram_file` (migration capability x-ignore-shared).
    ignore_shared: bool = False
    #: Stay stopped once loaded or booted (QEMU's -S), until QMP `cont`.
    paused: bool = False

    @property
    def kind(self) -> str:
        if self.incoming is None:
            return "cold"
        return "clone" if self.ignore_shared else "restore"


@dataclass(frozen=True)
class Machine:
    """What every VM of one kind has; a snapshot fits only a VM with the same Machine."""

    qemu: str
    image: BootImage
    accel: Accel
    memory_mb: int
    vcpus: int
    network: bool
    tsc_khz: int
    #: Named volumes, each a virtio-blk disk (the image `VolumeMount.source`) that the guest's
    #: init mounts before its agent starts. A VM with volumes boots cold: no snapshot has the disks.
    volumes: tuple[VolumeMount, ...] = ()

    def kernel_cmdline(self) -> str:
        # No disk size here: `guest.setup` sizes /work per sandbox, so one snapshot fits every size.
        # sandgate.control=1: the init waits for the control port and starts agents when told to.
        parts = [self.image.cmdline, "console=ttyS0", "quiet", "panic=-1", "sandgate.control=1"]
        if self.accel.name == "tcg":
            # Without it the kernel hangs calibrating a TSC that TCG does not tick like hardware.
            parts.append(f"tsc_early_khz={self.tsc_khz}")
        if self.network:
            parts += ["sandgate.net=1", egress.kernel_argument()]
        for index, volume in enumerate(self.volumes):
            mode = "ro" if volume.readonly else "rw"
            parts.append(f"sandgate.vol={volume_serial(index)},{mode},{encode_path(volume.path)}")
        cmdline = " ".join(p for p in parts if p)
        if len(cmdline) > CMDLINE_MAX:
            raise ProtocolError("bad_request", "the volumes' mount paths are too long for a microVM (the kernel "
                                               "command line holds 2 KiB): choose shorter paths")
        return cmdline

    def argv(self, boot: Boot, *, agent_fd: int, control_fd: int, qmp_fd: int, incoming_fd: int | None,
             console: Path, egress_socket: Path | None) -> list[str]:
        """QEMU's command line. `egress_socket`: the VM's `EgressListener` (a VM with a network)."""
        machine = "microvm,x-option-roms=off,memory-backend=ram"
        if boot.ram_file is not None:
            ram = (
                f"memory-backend-file,id=ram,size={self.memory_mb}M,mem-path={boot.ram_file},"
                f"share={'on' if boot.share else 'off'}"
            )
        else:
            ram = f"memory-backend-ram,id=ram,size={self.memory_mb}M"
        argv = [
            self.qemu,
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-M", machine,
            "-accel", self.accel.option,
            "-cpu", self.accel.cpu,
            "-m", f"{self.memory_mb}M",
            "-smp", str(self.vcpus),
            "-object", ram,
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", self.kernel_cmdline(),
            "-chardev", f"file,id=console,path={console}",
            "-serial", "chardev:console",
            "-device", "virtio-serial-device,max_ports=3",
            "-chardev", f"socket,id=agent,fd={agent_fd}",
            # The id makes QEMU report the guest opening and closing the port (VSERPORT_CHANGE).
            "-device", f"virtserialport,id=agent-port,chardev=agent,name={AGENT_PORT}",
            "-chardev", f"socket,id=control,fd={control_fd}",
            "-device", f"virtserialport,chardev=control,name={CONTROL_PORT}",
            "-chardev", f"socket,id=qmp,fd={qmp_fd}",
            "-mon", "chardev=qmp,mode=control",
        ]
        if self.image.rootfs is not None:
            argv += [
                "-drive", f"id=root,file={self.image.rootfs},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=root",
            ]
        for index, volume in enumerate(self.volumes):
            # cache=writeback: a write the guest flushed is in the host's page cache, which outlives
            # a killed QEMU, and the gateway's own loop mount of the image reads the same cache;
            # aio=threads works with it on every host file system (native needs O_DIRECT).
            # readonly=on for a read-only mount: the guest cannot write the image even if it tries.
            # A comma in the image's path would end QEMU's option: the store names images
            # <volume id>.ext4 in the gateway's own folder, which has none.
            if "," in volume.source:
                raise ProtocolError("internal", f"volume image path {volume.source!r} has a comma")
            drive = f"id=vol{index},file={volume.source},format=raw,if=none,cache=writeback,aio=threads"
            if volume.readonly:
                drive += ",readonly=on"
            argv += ["-drive", drive, "-device", f"virtio-blk-device,drive=vol{index},serial={volume_serial(index)}"]
        if self.network:
            if egress_socket is None:
                raise ValueError("a VM with a network needs its egress listener's socket")
            # Restricted user networking: the guest reaches the egress proxy and nothing else.
            argv += ["-netdev", egress.netdev(egress_socket), "-device", "virtio-net-device,netdev=net0"]
        if boot.paused:
            argv.append("-S")
        if incoming_fd is not None:
            argv += ["-incoming", "defer"]  # `Vm._spawn` sets the capabilities, then starts the load
        return argv


def _die_with_parent() -> None:
    """preexec_fn: the VM gets SIGKILL when the gateway dies, whatever killed the gateway."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Vm:
    """A running QEMU process. Made by `Vm.start`; `kill` ends it and removes its folder's files."""

    def __init__(self, machine: Machine, workdir: Path, boot: Boot, network: SandboxNetwork | None = None) -> None:
        if machine.network and network is None:
            raise ValueError("a VM with a network needs the sandbox's network (its policy)")
        self.machine = machine
        self.workdir = workdir
        self.boot = boot
        self.network = network
        self.console = workdir / "console.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail = bytearray()
        self._qmp_sock: socket.socket | None = None
        self._control: socket.socket | None = None
        self._qmp: Any = None
        self._events_task: asyncio.Task[None] | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._reap_task: asyncio.Task[None] | None = None
        self._channel: StreamChannel | None = None
        self._egress: HandoffListener | None = None
        #: Called with True/False when the guest opens/closes the agent's port (QMP
        #: VSERPORT_CHANGE): the agent started, or died or exited.
        self.on_port_change: Callable[[bool], None] = lambda is_open: None
        #: Whether the guest holds the agent's port open, as VSERPORT_CHANGE last said. A restored
        #: VM holds it from the start: its template's agent had it open when it was saved.
        self.port_open = boot.incoming is not None
        self._port_changed = asyncio.Event()
        self.exited: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._migration_status: str | None = None
        self._migration_changed = asyncio.Event()

    @classmethod
    async def start(cls, machine: Machine, workdir: Path, boot: Boot, network: SandboxNetwork | None = None) -> Vm:
        vm = cls(machine, workdir, boot, network)
        try:
            await vm._spawn()
        except BaseException:
            await vm.kill()
            raise
        return vm

    async def _spawn(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        agent_ours, agent_theirs = socket.socketpair()
        control_ours, control_theirs = socket.socketpair()
        qmp_ours, qmp_theirs = socket.socketpair()
        control_ours.setblocking(False)
        self._control = control_ours
        self._qmp_sock = qmp_ours
        incoming_fd = None
        try:
            await self._attach_agent(agent_ours)  # first: from here on `kill` closes every "ours"
            if self.network is not None:
                network = self.network
                self._egress = HandoffListener.bind(self.workdir / "egress.sock", network.sandbox_id, {
                    egress.PROXY_KIND: lambda reader, writer: proxy.handle(reader, writer, lambda _request: network),
                    egress.DNS_KIND: lambda reader, writer: dns.serve_tcp(reader, writer, network),
                })
                self._egress.start()
            if self.boot.incoming is not None:
                incoming_fd = os.open(self.boot.incoming, os.O_RDONLY | os.O_CLOEXEC)
            fds = [agent_theirs.fileno(), control_theirs.fileno(), qmp_theirs.fileno(),
                   *([incoming_fd] if incoming_fd is not None else [])]
            argv = self.machine.argv(
                self.boot,
                agent_fd=agent_theirs.fileno(),
                control_fd=control_theirs.fileno(),
                qmp_fd=qmp_theirs.fileno(),
                incoming_fd=incoming_fd,
                console=self.console,
                egress_socket=Path(self._egress.sock.getsockname()) if self._egress is not None else None,
            )
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=fds,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        finally:
            agent_theirs.close()
            control_theirs.close()
            qmp_theirs.close()
            if incoming_fd is not None:
                os.close(incoming_fd)
        assert self.proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._drain_stderr(self.proc.stderr))
        self._reap_task = asyncio.create_task(self._reap())
        await self._unless_exited(self._connect_qmp())
        if incoming_fd is not None:
            # QEMU 7.2 takes migration capabilities only over QMP, before the load starts.
            await self.prepare_migration(ignore_shared=self.boot.ignore_shared)
            await self.qmp("migrate-incoming", uri=f"fd:{incoming_fd}")
            await self.wait_migration(INCOMING_TIMEOUT_S)
            if not self.boot.paused:
                # Snapshots are taken of stopped VMs, and a loaded VM keeps its source's run state.
                await self.qmp("cont")

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            self.stderr_tail += chunk
            del self.stderr_tail[:-TAIL_BYTES]

    async def _reap(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task
        if not self.exited.done():
            self.exited.set_result(self.exit_reason(code))

    def exit_reason(self, code: int) -> str:
        """Why QEMU exited, with the end of its stderr or of the guest console."""
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        detail = self.stderr_tail.decode(errors="replace").strip()
        if not detail:
            detail = self.console_tail()
        return f"QEMU {how}" + (f": {detail[-800:]}" if detail else "")

    def console_tail(self) -> str:
        try:
            with open(self.console, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    async def _connect_qmp(self) -> None:
        from qemu.qmp import QMPClient

        assert self._qmp_sock is not None
        qmp = QMPClient(f"vm-{self.workdir.name}")
        self._qmp = qmp
        self._events_task = asyncio.create_task(self._watch_events(qmp))
        await qmp.connect(self._qmp_sock)

    async def _watch_events(self, qmp: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            async for event in qmp.events:
                if event["event"] == "MIGRATION":
                    self._migration_status = event["data"]["status"]
                    self._migration_changed.set()
                elif event["event"] == "VSERPORT_CHANGE":  # only the agent's port has an id
                    self.port_open = bool(event["data"].get("open"))
                    self._port_changed.set()
                    self.on_port_change(self.port_open)

    async def qmp(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command; a QEMU error becomes ProtocolError('internal')."""
        from qemu.qmp import ExecuteError

        try:
            return await self._qmp.execute(command, arguments or None)
        except ExecuteError as exc:
            raise ProtocolError("internal", f"QEMU refused {command}: {exc}") from None

    # -- the agent's channel -------------------------------------------------------------------

    async def _attach_agent(self, sock: socket.socket) -> None:
        try:
            if self._channel is not None:
                await self._channel.close()
                self._channel = None
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        except BaseException:
            sock.close()  # cut short before a channel took it (close is idempotent)
            raise
        self._channel = StreamChannel(reader, writer)

    def abort_agent_channel(self) -> None:
        """Close our end of the agent's port now (its reader sees end of input)."""
        if self._channel is not None:
            self._channel.abort()

    def channel(self) -> ByteChannel:
        if self._channel is None:
            raise ProtocolError("guest_died", "the VM's agent is not connected")
        return self._channel

    async def replace_agent(self, timeout: float) -> None:
        """End the guest's agent and every sandbox process, and give the next agent a fresh
        connection. The guest's init kills them (`restart`) and starts no agent until `start`:
        once the guest has closed the agent's port, nothing of the old agent is left to write,
        a fresh socketpair goes in (`chardev-change`, which drops what QEMU held of the old
        connection), and the next agent opens the port with the host already connected.

        Nothing here waits on the old agent's cooperation. Ending it by closing the connection
        (it reads end of input and exits) is not enough: `chardev-change` tells the guest "host
        closed" and "host open" back to back, the guest's driver takes both in one go when it
        next runs, and a reader blocked in read wakes to a connected port with nothing to read.
        On a busy host that is what happens, the old agent lives on, and its last events (the
        `end` of an exec it killed) arrive on the new connection. Kept disconnected instead, an
        agent can still hang: writes to a disconnected port block, and its shutdown waits on
        threads blocked in them.

        Raises:
            ProtocolError: `unavailable` when the port is still held after `timeout`, or QEMU
                exited.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._tell_init("restart")
                while self.port_open:
                    self._port_changed.clear()
                    await self._unless_exited(self._port_changed.wait())
        except TimeoutError:
            raise ProtocolError("unavailable", f"the agent's port was still held {timeout:.0f}s after the guest "
                                               f"was told to restart it: {self.console_tail()[-800:]}") from None
        ours, theirs = socket.socketpair()
        try:
            try:
                self.send_fd(theirs.fileno())
                await self.qmp("getfd", fdname="agent")
            finally:
                theirs.close()
            await self._attach_agent(ours)
        except BaseException:
            # Cut short (the sandbox destroyed mid-restart) before a channel took `ours`.
            ours.close()
            raise
        await self.qmp(
            "chardev-change",
            id="agent",
            backend={"type": "socket", "data": {"addr": {"type": "fd", "data": {"str": "agent"}}, "server": False}},
        )
        await self._tell_init("start")

    async def flush_disks(self, timeout: float) -> None:
        """Have the guest write every dirty page to its disks (`sync`) and wait until it says so:
        what the guest wrote to a volume is then in the image (the host's page cache), and the VM
        can be killed. The guest may never answer (it is untrusted, or hung): then after `timeout`
        the caller kills it anyway and loses only what that guest left unwritten.

        Raises:
            TimeoutError: no answer within `timeout`.
            ProtocolError: QEMU exited, or the guest closed the control port.
        """
        assert self._control is not None
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await self._tell_init("flush")
            seen = b""
            while b"flushed\n" not in seen:
                chunk = await self._unless_exited(loop.sock_recv(self._control, 256))
                if not chunk:
                    raise ProtocolError("unavailable", "the guest closed its control port")
                seen = (seen + chunk)[-256:]

    async def _tell_init(self, request: str) -> None:
        """One request on the control port (CONTROL_PORT)."""
        assert self._control is not None
        await asyncio.get_running_loop().sock_sendall(self._control, f"{request}\n".encode())

    def send_fd(self, fd: int) -> None:
        """Pass `fd` to QEMU for the next QMP command that takes one (`getfd`)."""
        self._qmp.send_fd_scm(fd)

    async def call(self, op: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """One request on the agent's fresh connection, before the gateway's AgentClient owns it
        (the runtime's own ping and `guest.setup`). The agent says nothing unasked, so any other
        message here is a broken guest."""
        return await call_once(self.channel(), op, timeout, **fields)

    async def wait_agent(self, timeout: float) -> None:
        """Wait until the agent answers a ping, or raise with the reason. Bytes sent before the
        guest opens its port wait in the socket (QEMU reads none until then), so there is nothing
        to poll for, cold boot or clone alike."""
        try:
            async with asyncio.timeout(timeout):
                await self._unless_exited(self.call("ping", timeout))
        except TimeoutError:
            raise ProtocolError(
                "unavailable", f"the VM's agent did not answer within {timeout:.0f}s: {self.console_tail()[-800:]}"
            ) from None

    async def prepare_migration(self, *, ignore_shared: bool) -> None:
        """Set the capabilities of the next migration (saving or loading) and forget the last
        one's outcome. `events` makes QEMU report its progress (MIGRATION), which
        `wait_migration` waits on; `x-ignore-shared` leaves RAM in a shared file out."""
        await self.qmp("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True},
            {"capability": "x-ignore-shared", "state": ignore_shared},
        ])
        self._migration_status = None

    async def wait_migration(self, timeout: float) -> None:
        """Wait for the migration in progress (either way: saving or loading) to complete, from
        QMP's MIGRATION events; raise with QEMU's reason if it fails."""
        async with asyncio.timeout(timeout):
            while self._migration_status not in ("completed", "failed", "cancelled"):
                self._migration_changed.clear()
                await self._unless_exited(self._migration_changed.wait())
        if self._migration_status != "completed":
            info = await self.qmp("query-migrate")
            raise ProtocolError("unavailable", f"migration {self._migration_status}: {info.get('error-desc', '')}")

    async def _unless_exited(self, waiting: Coroutine[Any, Any, T]) -> T:
        """Await `waiting` unless QEMU exits first (then raise with its reason)."""
        task = asyncio.ensure_future(waiting)
        either: set[asyncio.Future[Any]] = {task, self.exited}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the caller is cancelled: never leave `waiting` running or unread
            if not task.done():
                task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if not task.done() or task.cancelled():
            raise ProtocolError("unavailable", self.exited.result())
        return task.result()

    # -- host-side figures -------------------------------------------------------------------------

    def cpu_seconds(self) -> float | None:
        if self.proc is None or self.proc.returncode is not None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def memory(self) -> Mapping[str, int]:
        """QEMU's RSS and PSS (PSS splits a clone's pages shared with the template fairly)."""
        figures: dict[str, int] = {}
        if self.proc is None or self.proc.returncode is not None:
            return figures
        try:
            with open(f"/proc/{self.proc.pid}/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    if key in ("Rss", "Pss"):
                        figures[f"{key.lower()}_bytes"] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return figures

    # -- the end -----------------------------------------------------------------------------------

    async def kill(self) -> None:
        """End QEMU (SIGKILL: the guest's state is thrown away anyway) and close every socket."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self._egress is not None:
            await self._egress.close()
            self._egress = None
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await self._qmp.disconnect()
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events_task
        if self._qmp_sock is not None:
            self._qmp_sock.close()
        if self._control is not None:
            self._control.close()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task
        if not self.exited.done():
            self.exited.set_result("killed")
