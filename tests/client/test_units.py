"""The SDK's sans-I/O parts, table-driven and without an event loop: error codes, stream bookkeeping."""

from __future__ import annotations

import pytest

from gateway.client import errors
from gateway.client.models import Exited, Output, OutputLost, Started
from gateway.client.streams import ResultBuilder, StreamTracker, event_from_wire
from guest_agent.wire import ERRORS


@pytest.mark.parametrize("code", sorted(ERRORS))
def test_every_wire_code_has_its_exception(code: str) -> None:
    cls = errors.error_class(code)
    assert cls is not errors.SandgateError and cls.code == code
    assert cls.__name__ == "".join(part.capitalize() for part in code.split("_"))
    error = errors.error_from_wire({"code": code, "message": "m", "retryable": ERRORS[code].retryable})
    assert type(error) is cls and error.retryable == ERRORS[code].retryable
    assert error.http_status == ERRORS[code].http_status and str(error) == f"{code}: m"


def test_unknown_and_malformed_errors() -> None:
    newer = errors.error_from_wire({"code": "from_the_future", "message": "later", "retryable": True})
    assert type(newer) is errors.SandgateError and newer.code == "from_the_future" and newer.retryable
    assert errors.SandgateError.code == "internal", "the instance's code did not leak to the class"
    assert isinstance(errors.error_from_wire("nonsense"), errors.GuestProtocol)
    quota = errors.error_from_wire({"code": "quota_exceeded", "message": "slow down"}, http_status=429, retry_after=5)
    assert isinstance(quota, errors.QuotaExceeded) and quota.retryable and quota.retry_after == 5
    assert isinstance(errors.error_for_status(404, "x"), errors.NotFound)
    assert isinstance(errors.error_for_status(401, "x"), errors.Unauthorized)
    assert isinstance(errors.error_for_status(502, "bad gateway page"), errors.Unavailable)
    lost = errors.ConnectionLost("gone")
    assert lost.code == "unavailable" and lost.retryable and isinstance(lost, errors.Unavailable)


def test_tracker_drops_replays_and_reports_gaps_once() -> None:
    tracker = StreamTracker()
    assert tracker.resume_from == 0
    assert tracker.accept(0) == (True, None) and tracker.accept(1) == (True, None)
    assert tracker.resume_from == 2
    assert tracker.accept(1) == (False, None), "an event seen before is not delivered again"
    assert tracker.accept(4) == (True, OutputLost(2, 3)), "a gap is reported, exactly"
    assert tracker.attached({"exec_id": "e1", "first_seq": 5, "lost": None}) is None
    assert tracker.attached({"exec_id": "e1", "first_seq": 9, "lost": [5, 8]}) == OutputLost(5, 8)
    assert tracker.accept(9) == (True, None), "the attach reply's loss is not reported again as a gap"
    assert tracker.attached({"lost": [2, 6]}) is None, "a range already delivered is no loss"
    assert tracker.attached({"lost": "garbage"}) is None


def test_events_from_wire() -> None:
    assert event_from_wire({"ev": "start", "seq": 0, "exec_id": "e1", "pid": 12}) == Started("e1", 12, 0)
    assert event_from_wire({"ev": "data", "seq": 1, "fd": "stderr", "data": b"x"}) == Output("stderr", b"x", 1)
    end = event_from_wire({"ev": "end", "seq": 2, "exit_code": None, "signal": "SIGKILL", "duration_ms": 1500,
                           "error": {"code": "timeout", "message": "late", "retryable": False}})
    assert isinstance(end, Exited) and end.duration == 1.5 and end.signal == "SIGKILL"
    assert isinstance(end.error, errors.Timeout)
    for bad in ({"ev": "data", "seq": 1, "fd": "stdin", "data": b""}, {"ev": "data", "seq": 1, "fd": "stdout"},
                {"ev": "start"}, {"ev": "weird", "seq": 3}, {"ev": "start", "seq": True}):
        with pytest.raises(errors.GuestProtocol):
            event_from_wire(bad)


def test_result_builder_caps_output_and_says_so() -> None:
    builder = ResultBuilder("e1", max_output_bytes=5)
    builder.add(Started("e1", None, 0))
    builder.add(Output("stdout", b"abc", 1))
    builder.add(OutputLost(2, 2))
    builder.add(Output("stderr", b"defg", 3))
    builder.add(Exited(0, None, 0.25, None, False, 4))
    result = builder.build()
    assert (result.stdout, result.stderr, result.truncated) == ("abc", "de", True)
    assert result.lost == [(2, 2)] and result.ok and result.duration == 0.25



def test_serverless_models_from_wire() -> None:
    from gateway.client.models import ExecResult, ExecutionInfo, FileChanges, InvokeResult, TestReport

    done = InvokeResult.from_wire({"status": "error", "result": None, "duration_ms": 3, "extra": "kept in raw",
                                   "error": {"type": "KeyError", "message": "'k'", "traceback": "tb"},
                                   "files": {"created": ["a", 7], "modified": "nonsense"}})
    assert done.status == "error" and not done.ok and done.error is not None and done.error.type == "KeyError"
    assert done.files == FileChanges(["a"], [], []) and done.cold is None and done.raw["extra"] == "kept in raw"
    assert InvokeResult.from_wire({"status": "from_the_future"}).status == "from_the_future"
    report = TestReport.from_wire({"success": False, "summary": {"total": 2, "passed": 1, "failed": 1},
                                   "tests": [{"name": "a", "passed": True}, {"name": "b", "error": "boom"}, "junk"]})
    assert [t.name for t in report.failures] == ["b"] and report.summary.skipped == 0 and len(report.tests) == 2
    running = ExecutionInfo.from_wire({"id": "e1", "state": "running", "output_offset": 4, "output_lost": [1, 2]})
    assert not running.finished and running.output_lost == (1, 2) and running.output_offset == 4
    newer = ExecutionInfo.from_wire({"id": "e1", "state": "archived", "ended_at": 1.5})
    assert newer.finished, "a state this client does not know, with an end time, has ended"
    late = ExecutionInfo.from_wire({"id": "e2", "state": "timeout", "error": {"code": "timeout", "message": "late"}})
    assert late.finished and isinstance(late.error, errors.Timeout)
    ran = ExecResult.from_rest({"exec_id": "e3", "exit_code": 0, "stdout": "hé\n", "duration_ms": 1500})
    assert ran.ok and ran.stdout == "hé\n" and ran.duration == 1.5


def test_serverless_bodies() -> None:
    from gateway.client import bodies

    body = bodies.invoke_body("f", (1,), None, code=None, code_ref="ab" * 32, language=None, timeout=None,
                              files={"t.txt": "text", "b.bin": b"\x00\xff"})
    assert body == {"function": "f", "args": [1], "kwargs": {}, "code_ref": "ab" * 32,
                    "files": {"t.txt": "text", "b.bin": {"base64": "AP8="}}}
    assert bodies.exec_body(("ls", "-l"), code=None, code_ref=None, language=None, stdin=b"hi", env=None, cwd=None,
                            timeout=2, tag=None, namespace=None) == {"command": ["ls", "-l"], "stdin": "hi",
                                                                     "timeout": 2}
    with pytest.raises(ValueError, match="UTF-8"):
        bodies.exec_body(None, code="1", code_ref=None, language=None, stdin=b"\xff", env=None, cwd=None,
                         timeout=None, tag=None, namespace=None)
    assert bodies.call_deadline(None, request_timeout=60, call_timeout=600) == 600
    assert bodies.call_deadline(5, request_timeout=60, call_timeout=600) == 65
