"""Exec records as the async executions API shows them (sans-I/O).

`POST /v1/sandboxes/{id}/executions` starts an exec like any other: its record is in the sandbox's
one exec registry, so the WebSocket's exec.attach reaches it, and the REST views below read the
same record and replay buffer that exec.attach replays from. `output_offset` is therefore a
sequence number of the exec's stream (the same as exec.attach's `from_seq`): a poller passes back
the `output_offset` of the previous reply and gets only what came after.
"""

from __future__ import annotations

from typing import Any

from gateway.sessions.execs import ExecRecord

#: The states an execution can be in (REST contract).
STATES = ("pending", "running", "completed", "failed", "cancelled", "timeout")


def state_of(record: ExecRecord) -> str:
    """pending until the agent reported the start; then running; once ended: cancelled (a
    DELETE stopped it), timeout, completed (exit code 0, no error), or failed (anything else:
    a non-zero exit, a signal, the guest's death)."""
    if record.running:
        return "running" if record.start_seen else "pending"
    end = record.end or {}
    error = end.get("error") or {}
    if record.cancelled:
        return "cancelled"
    if error.get("code") == "timeout":
        return "timeout"
    if end.get("exit_code") == 0 and not error:
        return "completed"
    return "failed"


def describe(record: ExecRecord, output_offset: int = 0, *, with_output: bool = True) -> dict[str, Any]:
    """One execution; with its output from sequence number `output_offset` on."""
    end = record.end or {}
    out: dict[str, Any] = {
        "id": record.exec_id,
        "tag": record.tag,
        "state": state_of(record),
        "exit_code": end.get("exit_code"),
        "signal": end.get("signal"),
        "error": end.get("error"),
        "duration_ms": end.get("duration_ms"),
        "files": end.get("files"),
        "mounts": end.get("mounts"),
        "created_at": record.created_at,
        "ended_at": record.ended_at,
    }
    if with_output:
        events, lost = record.buffer.since(output_offset)
        streams: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray(), "pty": bytearray()}
        display: list[dict[str, str]] = []
        for event in events:
            if event.get("ev") == "data":
                streams[event["fd"]] += event["data"]
            elif event.get("ev") == "display":
                display.append(event["bundle"])
        out["stdout"] = streams["stdout"].decode("utf-8", "replace")
        out["stderr"] = streams["stderr"].decode("utf-8", "replace")
        if streams["pty"]:
            out["pty"] = streams["pty"].decode("utf-8", "replace")
        out["display"] = display
        # Where the next poll continues: past every event this reply had (or could have had).
        out["output_offset"] = max(output_offset, record.buffer.next_seq)
        out["output_lost"] = list(lost) if lost else None
    return out
