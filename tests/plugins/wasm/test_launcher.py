"""The WASM launcher as the gateway runs it: a real subprocess, real wasmtime, real guests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from plugins import common
from plugins.common import MSGPACK_FILES, TerminalProgress
from plugins.wasm import artifacts, launcher
from plugins.wasm.agent_dir import stage_agent_dir

pytestmark = pytest.mark.wasm

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def compiled() -> dict[artifacts.Kind, Path]:
    """Both modules compiled once (cached across runs: the first compile takes minutes)."""
    return {kind: artifacts.ensure_compiled(kind, TerminalProgress()) for kind in artifacts.KINDS}


@pytest.fixture(scope="session")
def agent_dir(compiled: dict[artifacts.Kind, Path]) -> Path:
    return stage_agent_dir()


def launch(*args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "plugins.wasm.launcher", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env=artifacts.child_env(),
        check=False,
    )


def python(code: str, *options: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return launch(*options, "--", "python", "-c", code, stdin=stdin)


def interactive_python(code: str) -> subprocess.Popen[bytes]:
    """A launcher running `python -c code` with its stdin and stdout as pipes, for dialogues."""
    return subprocess.Popen(
        [sys.executable, "-m", "plugins.wasm.launcher", "--", "python", "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=artifacts.child_env(),
    )


def exit_report(proc: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The launcher's JSON line, which must be the last line on stderr."""
    last = proc.stderr.decode().rstrip("\n").splitlines()[-1]
    report: dict[str, Any] = json.loads(last)
    assert report["sandgate_launcher"] == "exit"
    return report


@pytest.mark.usefixtures("compiled")
class TestPython:
    def test_prints(self) -> None:
        proc = python("print(1)")
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"1\n", b"")

    def test_exit_code_and_argv(self) -> None:
        code = "import os, sys; print(sys.argv[1:], os.environ['A']); sys.exit(3)"
        proc = launch("--env", "A=b", "--", "python", "-c", code, "x")
        assert (proc.returncode, proc.stdout) == (3, b"['x'] b\n")

    def test_uncaught_exception_is_exit_1_with_traceback(self) -> None:
        proc = python("1/0")
        assert proc.returncode == 1
        assert b"ZeroDivisionError" in proc.stderr and b"sandgate_launcher" not in proc.stderr

    def test_stdin_round_trip(self) -> None:
        code = (
            "import sys\n"
            "for line in sys.stdin.buffer:\n"
            "    sys.stdout.buffer.write(b'echo:' + line); sys.stdout.flush()\n"
        )
        with interactive_python(code) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            for line in (b"hello\n", b"second line\n"):
                proc.stdin.write(line)
                proc.stdin.flush()
                assert proc.stdout.readline() == b"echo:" + line  # answered before stdin closes
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0

    def test_partial_writes_reach_the_host_unbuffered(self) -> None:
        """The agent's frames have no newlines: a flushed write must arrive at once."""
        code = (
            "import sys\nwhile b := sys.stdin.buffer.read(1):\n    sys.stdout.buffer.write(b * 2); sys.stdout.flush()\n"
        )
        with interactive_python(code) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"z")
            proc.stdin.flush()
            assert os.read(proc.stdout.fileno(), 10) == b"zz"
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0

    def test_writes_a_file_in_work(self, tmp_path: Path) -> None:
        code = "import os; os.chdir('/work'); open('out.txt', 'w').write('from the guest'); os.mkdir('d')"
        proc = python(code, "--work", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "out.txt").read_text() == "from the guest"
        assert (tmp_path / "d").is_dir()

    def test_cannot_write_outside_work(self, tmp_path: Path, agent_dir: Path) -> None:
        work = tmp_path / "work"
        work.mkdir()
        before = sorted(p.name for p in agent_dir.rglob("*"))
        code = (
            "for path in ['/sandgate/x', '/sandgate/msgpack/ext.py', '/usr/local/lib/x', '/tmp/x', '/x',"
            " '/work/../x']:\n"
            "    try:\n"
            "        open(path, 'w')\n"
            "        print(path, 'WRITTEN')\n"
            "    except OSError as e:\n"
            "        print(path, type(e).__name__)\n"
        )
        proc = python(code, "--work", str(work), "--agent-dir", str(agent_dir))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().splitlines() == [
            "/sandgate/x PermissionError",  # read-only preopen
            "/sandgate/msgpack/ext.py PermissionError",
            "/usr/local/lib/x PermissionError",
            "/tmp/x FileNotFoundError",  # no such preopen at all
            "/x FileNotFoundError",
            "/work/../x PermissionError",  # no escaping a preopen
        ]
        assert sorted(p.name for p in agent_dir.rglob("*")) == before
        assert list(tmp_path.iterdir()) == [work] and list(work.iterdir()) == []

    def test_symlinks_and_hard_links_are_refused(self, tmp_path: Path, agent_dir: Path) -> None:
        code = (
            "import os\n"
            "open('/work/f', 'w').close()\n"
            "for make, src, dst in [\n"
            "    (os.symlink, '../../etc', '/work/x'),\n"
            "    (os.symlink, 'f', '/work/y'),\n"
            "    (os.link, '/sandgate/msgpack/ext.py', '/work/h'),\n"
            "    (os.link, '/work/f', '/work/g'),\n"
            "]:\n"
            "    try:\n"
            "        make(src, dst)\n"
            "        print('MADE', dst)\n"
            "    except PermissionError:\n"
            "        print('refused', dst)\n"
        )
        proc = python(code, "--work", str(tmp_path), "--agent-dir", str(agent_dir))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().splitlines() == [f"refused /work/{n}" for n in "xyhg"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]

    def test_memory_cap_raises_memory_error_in_the_guest(self) -> None:
        code = (
            "try:\n"
            "    x = bytearray(100_000_000)\n"
            "except MemoryError:\n"
            "    print('MemoryError')\n"
            "small = bytearray(1_000_000)\n"
            "print('still alive')\n"
        )
        proc = python(code, "--memory-bytes", str(64 << 20))
        assert (proc.returncode, proc.stdout) == (0, b"MemoryError\nstill alive\n"), proc.stderr
        # the same allocation without a cap succeeds
        assert python("x = bytearray(100_000_000); print(len(x))").stdout == b"100000000\n"

    def test_memory_cap_below_the_initial_memory_is_reason_memory(self) -> None:
        proc = python("print(1)", "--memory-bytes", str(16 << 20))
        assert proc.returncode == launcher.EXIT_MEMORY and proc.stdout == b""
        report = exit_report(proc)
        assert report["reason"] == "memory" and "--memory-bytes" in report["message"]

    def test_cpu_limit_ends_a_busy_loop(self) -> None:
        proc = python("while True: pass", "--cpu-seconds", "1")
        assert proc.returncode == launcher.EXIT_CPU_LIMIT
        assert exit_report(proc)["reason"] == "cpu_limit"

    def test_waiting_costs_no_cpu_budget(self) -> None:
        # 0.3 s of CPU allowed; 1 s of waiting in the guest spends (almost) none of it
        proc = python("import time; time.sleep(1); print('woke')", "--cpu-seconds", "0.3")
        assert (proc.returncode, proc.stdout) == (0, b"woke\n"), proc.stderr

    def test_deep_python_recursion_is_a_clean_recursion_error(self) -> None:
        code = (
            "import sys\n"
            "sys.setrecursionlimit(10**6)\n"
            "print(sys.getrecursionlimit())\n"
            "def f(n): return f(n+1)\n"
            "try:\n"
            "    f(0)\n"
            "except RecursionError:\n"
            "    print('RecursionError')\n"
            "print('alive')\n"
        )
        proc = python(code)
        expected = f"{launcher.MAX_RECURSION_LIMIT}\nRecursionError\nalive\n".encode()
        assert (proc.returncode, proc.stdout) == (0, expected), proc.stderr

    def test_stack_overflow_ends_the_guest_cleanly(self) -> None:
        # Past the cap (the original setter, reached around it): CPython raises RecursionError
        # at depth 10**6, then freeing the million-level traceback (tb_dealloc recursing)
        # overflows the 8 MiB wasm stack, which wasmtime turns into a trap, not a SIGSEGV.
        code = (
            "import sys\n"
            "sys.setrecursionlimit.__defaults__[0](10**6)\n"
            "def f(n): return f(n+1)\n"
            "try:\n"
            "    f(0)\n"
            "except RecursionError:\n"
            "    print('RecursionError', flush=True)\n"
            "print('not reached', flush=True)\n"
        )
        proc = python(code)
        assert proc.stdout == b"RecursionError\n"
        assert proc.returncode == launcher.EXIT_STACK_OVERFLOW  # not a negative (signal) code
        report = exit_report(proc)
        assert report["reason"] == "stack_overflow" and "8 MiB" in report["message"]

    def test_deep_c_recursion_is_a_recursion_error(self) -> None:
        code = (
            "import json\n"
            "try:\n"
            "    json.loads('[' * 100000 + ']' * 100000)\n"
            "except RecursionError:\n"
            "    print('RecursionError')\n"
        )
        proc = python(code)
        assert (proc.returncode, proc.stdout) == (0, b"RecursionError\n"), proc.stderr

    def test_abort_is_a_trap(self) -> None:
        proc = python("import os; os.abort()")
        assert proc.returncode == launcher.EXIT_TRAP
        assert exit_report(proc) == {
            "sandgate_launcher": "exit",
            "reason": "trap",
            "message": "wasm trap: unreachable (in python.wasm!abort)",
        }

    def test_a_missing_work_folder_is_reason_error(self, tmp_path: Path) -> None:
        proc = python("print(1)", "--work", str(tmp_path / "missing"))
        assert proc.returncode == launcher.EXIT_ERROR
        assert exit_report(proc)["reason"] == "error"

    def test_agent_dir_imports_pure_python_msgpack(self, agent_dir: Path) -> None:
        code = (
            "import msgpack, os\n"
            "print(msgpack.__file__, msgpack.Packer.__module__, os.environ['MSGPACK_PUREPYTHON'])\n"
            "print(msgpack.unpackb(msgpack.packb({'a': [1, b'x']})))\n"
        )
        proc = python(code, "--agent-dir", str(agent_dir))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().splitlines() == [
            "/sandgate/msgpack/__init__.py msgpack.fallback 1",
            "{'a': [1, b'x']}",
        ]


@pytest.mark.usefixtures("compiled")
class TestJavaScript:
    def test_prints(self) -> None:
        proc = launch("--mode", "javascript", "--code", 'console.log("hi", 1 + 2); std.out.puts("buffered\\n")')
        assert (proc.returncode, proc.stdout) == (0, b"hi 3\nbuffered\n"), proc.stderr

    def test_exception_is_exit_1(self) -> None:
        proc = launch("--mode", "javascript", "--code", "throw new Error('nope')")
        assert proc.returncode == 1 and b"nope" in proc.stderr

    def test_code_file_and_work(self, tmp_path: Path) -> None:
        source = tmp_path / "main.js"
        source.write_text('let f = std.open("/work/out.txt", "w"); f.puts("js"); f.close(); std.exit(4);')
        work = tmp_path / "work"
        work.mkdir()
        proc = launch("--mode", "javascript", "--work", str(work), "--code-file", str(source))
        assert proc.returncode == 4, proc.stderr
        assert (work / "out.txt").read_text() == "js"

    def test_cpu_limit(self) -> None:
        proc = launch("--mode", "javascript", "--cpu-seconds", "0.5", "--code", "for (;;) {}")
        assert proc.returncode == launcher.EXIT_CPU_LIMIT
        assert exit_report(proc)["reason"] == "cpu_limit"


class TestArtifacts:
    def test_compiled_modules_are_reused(self, compiled: dict[artifacts.Kind, Path]) -> None:
        for kind, path in compiled.items():
            stamp = path.stat().st_mtime_ns
            assert artifacts.ensure_compiled(kind) == path == artifacts.compiled_module_path(kind)
            assert path.stat().st_mtime_ns == stamp  # not compiled again
            assert path.stat().st_mode & 0o777 == 0o600
            assert path.parent.stat().st_mode & 0o777 == 0o700

    def test_module_name_keys(self, compiled: dict[artifacts.Kind, Path]) -> None:
        name = compiled["python"].name
        digest = artifacts.file_sha256(artifacts.wasm_path("python"))
        assert name.startswith(f"python-{digest[:24]}-wasmtime{artifacts.wasmtime_version()}-")
        assert name.endswith(f"-{artifacts.flags_hash()}.cwasm")

    def test_cache_root_follows_platformdirs(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        import platformdirs

        monkeypatch.delenv(common.CACHE_ENV, raising=False)
        for xdg in (None, str(tmp_path / "xdg"), "relative/xdg", ""):
            if xdg is None:
                monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
            else:
                monkeypatch.setenv("XDG_CACHE_HOME", xdg)
            assert common.cache_root() == Path(platformdirs.user_cache_dir("sandgate")), xdg
        monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "mine"))
        assert common.cache_root() == tmp_path / "mine"

    def test_stage_agent_dir(self) -> None:
        agent_dir = stage_agent_dir()
        assert stage_agent_dir() == agent_dir  # content-keyed: staged once
        for name in MSGPACK_FILES:
            assert (agent_dir / "msgpack" / name).is_file()
        assert not (agent_dir / "msgpack" / "_cmsgpack.cpython-311-x86_64-linux-gnu.so").exists()
        import guest_agent

        sources = {p.name for p in Path(next(iter(guest_agent.__path__))).glob("*.py")}
        assert {p.name for p in (agent_dir / "guest_agent").glob("*.py")} == sources
        assert list((agent_dir / "msgpack" / "__pycache__").glob("fallback.cpython-3*.pyc"))  # precompiled
