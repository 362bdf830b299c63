"""The CLI's client commands: `sandgate invoke`, `test`, `functions ...`, `executions ...`, `cache ...`.

Each is a call on a running gateway through the sync SDK (`gateway.client`). The gateway and key
come from `--url`/`--api-key`, else `$SANDGATE_URL`/`$SANDGATE_API_KEY` (prefer the environment:
a flag shows in the process list). Answers are printed as JSON on stdout, the gateway's own shapes;
a gateway error is one line on stderr (`sandgate <command>: <code>: <message>`) and exit status 1.
An invocation whose status is not `success`, and a test run that is not a success, also exit 1,
so scripts can rely on the status; bad arguments exit 2, as argparse does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a command runs: `sandgate serve` and `version` need none of it
    from gateway.client import Client, ExecutionInfo

Command = Callable[["Client", argparse.Namespace], int]


class UsageError(Exception):
    """Arguments that argparse cannot check alone (a JSON value, a file): exit status 2."""


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _json_arg(text: str | None, kind: type, name: str) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{name} is not JSON: {exc}") from None
    if not isinstance(value, kind):
        raise UsageError(f"{name} must be a JSON {'array' if kind is list else 'object'}")
    return value


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _code(args: argparse.Namespace, *, required: bool = True) -> dict[str, Any]:
    """`code` (from --code or --file) or `code_ref`, as SDK keyword arguments."""
    given = [name for name in ("code", "file", "code_ref") if getattr(args, name, None) is not None]
    if len(given) > 1:
        raise UsageError("give one of --code, --file and --code-ref")
    if not given:
        if required:
            raise UsageError("give the code: --code TEXT, --file PATH ('-': stdin) or --code-ref SHA256")
        return {}
    if args.file is not None:
        return {"code": _read(args.file)}
    return {"code": args.code} if args.code is not None else {"code_ref": args.code_ref}


def _env(pairs: Sequence[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--env takes NAME=VALUE, not {pair!r}")
        env[name] = value
    return env


def _add_code_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--code", help="the source, inline")
    parser.add_argument("--file", help="read the source from this file ('-': stdin)")
    parser.add_argument("--code-ref", help="the sha256 of code the gateway cached (sandgate cache list)")
    parser.add_argument("--language", choices=("python", "javascript"), default=None, help="default: python")


# -- invoke and test ----------------------------------------------------------------------------------


def _invoke(client: Client, args: argparse.Namespace) -> int:
    call_args = _json_arg(args.args, list, "--args")
    kwargs = _json_arg(args.kwargs, dict, "--kwargs")
    code = _code(args)
    if args.sandbox is not None:
        done = client.get_sandbox(args.sandbox).invoke(args.function, call_args, kwargs, language=args.language,
                                                       timeout=args.timeout, **code)
    else:
        done = client.invoke(args.function, call_args, kwargs, language=args.language, timeout=args.timeout,
                             runtime=args.runtime, **code)
    _print(done.raw)
    return 0 if done.ok else 1


def _test(client: Client, args: argparse.Namespace) -> int:
    code = _code(args, required=False)
    tests = _read(args.tests)
    if args.sandbox is not None:
        report = client.get_sandbox(args.sandbox).run_tests(code.get("code"), tests, code_ref=code.get("code_ref"),
                                                            language=args.language, timeout=args.timeout)
    else:
        with client.create_sandbox(args.runtime) as sandbox:  # destroyed afterwards
            report = sandbox.run_tests(code.get("code"), tests, code_ref=code.get("code_ref"), language=args.language,
                                       timeout=args.timeout)
    _print(report.raw)
    return 0 if report.success else 1


# -- deployed functions ---------------------------------------------------------------------------------


def _deploy(client: Client, args: argparse.Namespace) -> int:
    deployed = client.deploy_function(
        args.name, function=args.function, runtime=args.runtime, language=args.language, timeout=args.timeout,
        memory_mb=args.memory_mb, min_instances=args.min_instances, max_instances=args.max_instances,
        idle_timeout=args.idle_timeout, env=_env(args.env), **_code(args))
    _print(deployed.raw)
    return 0


def _functions_list(client: Client, args: argparse.Namespace) -> int:
    _print({"functions": [f.raw for f in client.list_functions()]})
    return 0


def _functions_get(client: Client, args: argparse.Namespace) -> int:
    _print(client.get_function(args.name).raw)
    return 0


def _functions_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_function(args.name)
    return 0


def _functions_invoke(client: Client, args: argparse.Namespace) -> int:
    done = client.invoke_function(args.name, _json_arg(args.args, list, "--args"),
                                  _json_arg(args.kwargs, dict, "--kwargs"))
    _print(done.raw)
    return 0 if done.ok else 1


# -- background executions ------------------------------------------------------------------------------


def _executions_start(client: Client, args: argparse.Namespace) -> int:
    sandbox = client.get_sandbox(args.sandbox)
    code = _code(args, required=args.command is None)
    if code and args.command is not None:
        raise UsageError("give the code or --command, not both")
    started = sandbox.start_execution(args.command, language=args.language, stdin=args.stdin, env=_env(args.env),
                                      cwd=args.cwd, timeout=args.timeout, tag=args.tag, **code)
    if not args.follow:
        _print(started.raw)
        return 0
    last: ExecutionInfo | None = None
    for last in sandbox.follow_execution(started.id):
        sys.stdout.write(last.stdout)
        sys.stdout.flush()
        sys.stderr.write(last.stderr)
    assert last is not None
    print(f"sandgate: execution {last.id} {last.state}" + (f" (exit {last.exit_code})" if last.exit_code is not None
                                                          else ""), file=sys.stderr)
    return last.exit_code if last.exit_code is not None else 1


def _executions_get(client: Client, args: argparse.Namespace) -> int:
    info = client.get_sandbox(args.sandbox).get_execution(args.execution_id, wait=args.wait, timeout=args.timeout,
                                                          output_offset=args.output_offset)
    _print(info.raw)
    return 0


def _executions_cancel(client: Client, args: argparse.Namespace) -> int:
    _print(client.get_sandbox(args.sandbox).cancel_execution(args.execution_id).raw)
    return 0


def _executions_list(client: Client, args: argparse.Namespace) -> int:
    listed = client.get_sandbox(args.sandbox).list_executions(state=args.state, limit=args.limit)
    _print({"executions": [e.raw for e in listed]})
    return 0


# -- the code cache -------------------------------------------------------------------------------------


def _cache_list(client: Client, args: argparse.Namespace) -> int:
    _print({"entries": [dataclasses.asdict(e) for e in client.cache_entries()]})
    return 0


def _cache_clear(client: Client, args: argparse.Namespace) -> int:
    client.clear_cache()
    return 0


def _cache_delete(client: Client, args: argparse.Namespace) -> int:
    client.delete_cache_entry(args.hash)
    return 0


# -- the parsers ------------------------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="the gateway (default $SANDGATE_URL, then http://127.0.0.1:8080)")
    common.add_argument("--api-key", default=None, help="the API key (default $SANDGATE_API_KEY, preferred: a flag "
                                                        "shows in the process list)")
    return common


def add_parsers(sub: Any) -> None:
    """Add the client commands to the `sandgate` parser's subcommands."""
    common = _connection_options()

    def command(parent: Any, name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_text,
                                                            description=help_text)
        parser.set_defaults(func=_runner(func), client_command=True)
        return parser

    invoke = command(sub, "invoke", _invoke, "call a function of some code in a fresh sandbox (or in --sandbox)")
    invoke.add_argument("function", help="the function's name")
    _add_code_options(invoke)
    invoke.add_argument("--args", help="positional arguments, a JSON array")
    invoke.add_argument("--kwargs", help="keyword arguments, a JSON object")
    invoke.add_argument("--timeout", type=float, help="seconds for the call")
    invoke.add_argument("--runtime", help="the runtime of the fresh sandbox (default: the gateway's)")
    invoke.add_argument("--sandbox", help="call it in this sandbox instead")

    test = command(sub, "test", _test, "run tests against code (pytest for Python) in --sandbox or a fresh sandbox")
    _add_code_options(test)
    test.add_argument("--tests", required=True, help="the file with the tests ('-': stdin)")
    test.add_argument("--timeout", type=float, help="seconds for the run")
    test.add_argument("--runtime", help="the runtime of the fresh sandbox (default: the gateway's)")
    test.add_argument("--sandbox", help="run in this sandbox instead")

    functions = sub.add_parser("functions", help="deployed functions").add_subparsers(dest="functions_command",
                                                                                      required=True)
    deploy = command(functions, "deploy", _deploy, "create or replace a function")
    deploy.add_argument("name")
    _add_code_options(deploy)
    deploy.add_argument("--function", help="the function to call (default: NAME)")
    deploy.add_argument("--runtime")
    deploy.add_argument("--timeout", type=float, help="seconds per call")
    deploy.add_argument("--memory-mb", type=int)
    deploy.add_argument("--min-instances", type=int, help="instances kept warm (default 0)")
    deploy.add_argument("--max-instances", type=int, help="instances that may run at once")
    deploy.add_argument("--idle-timeout", type=float, help="seconds an idle instance is kept")
    deploy.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment of the calls (repeat)")
    command(functions, "list", _functions_list, "this tenant's functions")
    command(functions, "get", _functions_get, "one function, with its instances").add_argument("name")
    command(functions, "delete", _functions_delete, "delete a function").add_argument("name")
    call = command(functions, "invoke", _functions_invoke, "call a deployed function")
    call.add_argument("name")
    call.add_argument("--args", help="positional arguments, a JSON array")
    call.add_argument("--kwargs", help="keyword arguments, a JSON object")

    executions = sub.add_parser("executions", help="background executions in a sandbox").add_subparsers(
        dest="executions_command", required=True)
    start = command(executions, "start", _executions_start, "start code or a command in the background")
    start.add_argument("sandbox")
    _add_code_options(start)
    start.add_argument("--command", help="a shell command line instead of code (runtimes with processes)")
    start.add_argument("--stdin", help="text for its standard input")
    start.add_argument("--env", action="append", metavar="NAME=VALUE")
    start.add_argument("--cwd")
    start.add_argument("--timeout", type=float, help="seconds before it is stopped")
    start.add_argument("--tag")
    start.add_argument("--follow", action="store_true", help="print its output as it comes and exit with its "
                                                             "exit status")
    get = command(executions, "get", _executions_get, "an execution's state and output")
    get.add_argument("sandbox")
    get.add_argument("execution_id")
    get.add_argument("--wait", action="store_true", help="wait for it to end (at most --timeout seconds)")
    get.add_argument("--timeout", type=float)
    get.add_argument("--output-offset", type=int, default=0, help="output from here on (a previous output_offset)")
    cancel = command(executions, "cancel", _executions_cancel, "stop an execution")
    cancel.add_argument("sandbox")
    cancel.add_argument("execution_id")
    listing = command(executions, "list", _executions_list, "a sandbox's executions, newest first")
    listing.add_argument("sandbox")
    listing.add_argument("--state", choices=("pending", "running", "completed", "failed", "cancelled", "timeout"))
    listing.add_argument("--limit", type=int)

    cache = sub.add_parser("cache", help="the tenant's code cache").add_subparsers(dest="cache_command", required=True)
    command(cache, "list", _cache_list, "cached code, most recently used first")
    command(cache, "clear", _cache_clear, "drop all cached code")
    command(cache, "delete", _cache_delete, "drop one entry").add_argument("hash")


def _runner(func: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from gateway.client import Client, SandgateError

        name = " ".join(part for part in (args.command, getattr(args, f"{args.command}_command", None)) if part)
        try:
            with Client(args.url, args.api_key) as client:
                return func(client, args)
        except (UsageError, ValueError) as exc:  # ValueError: the SDK refusing an argument (a URL, ...)
            print(f"sandgate {name}: {exc}", file=sys.stderr)
            return 2
        except SandgateError as exc:
            print(f"sandgate {name}: {exc}", file=sys.stderr)
            return 1

    return run
