"""Ruby 3.2 and PHP 8.2 on the WASM runtime, through the real gateway: exec (REST and WebSocket),
the sandbox's limits, invoke, and a gateway whose Ruby and PHP modules are missing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp.test_utils import TestClient

from gateway.config import Limits, Settings
from gateway.testing.conformance import AUTH, KEY, Gateway, GatewayFixtures, output
from gateway.web.app import create_app
from plugins.wasm import runno

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_interpreters")]

LANGUAGES = ("ruby", "php")

# The same programs as the language suite's (gateway/testing/languages.py) for these languages.
HELLO = {"ruby": "puts 'hello from ruby'", "php": "<?php\necho \"hello from php\\n\";"}
ECHO = {"ruby": "line = STDIN.gets\nprint 'got:' + line", "php": "<?php\necho 'got:' . fgets(STDIN);"}
EXIT3 = {"ruby": "STDERR.puts 'bad'\nexit 3", "php": "<?php\nfwrite(STDERR, \"bad\\n\");\nexit(3);"}
BROKEN = {"ruby": ("puts(", "syntax error"), "php": ("<?php\necho ;", "PHP Parse error")}
FOREVER = {"ruby": "puts 'ready'\nloop { sleep 1 }", "php": "<?php\necho \"ready\\n\";\nwhile (true) { sleep(1); }"}
SPIN = {"ruby": "loop {}", "php": "<?php while (true) {}"}
#: Writes `name` in the working directory (the sandbox root) with `text`.
WRITE = {"ruby": "File.write('{name}', '{text}')", "php": "<?php file_put_contents('{name}', '{text}');"}
ENV = {"ruby": "print ENV['GREETING']", "php": "<?php echo getenv('GREETING');"}
#: Takes about 300 MB.
HOG = {"ruby": "s = 'x' * 300_000_000\nputs s.size", "php": "<?php $s = str_repeat('x', 300000000); echo strlen($s);"}
#: Writes 8 MB to big.bin; prints `full` when the disk refuses it.
FILL = {"ruby": "begin\n  File.binwrite('big.bin', 'x' * 8_000_000)\n  puts 'wrote'\nrescue SystemCallError\n"
                "  puts 'full'\nend",
        "php": "<?php echo @file_put_contents('big.bin', str_repeat('x', 8000000)) === 8000000 ? 'wrote' : 'full';"}


class TestRubyPhpExec(GatewayFixtures):
    runtime = "wasm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}

    async def test_capabilities_name_them(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        assert {"exec.ruby", "exec.php", "exec.javascript", "exec.python"} <= set(sandbox["capabilities"])
        resp = await gateway.client.get("/v1/runtimes", headers=AUTH)
        wasm = next(r for r in (await resp.json())["runtimes"] if r["id"] == "wasm")
        assert "Ruby 3.2 and PHP 8.2" in wasm["description"] and not wasm["unavailable_languages"], wasm
        assert {"ruby", "php"} <= set(wasm["languages"]["default"])

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_hello_stdin_exit_code_and_syntax_error(self, gateway: Gateway, sandbox: dict[str, Any],
                                                          language: str) -> None:
        sid = sandbox["id"]
        done = await gateway.exec(sid, language=language, code=HELLO[language])
        assert (done["exit_code"], done["stdout"], done["stderr"]) == (0, f"hello from {language}\n", ""), done
        done = await gateway.exec(sid, language=language, code=ECHO[language], stdin="ping\n")
        assert (done["exit_code"], done["stdout"]) == (0, "got:ping\n"), done
        done = await gateway.exec(sid, language=language, code=EXIT3[language])
        assert (done["exit_code"], done["stdout"], done["stderr"]) == (3, "", "bad\n"), done
        code, marker = BROKEN[language]
        done = await gateway.exec(sid, language=language, code=code)
        assert done["exit_code"] not in (0, None) and "error" not in done and marker in done["stderr"], done
        assert done["stdout"] == "", "PHP's errors go to stderr, never into the output"
        # The run's program and prelude are not in the sandbox's files.
        listed = await gateway.exec(sid, language="python", code="import os\nprint(sorted(os.listdir('.')))")
        assert listed["stdout"] == "[]\n", listed

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_shares_the_sandbox_files_and_takes_env(self, gateway: Gateway, sandbox: dict[str, Any],
                                                          language: str) -> None:
        sid = sandbox["id"]
        done = await gateway.exec(sid, language=language, code=WRITE[language].format(name="from.txt", text=language))
        assert done["exit_code"] == 0, done
        read = await gateway.exec(sid, language="python", code="print(open('/work/from.txt').read())")
        assert read["stdout"] == f"{language}\n"
        done = await gateway.exec(sid, language=language, code=ENV[language], env={"GREETING": "hi there"})
        assert done["stdout"] == "hi there", done

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_timeout_ends_the_run_and_the_sandbox_goes_on(self, gateway: Gateway, sandbox: dict[str, Any],
                                                                language: str) -> None:
        # (whether it printed before the timeout depends on the machine's load: not asserted)
        done = await gateway.exec(sandbox["id"], language=language, code=FOREVER[language], timeout=2)
        assert done["error"]["code"] == "timeout" and done["exit_code"] is None, done
        again = await gateway.exec(sandbox["id"], language=language, code=HELLO[language])
        assert again["stdout"] == f"hello from {language}\n"

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_signal_stops_it_and_one_run_at_a_time(self, gateway: Gateway, sandbox: dict[str, Any],
                                                         language: str) -> None:
        ws = await gateway.ws(sandbox["id"])
        try:
            rid = await ws.send("exec.start", language=language, code=FOREVER[language], exec_id="forever")
            seen = b""
            while b"ready\n" not in seen:  # streamed as it is printed, not at the end
                event = await ws.receive_for(rid)
                assert event["ev"] in ("start", "data"), event
                seen += event.get("data", b"")
            other = "php" if language == "ruby" else "ruby"
            refused = await ws.receive_for(await ws.send("exec.start", language=other, code=HELLO[other]))
            assert refused["error"]["code"] == "busy", refused
            await ws.call("exec.signal", exec_id="forever", signal="SIGKILL")
            events = await ws.collect(rid)
            assert events[-1]["signal"] == "SIGKILL", events
            events = await ws.stream("exec.start", language=other, code=HELLO[other])
            assert output(events) == f"hello from {other}\n".encode()
        finally:
            await ws.ws.close()

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_memory_cpu_and_disk_are_the_sandbox_limits(self, gateway: Gateway, language: str) -> None:
        sandbox = await gateway.create(memory_mb=200, cpu_seconds=6, disk_mb=4)
        done = await gateway.exec(sandbox["id"], language=language, code=HOG[language])
        assert done["exit_code"] != 0 and "300000000" not in done["stdout"], done
        assert "memory" in done["stderr"].lower() or done.get("error", {}).get("code") == "guest_died", done
        done = await gateway.exec(sandbox["id"], language=language, code=FILL[language])
        assert done["stdout"].strip() == "full", done
        done = await gateway.exec(sandbox["id"], language=language, code=SPIN[language], timeout=100)
        assert done["error"]["code"] == "guest_died" and "cpu_limit" in done["error"]["message"], done

    async def test_php_prints_exactly_what_it_echoes(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        code = ("<?php\nheader('X-Test: 1');\necho 'no newline';\n"
                "fwrite(STDERR, 'part ');\nfile_put_contents('php://stderr', \"one\\n\");\n"
                "echo strtoupper(file_get_contents('php://stdin'));\n"
                "$m = fopen('php://memory', 'w+'); fwrite($m, '!'); rewind($m); echo stream_get_contents($m);\n"
                "echo $undefined;\n")
        done = await gateway.exec(sandbox["id"], language="php", code=code, stdin="up")
        assert (done["exit_code"], done["stdout"]) == (0, "no newlineUP!"), done
        assert done["stderr"].startswith("part one\n") and "Undefined variable $undefined" in done["stderr"], done
        done = await gateway.exec(sandbox["id"], language="php", code="plain text, no tag")
        assert done["stdout"] == "plain text, no tag", done

    async def test_php_fatal_error_and_ruby_large_exit_status(self, gateway: Gateway,
                                                              sandbox: dict[str, Any]) -> None:
        done = await gateway.exec(sandbox["id"], language="php", code="<?php\nthrow new RuntimeException('boom');")
        assert done["exit_code"] == 255 and "error" not in done, done
        assert "PHP Fatal error:  Uncaught RuntimeException: boom" in done["stderr"] and done["stdout"] == ""
        done = await gateway.exec(sandbox["id"], language="ruby", code="exit 200")
        assert done["exit_code"] == 200 and "error" not in done, done
        done = await gateway.exec(sandbox["id"], language="ruby", code="raise ArgumentError, 'nope'")
        assert done["exit_code"] == 1 and "nope (ArgumentError)" in done["stderr"], done


ADD = {
    "ruby": "def add(a, b: 0)\n  puts \"adding #{a} #{b}\"\n  File.write('out.txt', 'sum')\n"
            "  {sum: a + b, parts: [a, b]}\nend\n",
    "php": "<?php\nfunction add($a, $b = 0) {\n  echo \"adding $a $b\\n\";\n  file_put_contents('out.txt', 'sum');\n"
           "  return ['sum' => $a + $b, 'parts' => [$a, $b]];\n}\n",
}
RAISES = {
    "ruby": ("def f(x)\n  x / 0\nend\n", "ZeroDivisionError", "divided by 0"),
    "php": ("<?php\nfunction f($x) {\n  return intdiv($x, 0);\n}\n", "DivisionByZeroError", "Division by zero"),
}
NOT_JSON = {"ruby": "def f = Object.new", "php": "<?php function f() { return NAN; }"}


class TestRubyPhpInvoke(GatewayFixtures):
    runtime = "wasm"
    runtime_config: ClassVar[dict[str, Any]] = {"pool_size": 1}

    async def invoke(self, gateway: Gateway, sandbox_id: str, **body: Any) -> dict[str, Any]:
        resp = await gateway.client.post(f"/v1/sandboxes/{sandbox_id}/invoke", json=body, headers=AUTH)
        assert resp.status == 200, await resp.text()
        return await resp.json()  # type: ignore[no-any-return]

    # (success with args and kwargs, an exception's class, an unknown function: the serverless suite,
    # gateway/testing/functions.py, on WASM in test_wasm_functions.py)

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_error_traceback_unknown_function_and_not_json(self, gateway: Gateway, sandbox: dict[str, Any],
                                                                 language: str) -> None:
        sid = sandbox["id"]
        code, error_type, message = RAISES[language]
        done = await self.invoke(gateway, sid, language=language, code=code, function="f", args=[1])
        assert done["status"] == "error" and done["error"]["type"] == error_type, done
        assert done["error"]["message"] == message and "<function>" in done["error"]["traceback"], done
        assert "harness" not in done["error"]["traceback"] and "/sandgate/" not in done["error"]["traceback"]
        done = await self.invoke(gateway, sid, language=language, code=ADD[language], function="sub")
        assert done["status"] == "error" and done["error"]["type"] == "FunctionNotFound", done
        assert "'sub' is not defined" in done["error"]["message"] and "add" in done["error"]["message"]
        done = await self.invoke(gateway, sid, language=language, code=NOT_JSON[language], function="f")
        assert done["status"] == "error" and done["error"]["type"] == "ResultNotSerializable", done

    @pytest.mark.parametrize("language", LANGUAGES)
    async def test_files_modified_and_deleted_and_a_syntax_error(self, gateway: Gateway, sandbox: dict[str, Any],
                                                                 language: str) -> None:
        sid = sandbox["id"]
        code = {"ruby": "def f\n  File.write('keep.txt', 'v2')\n  File.delete('gone.txt')\nend\n",
                "php": "<?php function f() { file_put_contents('keep.txt', 'v2'); unlink('gone.txt'); }"}[language]
        done = await self.invoke(gateway, sid, language=language, code=code, function="f",
                                 files={"keep.txt": "v1", "gone.txt": "x"})
        # keep.txt keeps its size: the change is seen all the same (PHP compares recent files' contents)
        assert done["files"] == {"created": [], "modified": ["keep.txt"], "deleted": ["gone.txt"]}, done
        broken = {"ruby": ("def f(:\n", "SyntaxError"), "php": ("<?php function f( {", "ParseError")}[language]
        done = await self.invoke(gateway, sid, language=language, code=broken[0], function="f")
        assert done["status"] == "error" and done["error"]["type"] == broken[1], done

    async def test_kwargs_ruby_keywords_and_php_named_arguments(self, gateway: Gateway,
                                                                sandbox: dict[str, Any]) -> None:
        sid = sandbox["id"]
        done = await self.invoke(gateway, sid, language="ruby", function="greet", args=["ada"],
                                 kwargs={"loud": True}, code="def greet(name, loud: false) = loud ? name.upcase : name")
        assert done["result"] == "ADA", done
        done = await self.invoke(gateway, sid, language="ruby", function="opts", args=[1], kwargs={"x": 2},
                                 code="def opts(a, h) = [a, h]")  # no keywords: they come as a final Hash
        assert done["result"] == [1, {"x": 2}], done
        done = await self.invoke(gateway, sid, language="php", function="greet", args=["ada"], kwargs={"loud": True},
                                 code="<?php function greet($name, $loud = false) { "
                                      "return $loud ? strtoupper($name) : $name; }")
        assert done["result"] == "ADA", done
        done = await self.invoke(gateway, sid, language="php", function="greet", kwargs={"nope": 1},
                                 code="<?php function greet($name = 'x') { return $name; }")
        assert done["error"]["type"] == "Error" and "Unknown named parameter $nope" in done["error"]["message"]

    async def test_exit_in_the_function_is_a_crash_and_timeout_a_timeout(self, gateway: Gateway,
                                                                       sandbox: dict[str, Any]) -> None:
        done = await self.invoke(gateway, sandbox["id"], language="php", function="f",
                                 code="<?php function f() { exit(4); }")
        assert done["status"] == "crash" and "code 4" in done["error"]["message"], done
        done = await self.invoke(gateway, sandbox["id"], language="ruby", function="f", timeout=2,
                                 code="def f\n  loop { }\nend")
        assert done["status"] == "timeout", done

    async def test_ephemeral_and_deployed(self, gateway: Gateway) -> None:
        resp = await gateway.client.post("/v1/invoke", headers=AUTH, json={
            "runtime": "wasm", "language": "php", "code": ADD["php"], "function": "add", "args": [40, 2]})
        assert (await resp.json())["result"] == {"sum": 42, "parts": [40, 2]}
        resp = await gateway.client.put("/v1/functions/rb-add", headers=AUTH, json={
            "runtime": "wasm", "language": "ruby", "code": ADD["ruby"], "function": "add"})
        assert resp.status == 201, await resp.text()
        resp = await gateway.client.post("/v1/functions/rb-add/invoke", headers=AUTH,
                                         json={"args": [1], "kwargs": {"b": 1}})
        assert (await resp.json())["result"] == {"sum": 2, "parts": [1, 1]}
        await gateway.client.delete("/v1/functions/rb-add", headers=AUTH)

    async def test_test_mode_is_not_theirs(self, gateway: Gateway, sandbox: dict[str, Any]) -> None:
        resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/test", headers=AUTH,
                                         json={"language": "ruby", "code": "def f = 1", "tests": "f"})
        body = await resp.json()
        assert resp.status == 501 and body["error"]["code"] == "unsupported", body
        assert "test mode speaks python, javascript" in body["error"]["message"]


# -- a gateway without them ----------------------------------------------------------------------


async def start_gateway(aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
                        runno_dir: Path) -> Gateway:
    settings = Settings(api_keys={KEY: "tenant-a"}, limits=Limits(exec_timeout_s=30.0), reap_interval_s=3600.0,
                        blocked_plugins=("microvm", "pod"),
                        runtimes={"wasm": {"pool_size": 0, "runno_dir": str(runno_dir)}})
    return Gateway(await aiohttp_client(create_app(settings)), "wasm", {})


@pytest.mark.parametrize("broken", ["missing", "not the pinned file"])
async def test_without_ruby_and_php_the_gateway_serves_the_rest(
        aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]], tmp_path: Path, broken: str) -> None:
    if broken != "missing":
        for language in runno.LANGUAGES:
            runno.wasm_file(language, tmp_path).write_bytes(b"\0asm\1\0\0\0")
    gateway = await start_gateway(aiohttp_client, tmp_path)
    sandbox = await gateway.create()
    caps = set(sandbox["capabilities"])
    assert {"exec.python", "exec.javascript"} <= caps and not caps & {"exec.ruby", "exec.php"}, caps
    resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/exec", headers=AUTH,
                                     json={"language": "ruby", "code": "puts 1"})
    why = "sandgate images build wasm" if broken == "missing" else "is not the pinned"
    error = (await resp.json())["error"]
    assert resp.status == 501 and error["code"] == "unsupported" and why in error["message"], error
    resp = await gateway.client.get("/v1/runtimes", headers=AUTH)
    wasm = next(r for r in (await resp.json())["runtimes"] if r["id"] == "wasm")
    assert {"ruby", "php"} <= set(wasm["unavailable_languages"]), wasm
    assert why in wasm["unavailable_languages"]["ruby"] and "ruby" not in wasm["languages"]["default"], wasm
    done = await gateway.exec(sandbox["id"], language="python", code="print('python')")
    js = await gateway.exec(sandbox["id"], language="javascript", code="console.log('js')")
    assert (done["stdout"], js["stdout"]) == ("python\n", "js\n")
    resp = await gateway.client.post(f"/v1/sandboxes/{sandbox['id']}/invoke", headers=AUTH,
                                     json={"language": "php", "code": "<?php function f() {}", "function": "f"})
    assert resp.status == 501 and (await resp.json())["error"]["code"] == "unsupported"
