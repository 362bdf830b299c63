"""Code in other languages than Python, run by the agent as one process from the language table's
recipe, with the toolchains this host has (a language whose programs it lacks is skipped)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.testing.languages import PROCESS_LANGUAGES, SAMPLES
from guest_agent import languages
from guest_agent.wire import PROTOCOL_VERSION
from tests.guest_agent.agent_harness import AgentClient, Result, SubprocessAgent, agent_env, wait_gone

HOST = languages.find_programs(shutil.which)
C_FOREVER = SAMPLES["c"].forever


def need(language: str) -> None:
    missing = [p for p in languages.BY_ID[language].programs if p not in HOST]
    if missing:
        pytest.skip(f"this host has no {', '.join(missing)} for {language}")


@pytest.fixture(autouse=True)
def rustup_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host's rustc is rustup's proxy, which finds its toolchain under $RUSTUP_HOME (else
    ~/.rustup, and an exec's HOME is the sandbox root): the agent passes RUSTUP_HOME on from its
    own environment (the table's `inherit`), as a rust image sets it."""
    rustc = HOST.get("rustc")
    if rustc and os.path.basename(os.path.realpath(rustc)) == "rustup" and "RUSTUP_HOME" not in os.environ:
        monkeypatch.setenv("RUSTUP_HOME", str(Path.home() / ".rustup"))


def run(client: AgentClient, language: str, code: str, **fields: object) -> Result:
    return client.run(language=language, code=code, **fields)


@pytest.mark.parametrize("language", PROCESS_LANGUAGES)
def test_hello_world(client: AgentClient, root: Path, language: str) -> None:
    need(language)
    result = run(client, language, SAMPLES[language].hello)
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"hello from {language}\n", ""), result.events
    assert list(root.iterdir()) == [], "the source, the build or a cache went into the sandbox's files"


@pytest.mark.parametrize("language", PROCESS_LANGUAGES)
def test_stdin_reaches_the_program_not_the_compiler(pclient: AgentClient, language: str) -> None:
    need(language)
    assert run(pclient, language, SAMPLES[language].echo, stdin=b"ping\n").stdout == "got:ping\n"
    # typed while it runs (the compile included)
    rid, _ = pclient.start(exec_id="typed", language=language, code=SAMPLES[language].echo, stdin_open=True)
    pclient.request("exec.input", exec_id="typed", data=b"pong\n")
    events = pclient.events(rid)
    assert b"".join(e.get("data", b"") for e in events) == b"got:pong\n" and events[-1]["exit_code"] == 0


@pytest.mark.parametrize("language", PROCESS_LANGUAGES)
def test_nonzero_exit(pclient: AgentClient, language: str) -> None:
    need(language)
    result = run(pclient, language, SAMPLES[language].exit3)
    assert (result.exit_code, result.signal, result.stderr) == (3, None, "bad\n")


@pytest.mark.parametrize("language", PROCESS_LANGUAGES)
def test_compile_error_is_stderr_and_a_nonzero_exit(pclient: AgentClient, root: Path, language: str) -> None:
    need(language)
    sample = SAMPLES[language]
    result = run(pclient, language, sample.broken)
    assert result.exit_code not in (0, None) and "error" not in result.end, result.events
    assert sample.marker in result.stderr + result.stdout
    assert list(root.iterdir()) == []


def test_the_private_folder_is_outside_the_root_and_gone_when_the_exec_ends(pclient: AgentClient, root: Path) -> None:
    need("c")
    code = "#include <stdio.h>\nint main(int argc, char **argv) { puts(argv[0]); return 0; }"
    binary = Path(run(pclient, "c", code).stdout.strip())
    assert binary.name == "main" and root not in binary.parents
    assert binary.parent.name.startswith("sandgate-c-") and not binary.parent.exists()
    need("javascript")
    source = Path(run(pclient, "javascript", "console.log(__filename)").stdout.strip())
    assert source.name == "main.js" and not source.parent.exists()
    # and when it could not start: a folder for each failed start would pile up
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("sandgate-c-*"))
    error = pclient.error("exec.start", exec_id="bad-cwd", language="c", code=code, cwd="missing")
    assert error["code"] == "not_found" and set(Path(os.environ.get("TMPDIR", "/tmp")).glob("sandgate-c-*")) == before


def test_runs_in_the_root_or_the_exec_cwd_with_its_env(pclient: AgentClient, root: Path) -> None:
    need("javascript")
    code = "console.log(process.cwd(), process.env.GREETING, process.env.HOME)"
    assert run(pclient, "javascript", code, env={"GREETING": "hi"}).stdout == f"{root} hi {root}\n"
    (root / "sub").mkdir()
    assert run(pclient, "javascript", "console.log(process.cwd())", cwd="sub").stdout == f"{root}/sub\n"


def test_java_file_is_named_after_its_public_class(pclient: AgentClient) -> None:
    need("java")
    code = "class Helper { static String name() { return \"helper\"; } }\n" \
           "public class Greeter { public static void main(String[] a) { System.out.println(Helper.name()); } }"
    assert run(pclient, "java", code).stdout == "helper\n"


def test_timeout_ends_the_compile_or_the_run(pclient: AgentClient) -> None:
    need("c")
    rid, start = pclient.start(exec_id="t", language="c", code=C_FOREVER, timeout=1.0)
    end = pclient.events(rid)[-1]
    assert end["error"]["code"] == "timeout" and end["signal"] == "SIGKILL"
    assert wait_gone(start["pid"])


def test_signal_reaches_the_program(pclient: AgentClient) -> None:
    need("c")
    rid, _ = pclient.start(exec_id="s", language="c", code=C_FOREVER)
    assert pclient.event(rid)["data"] == b"ready\n"  # compiled, and the program itself runs
    pclient.request("exec.signal", exec_id="s", signal="SIGTERM")
    end = pclient.event(rid)
    assert (end["ev"], end["exit_code"], end["signal"]) == ("end", None, "SIGTERM")


def test_pty(pclient: AgentClient) -> None:
    need("c")
    code = ("#include <stdio.h>\n#include <unistd.h>\n"
            "int main(void) { puts(isatty(0) && isatty(1) ? \"tty\" : \"no\"); }")
    result = run(pclient, "c", code, pty={"rows": 24, "cols": 80})
    assert result.out("pty") == b"tty\r\n" and result.exit_code == 0
    assert pclient.error("exec.start", exec_id="p", language="python", code="1", pty={})["code"] == "bad_request"


def test_an_awkward_temp_dir_and_class_name(tmp_path: Path, root: Path) -> None:
    need("java")
    temp = tmp_path / "it's a $(dir)"
    temp.mkdir()
    agent = SubprocessAgent(root, env=agent_env(TMPDIR=str(temp), RUSTUP_HOME=os.environ.get("RUSTUP_HOME", "")))
    try:
        code = "public class $Odd_1 { public static void main(String[] a) { System.out.println(\"odd\"); } }"
        assert run(agent.client, "java", code).stdout == "odd\n"
        assert list(temp.iterdir()) == []
    finally:
        agent.stop()


@pytest.fixture
def node_only(tmp_path: Path, root: Path) -> Iterator[AgentClient]:
    """An agent whose PATH holds node and nothing else of the table's programs."""
    need("javascript")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "node").symlink_to(HOST["node"])
    agent = SubprocessAgent(root, env=agent_env(PATH=str(bin_dir)))
    yield agent.client
    agent.stop()


def test_hello_offers_exactly_the_languages_whose_programs_it_finds(node_only: AgentClient) -> None:
    caps = node_only.request("hello", version=PROTOCOL_VERSION)["capabilities"]
    assert [c for c in caps if c.removeprefix("exec.") in languages.BY_ID] == ["exec.python", "exec.javascript"]
    assert run(node_only, "javascript", "console.log(1 + 1)").stdout == "2\n"
    error = node_only.error("exec.start", exec_id="c", language="c", code="int main(void) { return 0; }")
    assert error["code"] == "unsupported" and "javascript, python" in error["message"]
    assert node_only.error("exec.start", exec_id="x", language="cobol", code="x")["code"] == "unsupported"


def test_the_host_agent_offers_what_this_host_has(client: AgentClient) -> None:
    caps = client.request("hello", version=PROTOCOL_VERSION)["capabilities"]
    expected = ["python", *(lang for lang in languages.offered_by_programs(HOST.get) if lang != "python")]
    assert [c.removeprefix("exec.") for c in caps if c.removeprefix("exec.") in languages.BY_ID] == expected
