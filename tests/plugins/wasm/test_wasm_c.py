"""C and C++ on the WASM runtime through the real gateway: compiled by zig in its jail, cached by
source, run as a fresh wasmtime instance per exec with the sandbox's /work; and the compiler's jail
attacked through the same door a tenant has (exec's `code`)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gateway.testing.conformance import AUTH, Gateway, GatewayFixtures
from gateway.web.app import MANAGER
from plugins.wasm import cprograms, jail
from plugins.wasm.runtime import WasmRuntime
from tests.plugins.wasm.ctoolchain import zig_cache

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled", "zig_cache")]
__all__ = ["zig_cache"]

HELLO = {
    "c": '#include <stdio.h>\nint main(void) { printf("hello from c\\n"); return 0; }\n',
    "cpp": '#include <iostream>\nint main() { std::cout << "hello from c++" << std::endl; }\n',
}
ECHO = {
    "c": ('#include <stdio.h>\n#include <ctype.h>\n'
          'int main(void) { int c; while ((c = getchar()) != EOF) putchar(toupper(c)); return 0; }\n'),
    "cpp": ('#include <iostream>\n#include <string>\n'
            'int main() { std::string line;\n'
            '  while (std::getline(std::cin, line)) std::cout << "got " << line << "\\n"; }\n'),
}
EXIT_7 = {
    "c": '#include <stdio.h>\nint main(void) { puts("before"); fflush(stdout); return 7; }\n',
    "cpp": '#include <cstdio>\n#include <cstdlib>\nint main() { std::puts("before"); std::exit(7); }\n',
}
SYNTAX_ERROR = {
    "c": '#include <stdio.h>\nint main(void) { puts("never") return 0; }\n',
    "cpp": '#include <iostream>\nint main() { std::cout << "never" << std::endl return 0; }\n',
}
SPIN = {
    "c": "int main(void) { volatile unsigned long n = 0; for (;;) n++; }\n",
    "cpp": "int main() { volatile unsigned long n = 0; for (;;) n++; }\n",
}
LANGUAGES = ("c", "cpp")


def unique(code: str) -> str:
    """The same program under a source digest no other test (or earlier run) has compiled."""
    return f"// {uuid.uuid4()}\n{code}"


def runtime_of(gateway: Gateway) -> WasmRuntime:
    runtime = gateway.client.app[MANAGER].runtimes["wasm"]
    assert isinstance(runtime, WasmRuntime)
    return runtime


@pytest.fixture
def jail_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every jailed compile the gateway starts, by the compiler's argv[1] (a spy: the real jail
    runs)."""
    runs: list[str] = []
    real = jail.run

    async def counting(spec: jail.JailSpec, source: bytes, env: Any, **kwargs: Any) -> jail.JailResult:
        runs.append(spec.argv[1])
        return await real(spec, source, env, **kwargs)

    monkeypatch.setattr(jail, "run", counting)
    return runs


class TestCAndCpp(GatewayFixtures):
    runtime = "wasm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}

    async def test_sandboxes_and_the_runtime_list_c_and_cpp(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        assert {"exec.c", "exec.cpp"} <= set(sandbox["capabilities"])
        assert {"c", "cpp"} <= set(sandbox["languages"])
        listed = await (await gateway.client.get("/v1/runtimes", headers=AUTH)).json()
        wasm = next(r for r in listed["runtimes"] if r["id"] == "wasm")
        assert {"python", "javascript", "c", "cpp"} <= set(wasm["languages"]["default"]), wasm

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_hello_world(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        done = await gateway.exec(sandbox["id"], language=language, code=HELLO[language])
        expected = "hello from c\n" if language == "c" else "hello from c++\n"
        assert (done["exit_code"], done["stdout"], done.get("error")) == (0, expected, None), done

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_stdin_echo(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        done = await gateway.exec(sandbox["id"], language=language, code=ECHO[language], stdin="one\ntwo\n")
        expected = "ONE\nTWO\n" if language == "c" else "got one\ngot two\n"
        assert (done["exit_code"], done["stdout"]) == (0, expected), done

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_non_zero_exit(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        done = await gateway.exec(sandbox["id"], language=language, code=EXIT_7[language])
        assert (done["exit_code"], done["stdout"], done.get("error")) == (7, "before\n", None), done

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_compile_error_is_stderr_and_a_non_zero_exit_with_no_run(
        self, gateway: Gateway, sandbox: dict[str, Any], language: str
    ) -> None:
        done = await gateway.exec(sandbox["id"], language=language, code=SYNTAX_ERROR[language])
        assert done["exit_code"] not in (0, None) and done["stdout"] == "" and done.get("error") is None, done
        filename = "main.c" if language == "c" else "main.cpp"
        assert f"{filename}:2:" in done["stderr"] and "error:" in done["stderr"], done["stderr"]

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_an_infinite_loop_times_out_and_the_sandbox_goes_on(
        self, gateway: Gateway, sandbox: dict[str, Any], language: str
    ) -> None:
        done = await gateway.exec(sandbox["id"], language=language, code=SPIN[language], timeout=2)
        assert done["error"]["code"] == "timeout" and done["exit_code"] is None, done
        after = await gateway.exec(sandbox["id"], language=language, code=HELLO[language])
        assert after["exit_code"] == 0, after

    async def test_programs_see_work_env_and_their_relative_paths(self, gateway: Gateway,
                                                                    sandbox: dict[str, Any]) -> None:
        code = ('#include <stdio.h>\n#include <stdlib.h>\n#include <unistd.h>\n'
                'int main(void) { char cwd[64]; FILE *f = fopen("made-by-c.txt", "w");\n'
                '  if (!f) { perror("fopen"); return 1; }\n'
                '  fprintf(f, "%s\\n", getenv("GREETING")); fclose(f);\n'
                '  printf("%s\\n", getcwd(cwd, sizeof cwd)); return 0; }\n')
        done = await gateway.exec(sandbox["id"], language="c", code=code, env={"GREETING": "hi there"})
        assert (done["exit_code"], done["stdout"]) == (0, "/work\n"), done
        resp = await gateway.client.get(f"/v1/sandboxes/{sandbox['id']}/files/made-by-c.txt", headers=AUTH)
        assert resp.status == 200 and await resp.read() == b"hi there\n"

    async def test_a_large_program_is_compiled_by_wasmtime_in_a_child(self, gateway: Gateway,
                                                                       sandbox: dict[str, Any]) -> None:
        # A string of 64 << 17 bytes (8 MiB), none of them zero: all of it is in the module.
        code = unique("#include <stdio.h>\n#define S0 \"" + "0123456789abcdef" * 4 + "\"\n"
                      + "".join(f"#define S{i} S{i - 1} S{i - 1}\n" for i in range(1, 18))
                      + "char big[] = S17;\nint main(void) { unsigned long sum = 0;\n"
                      + '  for (unsigned long i = 0; i < sizeof big; i++) sum += big[i];\n'
                      + '  printf("%lu\\n", sum); }\n')
        done = await gateway.exec(sandbox["id"], language="c", code=code)
        expected = sum(b"0123456789abcdef") * 4 << 17
        assert (done["exit_code"], done["stdout"]) == (0, f"{expected}\n"), done
        assert cprograms.program_path("c", code.encode()).stat().st_size > cprograms.IN_PROCESS_BYTES

    async def test_the_same_source_compiles_once(self, gateway: Gateway, jail_runs: list[str]) -> None:
        code = unique(HELLO["c"])
        first, second = await gateway.create(), await gateway.create()
        assert (await gateway.exec(first["id"], language="c", code=code))["exit_code"] == 0
        assert jail_runs == ["cc"]
        cached = cprograms.program_path("c", code.encode())
        assert cached.is_file()
        again = await gateway.exec(second["id"], language="c", code=code)  # another sandbox, same source
        assert (again["exit_code"], again["stdout"]) == (0, "hello from c\n") and jail_runs == ["cc"], again
        other = await gateway.exec(second["id"], language="cpp", code=code.replace("hello from c", "as c++"))
        assert other["stdout"] == "as c++\n" and jail_runs == ["cc", "c++"], other

    async def test_concurrent_execs_of_one_new_source_share_one_compile(self, gateway: Gateway,
                                                                         jail_runs: list[str]) -> None:
        code = unique(HELLO["cpp"])
        sandboxes = [await gateway.create() for _ in range(3)]
        done = await asyncio.gather(*(gateway.exec(s["id"], language="cpp", code=code) for s in sandboxes))
        assert [d["stdout"] for d in done] == ["hello from c++\n"] * 3 and jail_runs == ["c++"], done

    async def test_a_signal_stops_a_program_and_a_compile(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        ws = await gateway.ws(sandbox["id"])
        spinning = await ws.send("exec.start", language="c", code=unique(SPIN["c"]), tag="spin")
        assert (await ws.receive_for(spinning))["ev"] == "start"
        await ws.call("exec.signal", tag="spin", signal="SIGKILL")
        events = await ws.collect(spinning)
        assert events[-1]["ev"] == "end" and events[-1]["signal"] == "SIGKILL", events
        # A compile that would run for its whole limit: the stop ends it, and its jail, at once.
        compiling = await ws.send("exec.start", language="c", code=unique(INCLUDE_BOMB), tag="compile")
        assert (await ws.receive_for(compiling))["ev"] == "start"
        await ws.call("exec.signal", tag="compile", signal="SIGKILL")
        events = await ws.collect(compiling)
        assert events[-1]["ev"] == "end" and events[-1]["signal"] == "SIGKILL", events
        assert jail_processes(runtime_of(gateway)) == []
        after = await gateway.exec(sandbox["id"], language="c", code=HELLO["c"])
        assert after["exit_code"] == 0, after


def jail_processes(runtime: WasmRuntime) -> list[int]:
    """Live processes of this gateway's compiler jails (marked with its work root)."""
    marker = f"SANDGATE_WORK_ROOT={runtime.work_root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0") and \
                        b"plugins.wasm.jail" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# -- attacks on the compiler's jail, through exec ----------------------------------------------------

#: Each level includes the file twice down to depth 40: 2^40 includes in constant memory.
INCLUDE_BOMB = "".join(
    ["#if !defined(D1)\n#define D1\n#include __FILE__\n#include __FILE__\nint main(void) { return 0; }\n"]
    + [f"#elif !defined(D{k})\n#define D{k}\n" + ("#include __FILE__\n#include __FILE__\n" if k < 40 else "")
       + f"#undef D{k}\n" for k in range(2, 41)]
    + ["#endif\n"])
#: 2^40 initializers: the compiler's memory grows until something stops it.
MACRO_BOMB = ("#define A0 1,\n" + "".join(f"#define A{i} A{i - 1} A{i - 1}\n" for i in range(1, 41))
              + "int a[] = { A40 };\nint main(void) { return a[0]; }\n")
#: Every instantiation distinct: 2^40 of them.
TEMPLATE_BOMB = ("template <unsigned long N, int D> struct T {\n"
                 "  static constexpr unsigned long v = T<N * 2, D - 1>::v + T<N * 2 + 1, D - 1>::v; };\n"
                 "template <unsigned long N> struct T<N, 0> { static constexpr unsigned long v = N; };\n"
                 "int main() { return T<1, 40>::v & 1; }\n")
#: A 64 MB initialised array: the object file and the module are as large.
HUGE_OUTPUT = "char big[64 << 20] = {1};\nint main(void) { return big[0]; }\n"


HOST_FILE_HAS_ROOT = "root:" in Path("/etc/passwd").read_text()


class TestCompilerJail(GatewayFixtures):
    """What a tenant's source can make the compiler do: read no host file, write nowhere but its
    own scratch space, and stop at its limits with a clear word (the limits set low here)."""

    runtime = "wasm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1, "compile_memory_mb": 512, "compile_cpu_s": 4,
                                                "compile_timeout_s": 60, "compile_disk_mb": 32}

    @pytest.mark.parametrize("path", ["/etc/passwd", "../../../../../../etc/passwd"])
    async def test_a_host_file_cannot_be_included(self, gateway: Gateway, sandbox: dict[str, Any], path: str) -> None:
        # Unjailed, clang fails on the file's first line and quotes it: "root:x:0:0:..." on stderr.
        assert HOST_FILE_HAS_ROOT
        code = unique(f'#include "{path}"\nint main(void) {{ return 0; }}\n')
        done = await gateway.exec(sandbox["id"], language="c", code=code)
        assert done["exit_code"] not in (0, None) and "file not found" in done["stderr"], done
        assert "root:" not in done["stderr"] + done["stdout"]

    async def test_a_host_file_cannot_be_embedded(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        # Unjailed, C23's #embed puts the file into the program, which prints it.
        code = ('#include <stdio.h>\nconst char d[] = {\n#embed "/etc/passwd" suffix(,)\n0};\n'
                'int main(void) { fputs(d, stdout); return 0; }\n')
        done = await gateway.exec(sandbox["id"], language="c", code=unique(code))
        # In the jail there is no such file: zig's clang embeds nothing and zig then fails the compile.
        assert done["stdout"] == "" and "root:" not in done["stderr"], done

    async def test_a_compile_leaves_the_shared_cache_and_the_toolchain_as_they_were(
        self, gateway: Gateway, sandbox: dict[str, Any], zig_cache: Path
    ) -> None:
        def tree(root: Path) -> dict[str, tuple[int, int]]:
            return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}

        before = tree(zig_cache), tree(cprograms.toolchain_dir())
        for language in LANGUAGES:
            done = await gateway.exec(sandbox["id"], language=language, code=unique(HELLO[language]))
            assert done["exit_code"] == 0, done
        assert (tree(zig_cache), tree(cprograms.toolchain_dir())) == before

    async def test_a_memory_bomb_stops_at_the_memory_limit(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], language="c", code=unique(MACRO_BOMB))
        assert done["exit_code"] == 1 and done["stdout"] == "", done
        assert "sandgate: the compile was stopped: the compiler ran out of memory (its limit is 512 MB)" \
            in done["stderr"], done["stderr"]

    async def test_a_template_bomb_stops_at_a_limit(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], language="cpp", code=unique(TEMPLATE_BOMB))
        assert done["exit_code"] == 1 and done["stdout"] == "", done
        assert "sandgate: the compile was stopped: the compiler " in done["stderr"], done["stderr"]

    async def test_an_include_bomb_stops_at_the_cpu_limit(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], language="c", code=unique(INCLUDE_BOMB))
        assert done["exit_code"] == 1 and done["stdout"] == "", done
        assert "sandgate: the compile was stopped: the compiler used up its 4 s of CPU" in done["stderr"], done

    async def test_a_huge_output_stops_at_the_scratch_space(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], language="c", code=unique(HUGE_OUTPUT))
        assert done["exit_code"] == 1 and done["stdout"] == "", done
        assert "sandgate: the compile was stopped: the compiler filled its 32 MB of scratch space" \
            in done["stderr"], done["stderr"]


class TestCompileWallClock(GatewayFixtures):
    """A compile that keeps the CPU busy is killed at compile_timeout_s, the whole jail with it."""

    runtime = "wasm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 0, "compile_timeout_s": 2, "compile_cpu_s": 600}

    async def test_an_include_bomb_stops_at_the_wall_clock_limit(self, gateway: Gateway,
                                                                 sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], language="c", code=unique(INCLUDE_BOMB))
        assert done["exit_code"] == 1 and done["stdout"] == "", done
        assert "sandgate: the compile was stopped: the compile ran past its 2 s limit" in done["stderr"], done
        assert jail_processes(runtime_of(gateway)) == []

