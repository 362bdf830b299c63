"""Signal names and numbers, where the platform has signals at all (WASI has none to send)."""

from __future__ import annotations

from typing import Any

from .wire import ProtocolError


def signal_number(value: Any) -> int:
    """A signal given as a name ("SIGTERM", "TERM") or a number.

    Raises:
        ProtocolError: `bad_request` for a signal this platform does not know, `unsupported`
            where there is no signal module.
    """
    try:
        import signal
    except ImportError:
        raise ProtocolError("unsupported", "this platform has no signals") from None
    try:
        if isinstance(value, str):
            name = value.upper()
            return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
        if isinstance(value, int) and not isinstance(value, bool):
            return int(signal.Signals(value))
    except (KeyError, ValueError):
        pass
    raise ProtocolError("bad_request", f"unknown signal {value!r:.40}")


def signal_name(number: int) -> str:
    try:
        import signal

        return signal.Signals(number).name
    except (ImportError, ValueError):
        return f"SIG{number}"


def unignore_for_children() -> None:
    """Let processes the agent starts get the default SIGINT and SIGQUIT.

    An agent started as a background job (`cmd &` in a script, some init systems) inherits those
    two ignored, and an ignored signal stays ignored across fork and exec: every exec's ^C would
    then do nothing. A *handled* signal is reset to its default at exec, so the agent handles them
    (and, as before, does nothing on them itself). Only the main thread may do this; where it is
    not the main thread, or there are no signals (WASI), nothing changes.
    """
    try:
        import signal
    except ImportError:
        return
    for sig in (signal.SIGINT, signal.SIGQUIT):
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, _do_nothing)
        except (ValueError, OSError):
            return


def _do_nothing(signum: int, frame: Any) -> None:
    pass
