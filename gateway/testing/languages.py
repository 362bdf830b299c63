"""The language suite: code in every language of guest_agent/languages.py run through the real
gateway (REST exec and WebSocket) in real sandboxes of one runtime.

A runtime (or one of its templates) proves the languages it offers by subclassing
`LanguageConformance` with `languages` set to exactly what its sandboxes must offer:

    class TestPolyglot(LanguageConformance):
        runtime = "microvm"
        create_options = {"template": "polyglot"}
        languages = frozenset(languages.BY_ID)

Each test is parametrized over every language of the table; one the class does not name is
skipped with the reason, and `test_offers_exactly_its_languages` fails if the sandbox offers more
or less than it names. The programs (`SAMPLES`) are shared with the agent's own tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from gateway.testing.conformance import Gateway, GatewayFixtures, output
from guest_agent import languages


@dataclass(frozen=True)
class Sample:
    """One language's test programs."""

    #: Prints `hello from <language>` and a newline.
    hello: str
    #: Reads one line of stdin and prints `got:` and the line.
    echo: str
    #: Writes `bad` to stderr and exits with status 3.
    exit3: str
    #: Does not compile (a syntax or type error); `marker` is in what the compiler says.
    broken: str
    marker: str
    #: Prints `ready` (flushed) and then waits for ever.
    forever: str


SAMPLES: dict[str, Sample] = {
    "python": Sample(
        hello="print('hello from python')",
        echo="print('got:' + input())",
        exit3="import sys\nprint('bad', file=sys.stderr)\nsys.exit(3)",
        broken="print(", marker="SyntaxError",
        forever="import time\nprint('ready', flush=True)\nwhile True:\n    time.sleep(1)",
    ),
    "javascript": Sample(
        hello="console.log('hello from javascript');",
        echo="const fs = require('fs');\nconst b = Buffer.alloc(256);\nconst n = fs.readSync(0, b);\n"
             "process.stdout.write('got:' + b.toString('utf8', 0, n));",
        exit3="console.error('bad');\nprocess.exit(3);",
        broken="console.log(;", marker="SyntaxError",
        forever="console.log('ready');\nsetInterval(() => {}, 1000);",
    ),
    "ruby": Sample(
        hello="puts 'hello from ruby'",
        echo="line = STDIN.gets\nprint 'got:' + line",
        exit3="STDERR.puts 'bad'\nexit 3",
        broken="puts(", marker="syntax error",
        forever="STDOUT.sync = true\nputs 'ready'\nloop { sleep 1 }",
    ),
    "php": Sample(
        hello="<?php\necho \"hello from php\\n\";",
        echo="<?php\necho 'got:' . fgets(STDIN);",
        exit3="<?php\nfwrite(STDERR, \"bad\\n\");\nexit(3);",
        broken="<?php\necho ;", marker="Parse error",
        forever="<?php\necho \"ready\\n\";\nwhile (true) { sleep(1); }",
    ),
    "c": Sample(
        hello="#include <stdio.h>\nint main(void) { puts(\"hello from c\"); return 0; }",
        echo="#include <stdio.h>\nint main(void) {\n  char line[256];\n"
             "  if (fgets(line, sizeof line, stdin)) printf(\"got:%s\", line);\n  return 0;\n}",
        exit3="#include <stdio.h>\nint main(void) { fputs(\"bad\\n\", stderr); return 3; }",
        broken="int main(void) { return undeclared; }", marker="undeclared",
        forever="#include <stdio.h>\n#include <unistd.h>\n"
                "int main(void) { puts(\"ready\"); fflush(stdout); for (;;) pause(); }",
    ),
    "cpp": Sample(
        hello="#include <iostream>\nint main() { std::cout << \"hello from cpp\" << std::endl; }",
        echo="#include <iostream>\n#include <string>\n"
             "int main() { std::string s; std::getline(std::cin, s); std::cout << \"got:\" << s << \"\\n\"; }",
        exit3="#include <iostream>\nint main() { std::cerr << \"bad\" << std::endl; return 3; }",
        broken="int main() { return undeclared; }", marker="undeclared",
        forever="#include <iostream>\n#include <unistd.h>\n"
                "int main() { std::cout << \"ready\" << std::endl; for (;;) pause(); }",
    ),
    "go": Sample(
        hello="package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hello from go\") }",
        echo="package main\n\nimport (\n\t\"bufio\"\n\t\"fmt\"\n\t\"os\"\n)\n\n"
             "func main() {\n\tline, _ := bufio.NewReader(os.Stdin).ReadString('\\n')\n\tfmt.Print(\"got:\" + line)\n}",
        exit3="package main\n\nimport (\n\t\"fmt\"\n\t\"os\"\n)\n\n"
              "func main() {\n\tfmt.Fprintln(os.Stderr, \"bad\")\n\tos.Exit(3)\n}",
        broken="package main\n\nfunc main() { return undeclared }", marker="undefined",
        forever="package main\n\nimport (\n\t\"fmt\"\n\t\"time\"\n)\n\n"
                "func main() {\n\tfmt.Println(\"ready\")\n\tfor {\n\t\ttime.Sleep(time.Hour)\n\t}\n}",
    ),
    "java": Sample(
        # Not `Main`: the agent names the file after the public class.
        hello="public class Hello {\n  public static void main(String[] args) {\n"
              "    System.out.println(\"hello from java\");\n  }\n}",
        echo="import java.io.*;\n\npublic class Echo {\n  public static void main(String[] args) throws IOException {\n"
             "    String line = new BufferedReader(new InputStreamReader(System.in)).readLine();\n"
             "    System.out.println(\"got:\" + line);\n  }\n}",
        exit3="public class Main {\n  public static void main(String[] args) {\n"
              "    System.err.println(\"bad\");\n    System.exit(3);\n  }\n}",
        broken="public class Main {\n  public static void main(String[] args) { int x = \"s\"; }\n}",
        marker="incompatible types",
        forever="public class Main {\n  public static void main(String[] args) throws Exception {\n"
                "    System.out.println(\"ready\");\n    Thread.sleep(Long.MAX_VALUE);\n  }\n}",
    ),
    "rust": Sample(
        hello="fn main() { println!(\"hello from rust\"); }",
        echo="use std::io::BufRead;\n\nfn main() {\n    let mut line = String::new();\n"
             "    std::io::stdin().lock().read_line(&mut line).unwrap();\n    print!(\"got:{}\", line);\n}",
        exit3="fn main() { eprintln!(\"bad\"); std::process::exit(3); }",
        broken="fn main() { let x: i32 = \"s\"; }", marker="mismatched types",
        forever="fn main() {\n    println!(\"ready\");\n"
                "    loop { std::thread::sleep(std::time::Duration::from_secs(3600)); }\n}",
    ),
}

ALL = tuple(lang.id for lang in languages.LANGUAGES)
#: Languages run as processes, where exec.signal and a pty reach the program itself (Python runs
#: in the agent's interpreter: the conformance suite covers its signals).
PROCESS_LANGUAGES = tuple(lang for lang in ALL if lang != "python")


def offered(capabilities: list[str]) -> set[str]:
    """The table's languages a sandbox's capabilities say it runs."""
    return {cap.removeprefix("exec.") for cap in capabilities} & set(ALL)


class LanguageConformance(GatewayFixtures):
    """Subclass with `runtime`, `create_options` and `languages`: exactly what the sandbox offers."""

    languages: ClassVar[frozenset[str]]
    #: Seconds an exec may take: a compile under TCG on a busy host takes tens of seconds.
    exec_timeout: ClassVar[float] = 100.0

    def need(self, language: str) -> Sample:
        if language not in self.languages:
            template = self.create_options.get("template")
            pytest.skip(f"{self.runtime}{f' template {template}' if template else ''} does not offer {language}")
        return SAMPLES[language]

    async def run(self, gateway: Gateway, sandbox: dict[str, Any], language: str, code: str,
                  **body: Any) -> dict[str, Any]:
        body.setdefault("timeout", self.exec_timeout)
        return await gateway.exec(sandbox["id"], language=language, code=code, **body)

    async def test_offers_exactly_its_languages(self, sandbox: dict[str, Any]) -> None:
        assert offered(sandbox["capabilities"]) == set(self.languages), sandbox["capabilities"]

    @pytest.mark.parametrize("language", ALL)
    async def test_hello_world(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        sample = self.need(language)
        done = await self.run(gateway, sandbox, language, sample.hello)
        assert (done["exit_code"], done["stdout"]) == (0, f"hello from {language}\n"), done
        # the program, its source, its build and the toolchain's caches stay out of the sandbox's files
        listed = await self.run(gateway, sandbox, "python", "import os\nprint(sorted(os.listdir('.')))")
        assert listed["stdout"] == "[]\n", "the exec left files in the sandbox's root"

    @pytest.mark.parametrize("language", ALL)
    async def test_stdin_echo(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        sample = self.need(language)
        done = await self.run(gateway, sandbox, language, sample.echo, stdin="ping\n")
        assert (done["exit_code"], done["stdout"]) == (0, "got:ping\n"), done

    @pytest.mark.parametrize("language", ALL)
    async def test_nonzero_exit(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        sample = self.need(language)
        done = await self.run(gateway, sandbox, language, sample.exit3)
        assert (done["exit_code"], done["stderr"]) == (3, "bad\n"), done

    @pytest.mark.parametrize("language", ALL)
    async def test_compile_error(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        sample = self.need(language)
        done = await self.run(gateway, sandbox, language, sample.broken)
        assert done["exit_code"] not in (0, None) and "error" not in done, done
        assert sample.marker in done["stderr"] + done["stdout"], done

    @pytest.mark.parametrize("language", ALL)
    async def test_timeout(self, gateway: Gateway, sandbox: dict[str, Any], language: str) -> None:
        sample = self.need(language)
        # Short: it may end the compile or the run, whichever is going on; both are the exec.
        done = await self.run(gateway, sandbox, language, sample.forever, timeout=3)
        assert done["error"]["code"] == "timeout", done
        again = await self.run(gateway, sandbox, "python", "print('still here')")
        assert again["stdout"] == "still here\n"

    # Over the WebSocket, one compile per test: under TCG a Java or Rust build takes ~15-30 s.

    @pytest.mark.parametrize("language", ALL)
    async def test_websocket_streams_the_output(self, gateway: Gateway, sandbox: dict[str, Any],
                                                language: str) -> None:
        sample = self.need(language)
        ws = await gateway.ws(sandbox["id"])
        try:
            events = await ws.stream("exec.start", language=language, code=sample.hello, timeout=self.exec_timeout)
            assert [events[0]["ev"], events[-1]["ev"]] == ["start", "end"], events
            # (a keepalive, sent while a long compile prints nothing, repeats the last seq)
            numbered = [e for e in events if e["ev"] != "keepalive"]
            assert [e["seq"] for e in numbered] == list(range(len(numbered))), events
            assert output(events) == f"hello from {language}\n".encode() and events[-1]["exit_code"] == 0, events
        finally:
            await ws.ws.close()

    @pytest.mark.parametrize("language", ALL)
    async def test_websocket_stdin_typed_while_it_runs(self, gateway: Gateway, sandbox: dict[str, Any],
                                                       language: str) -> None:
        sample = self.need(language)
        ws = await gateway.ws(sandbox["id"])
        try:
            # typed at once, while the compile (if any) still runs: the compiler does not read it
            rid = await ws.send("exec.start", language=language, code=sample.echo, stdin_open=True,
                                exec_id="echo", timeout=self.exec_timeout)
            assert (await ws.receive_for(rid))["ev"] == "start"
            await ws.call("exec.input", exec_id="echo", data=b"ping\n")
            events = await ws.collect(rid)
            assert output(events) == b"got:ping\n" and events[-1]["exit_code"] == 0, events
        finally:
            await ws.ws.close()

    @pytest.mark.parametrize("language", PROCESS_LANGUAGES)
    async def test_websocket_signal_reaches_the_program(self, gateway: Gateway, sandbox: dict[str, Any],
                                                        language: str) -> None:
        sample = self.need(language)
        ws = await gateway.ws(sandbox["id"])
        try:
            rid = await ws.send("exec.start", language=language, code=sample.forever, exec_id="forever",
                                timeout=self.exec_timeout)
            seen = b""
            while b"ready\n" not in seen:  # the program itself runs, past any compile
                event = await ws.receive_for(rid)
                assert event["ev"] in ("start", "data", "keepalive"), event  # (keepalives: a long compile)
                seen += event.get("data", b"")
            await ws.call("exec.signal", exec_id="forever", signal="SIGKILL")
            events = await ws.collect(rid)
            assert events[-1]["signal"] == "SIGKILL" and "error" not in events[-1], events
        finally:
            await ws.ws.close()
