"""`python -m guest_agent`: serve the agent protocol on a byte channel.

    python -m guest_agent [--root DIR] [--fs-root DIR ...] [--fd-in N --fd-out N | --device PATH] [--single-thread]
                          [--vm] [--cgroup DIR]

By default the channel is stdin/stdout. The agent then keeps private copies of fds 0 and 1 for
frames and points fd 0 at /dev/null and fd 1 at stderr, so nothing else (a C extension's printf,
a child that inherits them) can read or corrupt the channel; `sys.stdout` & co. are per-exec
proxies anyway. Where fds cannot be duplicated (WASI) fds 0 and 1 are used as they are.

Exit status: 0 at end of input, 2 after a framing error; either way every process the agent
started has been killed first.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m guest_agent", description="The sandgate guest agent (docs/protocol.md)."
    )
    parser.add_argument(
        "--root",
        help="the sandbox root: fs ops are confined to it, execs start in it "
        "(default: /work if it exists, else the current directory)",
    )
    parser.add_argument(
        "--fs-root",
        action="append",
        default=[],
        help="a directory absolute paths of fs ops may lie under, besides --root (repeatable; "
        "'/' for the whole file system)",
    )
    parser.add_argument("--fd-in", type=int, help="read frames from this fd (with --fd-out)")
    parser.add_argument("--fd-out", type=int, help="write frames to this fd (with --fd-in)")
    parser.add_argument("--device", help="a char device or path to open read-write as the channel")
    parser.add_argument(
        "--single-thread",
        action="store_true",
        help="behave as on a platform without threads (as under WASI); for tests",
    )
    parser.add_argument(
        "--vm",
        action="store_true",
        help="the agent owns this (virtual) machine: offer guest.setup (clock, entropy, limits)",
    )
    parser.add_argument(
        "--cgroup",
        help="a cgroup v2 folder to keep started processes in (limits, kill-all); not the agent's own",
    )
    return parser


def _channel_fds(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[int, int]:
    if args.device is not None:
        if args.fd_in is not None or args.fd_out is not None:
            parser.error("--device excludes --fd-in/--fd-out")
        fd = os.open(args.device, os.O_RDWR | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
        if os.isatty(fd):
            try:  # a serial console: no echo, no line editing, every byte as it is
                import termios
                import tty

                # TCSANOW: TCSAFLUSH (the default) would drop frames the peer already sent.
                tty.setraw(fd, termios.TCSANOW)
            except ImportError:
                pass
        return fd, fd
    if (args.fd_in is None) != (args.fd_out is None):
        parser.error("--fd-in and --fd-out go together")
    if args.fd_in is not None:
        return args.fd_in, args.fd_out
    try:
        fd_in, fd_out = os.dup(0), os.dup(1)
    except (AttributeError, OSError):  # WASI: no dup
        return 0, 1
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    return fd_in, fd_out


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    root = args.root or ("/work" if os.path.isdir("/work") else os.getcwd())
    if not os.path.isdir(root):
        parser.error(f"--root {root!r} is not a directory")
    root = os.path.realpath(root)
    for fs_root in args.fs_root:
        if not os.path.isdir(fs_root):
            parser.error(f"--fs-root {fs_root!r} is not a directory")

    from .agent import Agent, serve
    from .channel import Channel
    from .features import detect

    cgroup = None
    if args.cgroup:
        # Only then: system.py imports ctypes and fcntl, which CPython-on-WASI does not have.
        from .system import SandboxCgroup

        cgroup = SandboxCgroup(args.cgroup)
    fd_in, fd_out = _channel_fds(args, parser)
    os.chdir(root)
    channel = Channel(fd_in, fd_out)
    agent = Agent(
        root,
        channel,
        fs_roots=tuple(args.fs_root),
        features=detect(single_thread=args.single_thread, system=args.vm),
        replace_dunder=True,
        cgroup=cgroup,
    )
    return serve(channel, agent)


if __name__ == "__main__":
    code = main()
    for stream in (sys.__stderr__, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    # Python execs may still be running on daemon threads: leave without waiting for them.
    os._exit(code)
