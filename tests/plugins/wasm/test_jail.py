"""The C/C++ compiler's jail attacked directly (plugins.wasm.jail), with what no exec can ask for:
the compiler's own command line, aimed at the network and at every place outside its scratch space."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.conformance import Gateway, GatewayFixtures
from plugins.wasm import cprograms, jail
from tests.plugins.wasm.ctoolchain import zig_cache

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("zig_cache")]
__all__ = ["zig_cache"]

HELLO = b"int main(void) { return 0; }\n"


async def jailed(argv: list[str], source: bytes = HELLO, **changes: Any) -> jail.JailResult:
    spec = dataclasses.replace(cprograms.compile_spec("c", jail.JailLimits(wall_s=30)), argv=argv, **changes)
    return await jail.run(spec, source, cprograms.jail_env())


def compile_argv(output: str) -> list[str]:
    return [f"{jail.TOOLCHAIN}/zig", *cprograms.DRIVER_FLAGS["c"], "-o", output, f"{jail.SRC_DIR}/main.c"]


async def test_a_plain_compile_works() -> None:
    result = await jailed(compile_argv(cprograms.OUTPUT))
    assert result.ok and result.output.startswith(b"\0asm"), result


#: A program for the jail without libc (raw x86_64 syscalls): connect to 127.0.0.1:PORT and exit
#: with the errno (0: connected).
CONNECT_PROBE = r"""
static long sys(long n, long a, long b, long c) {
    long r;
    __asm__ volatile ("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
struct sockaddr_in { unsigned short family, port; unsigned int addr; char zero[8]; };
__attribute__((force_align_arg_pointer)) void _start(void) {
    long fd = sys(41, 2, 1, 0);
    struct sockaddr_in a = {2, (unsigned short)((PORT >> 8) | ((PORT & 0xff) << 8)), 0x0100007f, {0}};
    long r = fd < 0 ? fd : sys(42, fd, (long)&a, sizeof a);
    sys(60, r < 0 ? -r : 0, 0, 0);
}
"""
ENETUNREACH = 101


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the connect probe is x86_64 assembly")
async def test_no_network_even_to_the_hosts_loopback(tmp_path: Path) -> None:
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    (tmp_path / "probe.c").write_text(CONNECT_PROBE)
    build = await asyncio.create_subprocess_exec(
        str(cprograms.toolchain_dir() / "zig"), "cc", "-target", "x86_64-linux-none", "-nostdlib", "-ffreestanding",
        "-static", "-O1", f"-DPORT={port}", "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c"),
        env={"ZIG_GLOBAL_CACHE_DIR": str(tmp_path / "cache"), "ZIG_LOCAL_CACHE_DIR": str(tmp_path / "cache")})
    assert await build.wait() == 0
    async with server:
        outside = await asyncio.create_subprocess_exec(str(tmp_path / "probe"))
        assert await outside.wait() == 0 and connections == 1, "the probe reaches the server from the host"
        # The same program as the jail's compiler: no network at all.
        result = await jailed([f"{jail.TOOLCHAIN}/probe"], toolchain_dir=str(tmp_path))
    assert (result.exit_code, connections) == (ENETUNREACH, 1), result


@pytest.mark.parametrize("output", [f"{jail.TOOLCHAIN}/evil.wasm", "/evil.wasm", f"{jail.TOOLCHAIN}/lib/evil.wasm",
                                    "/proc/evil.wasm", "/tmp/../evil.wasm"])
async def test_nothing_but_its_scratch_space_is_writable(output: str) -> None:
    result = await jailed(compile_argv(output))
    assert result.exit_code not in (0, None), result
    assert b"Read-only file system" in result.stderr or b"No such file" in result.stderr \
        or b"FileNotFound" in result.stderr, result.stderr
    assert not list(cprograms.toolchain_dir().rglob("evil.wasm"))


async def test_the_jail_root_has_nothing_of_the_host() -> None:
    # The compiler is asked to compile the host's files by absolute path: none is there.
    for path in ("/etc/passwd", "/usr/include/stdio.h", str(cprograms.toolchain_dir() / "README.md")):
        result = await jailed([f"{jail.TOOLCHAIN}/zig", *cprograms.DRIVER_FLAGS["c"], "-E", path])
        error = result.stderr.lower()
        assert result.exit_code not in (0, None) and (b"no such file" in error or b"filenotfound" in error), result


async def test_a_source_larger_than_the_scratch_space_is_refused_with_the_reason() -> None:
    source = b"/*" + b"x" * (2 << 20) + b"*/\n" + HELLO
    result = await jailed(compile_argv(cprograms.OUTPUT), source, limits=jail.JailLimits(disk_bytes=1 << 20))
    assert result.reason == "output" and "does not fit" in result.message and result.output == b"", result


async def test_a_jail_that_cannot_be_built_says_why() -> None:
    result = await jailed(compile_argv(cprograms.OUTPUT), mount_point="/nonexistent/jail-root")
    assert result.reason == "jail" and "mount" in result.message and result.output == b"", result


class TestNoToolchain(GatewayFixtures):
    """A host where the jail cannot work: the runtime serves without C and C++ and says so."""

    runtime = "wasm"

    @pytest.fixture(autouse=True)
    def broken_jail(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setattr(cprograms, "jail_mount_point", lambda: tmp_path / "missing")

    @pytest.mark.usefixtures("wasm_compiled")
    async def test_c_is_unsupported_and_the_answer_names_what_runs(self, gateway: Gateway) -> None:
        sandbox = await gateway.create()
        assert "exec.c" not in sandbox["capabilities"] and "c" not in sandbox["languages"]
        resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"language": "c", "code": ""},
                                         headers={"Authorization": "Bearer conformance-key-tenant-a"})
        error = (await resp.json())["error"]
        message = error["message"]
        assert error["code"] == "unsupported" and "javascript" in message and "python" in message, error
        assert "a jailed compile fails here" in message, error  # the reason
