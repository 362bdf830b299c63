"""The JSON bodies of the serverless REST calls, built from the SDK's arguments (no I/O).

One place for what each call sends, shared by `AsyncClient` and `AsyncSandbox` (and so by the sync
API, which runs those). Arguments left as None are left out, so the gateway's defaults apply; the
gateway checks every field (one place for each rule), the SDK only turns Python values into JSON.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any


def _given(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def code_fields(code: str | None, code_ref: str | None, language: str | None) -> dict[str, Any]:
    """`code` or `code_ref` (the sha256 of code the gateway cached for this tenant), and `language`.
    Without a language, the gateway takes Python for code and the cached code's language for a ref."""
    return _given(code=code, code_ref=code_ref, language=language)


def files_field(files: Mapping[str, str | bytes] | None) -> dict[str, Any] | None:
    """An invoke's input files: text as is, bytes as `{"base64": ...}`."""
    if files is None:
        return None
    return {path: data if isinstance(data, str) else {"base64": base64.b64encode(bytes(data)).decode("ascii")}
            for path, data in files.items()}


def invoke_body(function: str, args: Sequence[Any], kwargs: Mapping[str, Any] | None, *, code: str | None,
                code_ref: str | None, language: str | None, timeout: float | None,
                files: Mapping[str, str | bytes] | None) -> dict[str, Any]:
    """`POST /v1/sandboxes/{id}/invoke` and `POST /v1/invoke` (with create options)."""
    return {"function": function, "args": list(args), "kwargs": dict(kwargs or {}),
            **code_fields(code, code_ref, language), **_given(timeout=timeout, files=files_field(files))}


def tests_body(code: str | None, tests: str, *, code_ref: str | None, language: str | None,
              timeout: float | None) -> dict[str, Any]:
    """`POST /v1/sandboxes/{id}/test`."""
    return {"tests": tests, **code_fields(code, code_ref, language), **_given(timeout=timeout)}


def exec_body(command: str | Sequence[str] | None, *, code: str | None, code_ref: str | None,
              language: str | None, stdin: bytes | str | None, env: Mapping[str, str] | None, cwd: str | None,
              timeout: float | None, tag: str | None, namespace: str | None) -> dict[str, Any]:
    """A REST exec body (`POST .../executions`, `POST /v1/execute`). REST carries stdin as text,
    so bytes must be UTF-8."""
    if isinstance(stdin, bytes | bytearray | memoryview):
        try:
            stdin = bytes(stdin).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("REST calls take stdin as text: these bytes are not UTF-8 (use the WebSocket exec "
                             "for binary stdin)") from None
    return {**code_fields(code, code_ref, language),
            **_given(command=command if command is None or isinstance(command, str) else list(command),
                     stdin=stdin, env=dict(env) if env is not None else None, cwd=cwd, timeout=timeout, tag=tag,
                     namespace=namespace)}


def deploy_body(*, code: str | None, code_ref: str | None, function: str, runtime: str | None,
                language: str | None, timeout: float | None, memory_mb: int | None, min_instances: int | None,
                max_instances: int | None, idle_timeout: float | None,
                env: Mapping[str, str] | None) -> dict[str, Any]:
    """`PUT /v1/functions/{name}`."""
    return {"function": function, **code_fields(code, code_ref, language),
            **_given(runtime=runtime, timeout=timeout, memory_mb=memory_mb, min_instances=min_instances,
                     max_instances=max_instances, idle_timeout=idle_timeout,
                     env=dict(env) if env is not None else None)}


def call_deadline(timeout: float | None, *, request_timeout: float, call_timeout: float) -> float:
    """How long the SDK waits for a call that runs code: the call's own `timeout` plus
    `request_timeout` (for the sandbox, the queue and the network), else `call_timeout`."""
    return call_timeout if timeout is None else timeout + request_timeout
