"""The sync SDK against `sandgate serve` running as a real subprocess (the way users run it)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.client import Client, Exited, Output, Sandbox, errors
from tests.serving import Served, serve

pytestmark = [pytest.mark.wasm, pytest.mark.usefixtures("wasm_compiled")]

KEY = "sync-sdk-test-key"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    state = tmp_path_factory.mktemp("state")
    env = {**os.environ, "SANDGATE_API_KEYS": f"{KEY}:sync", "SANDGATE_STATE_DIR": str(state)}
    with serve(env) as served:
        yield served
        served.stop()


@pytest.fixture
def url(gateway: Served) -> str:
    return f"http://127.0.0.1:{gateway.port}"


def test_sync_sandbox_end_to_end(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDGATE_URL", url)
    monkeypatch.setenv("SANDGATE_API_KEY", KEY)
    with Sandbox.create(runtime="wasm", ttl=600) as sb:
        assert sb.info.ttl == 600 and sb.id in [s.id for s in Sandbox.list()]
        assert sb.exec(code="print(sum(range(10)))").stdout == "45\n"
        execution = sb.start(code="for i in range(3):\n    print('tick', i, flush=True)\nprint(input())",
                             stdin_open=True)
        texts = []
        for event in execution:
            if isinstance(event, Output):
                texts.append(event.text)
                if event.text == "tick 2\n":
                    execution.send_stdin("done\n")
        assert "".join(texts) == "tick 0\ntick 1\ntick 2\ndone\n"
        assert execution.finished and execution.wait().exit_code == 0

        blob = os.urandom(3 << 20)
        assert sb.files.write("big.bin", io.BytesIO(blob)) == len(blob)
        assert sb.files.read("big.bin") == blob
        assert b"".join(sb.files.stream("big.bin")) == blob
        sb.files.write("hello.txt", "hi")
        assert {e.name for e in sb.files.list()} == {"big.bin", "hello.txt"}
        assert sb.files.stat("hello.txt").size == 2
        metrics = sb.metrics()
        assert metrics.disk_bytes is not None and metrics.disk_bytes >= len(blob)
        sandbox_id = sb.id
    with pytest.raises(errors.NotFound):
        Sandbox.connect(sandbox_id)


def test_sync_client_errors_and_threads(url: str) -> None:
    with pytest.raises(errors.Unauthorized):
        Sandbox.create(runtime="wasm", url=url, api_key="nope")
    with Client(url, KEY) as client:
        with pytest.raises(errors.NotFound):
            client.get_sandbox("sb_does_not_exist")
        with client.create_sandbox("wasm") as sb:
            with pytest.raises(errors.Unsupported):
                sb.exec("echo hi")
            with pytest.raises(errors.Timeout) as late:
                sb.exec(code="print('so far', flush=True)\nwhile True: pass", timeout=1)
            assert late.value.result is not None and late.value.result.stdout == "so far\n"

            # The sync API may be used from several threads at once (one shared loop underneath).
            results: dict[int, bytes] = {}

            def worker(n: int) -> None:
                mine = client.get_sandbox(sb.id)
                try:
                    mine.files.write(f"t{n}.txt", str(n) * 1000)
                    results[n] = mine.files.read(f"t{n}.txt")
                finally:
                    mine.close()

            threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert results == {n: str(n).encode() * 1000 for n in range(4)}


def test_sync_files_upload_download(url: str, tmp_path: Path) -> None:
    local = tmp_path / "in.bin"
    local.write_bytes(os.urandom(2 << 20))
    with Sandbox.create(runtime="wasm", url=url, api_key=KEY) as sb:
        assert sb.files.upload(local, "dir/in.bin") == local.stat().st_size
        assert sb.files.download("dir/in.bin", tmp_path / "out.bin") == local.stat().st_size
        assert (tmp_path / "out.bin").read_bytes() == local.read_bytes()
        sb.files.move("dir/in.bin", "dir/moved.bin")
        assert sb.files.exists("dir/moved.bin") and not sb.files.exists("dir/in.bin")
        sb.files.remove("dir", recursive=True)
        assert sb.files.list() == []
        last = None
        for event in sb.start(code="print('x')"):
            last = event
        assert isinstance(last, Exited) and last.exit_code == 0


def test_sync_functions_executions_and_cache(url: str) -> None:
    code = "def add(a, b=0):\n    print('adding')\n    return a + b\n"
    with Client(url, KEY) as client:
        with client.create_sandbox("wasm") as sb:
            done = sb.invoke("add", [1], {"b": 2}, code=code, files={"in.txt": "x"})
            assert (done.status, done.result, done.stdout) == ("success", 3, "adding\n")
            report = sb.run_tests("function add(a, b) { return a + b; }",
                                  "test('adds', () => { assert.is(add(1, 2), 3); });", language="javascript")
            assert report.success and report.summary.passed == 1

            started = sb.start_execution(code="for i in range(3):\n    print(i, flush=True)", tag="count")
            polls = list(sb.follow_execution(started.id, interval=0.5))
            assert "".join(p.stdout for p in polls) == "0\n1\n2\n" and polls[-1].state == "completed"
            assert sb.wait_execution(started.id).stdout == "0\n1\n2\n"
            assert sb.get_execution(started.id).tag == "count"
            assert started.id in [e.id for e in sb.list_executions(state="completed")]
            spin = sb.start_execution(code="while True: pass")
            assert sb.cancel_execution(spin.id).state == "cancelled"

            [entry] = [e for e in client.cache_entries() if e.language == "python" and e.bytes == len(code)]
            assert sb.invoke("add", [5], code_ref=entry.hash).result == 5
            assert sb.exec(code_ref=entry.hash).stdout == ""
            client.delete_cache_entry(entry.hash)

        assert client.invoke("add", [2, 2], code=code, runtime="wasm").result == 4
        assert client.execute(code="print(6 * 7)", runtime="wasm").stdout == "42\n"
        with pytest.raises(errors.Timeout):
            client.execute(code="while True: pass", runtime="wasm", timeout=1)

        deployed = client.deploy_function("adder", code, "add", runtime="wasm", max_instances=2)
        assert [f.name for f in client.list_functions()] == ["adder"] and deployed.max_instances == 2
        first, second = client.invoke_function("adder", [1]), client.invoke_function("adder", [2], {"b": 1})
        assert (first.result, first.cold, second.result, second.cold) == (1, True, 3, False)
        assert client.get_function("adder").instances[0]["id"] == first.instance
        client.delete_function("adder")
        with pytest.raises(errors.NotFound):
            client.invoke_function("adder")
        client.clear_cache()
        assert client.cache_entries() == []


def test_sync_exec_display(url: str) -> None:
    """Rich output through the sync SDK: `on_display` and the result's `display` (the async SDK's
    are tested in tests/client/test_display.py)."""
    from gateway.client import Display
    from tests.client.test_display import RICH, check_chart

    with Sandbox.create(runtime="wasm", url=url, api_key=KEY) as sandbox:
        seen: list[Display] = []
        done = sandbox.exec(code=RICH + "Chart()", on_display=seen.append)
        assert done.stdout == "" and len(seen) == 1 and seen == done.display
        check_chart(seen[0])
